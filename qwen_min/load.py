"""Checkpoints: find them (local folder or Hugging Face Hub), read safetensors, write them back.

Reading is frugal: the model is built on the meta device, its storage allocated once, and every
tensor is copied from the file (read with the ``safetensors`` package) straight into its parameter,
converting the dtype on the way. No second full copy of the weights ever exists. A GGUF file
(``*.gguf``) is read the same way by ``qwen_min.gguf``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from qwen_min import gguf
from qwen_min.config import CheckpointError, QwenConfig
from qwen_min.model import Qwen2, empty_model
from qwen_min.tokenizer import Tokenizer

# Only these files are fetched from the Hub: no PyTorch .bin, no ONNX, no README images.
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]

# ---------------------------------------------------------------------------------------------
# Finding a checkpoint


def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local folder as is, or a Hub repo id downloaded (or found in the cache) via huggingface_hub.

    The Hub path honours HF_HOME / HF_HUB_CACHE (where the cache lives), HF_HUB_OFFLINE=1 (never
    touch the network, use the cache) and ``revision`` (a branch, tag or commit hash to pin).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name}: not a checkpoint folder, and not a Hub repo id of the form 'owner/name'")

    from huggingface_hub import snapshot_download

    return _from_hub(lambda **kw: Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS, **kw)),
                     name, revision)


def _hub_reachable() -> bool:
    """Whether the Hub's host answers at all, asked once, quickly: without a network huggingface_hub
    retries for about 25 s before it gives up, so a machine without one is treated as offline at once."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True   # (reachable through the proxy, or not: huggingface_hub will say)
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError:
        return False
    return True


def _from_hub(fetch: Any, name: str, revision: str | None) -> Any:
    """``fetch(**kw)`` (a huggingface_hub download of repo ``name``), its failures as CheckpointError:
    a repo or revision the Hub does not have, or no cached copy and no network (HF_HUB_OFFLINE=1, or
    the Hub unreachable: then only the cache is asked), each one line saying what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    offline = constants.HF_HUB_OFFLINE or not _hub_reachable()
    try:
        return fetch(local_files_only=True) if offline else fetch()
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{name} (revision {revision or 'main'}): not found on the Hub ({first})") from None
    except (LocalEntryNotFoundError, OSError) as e:
        why = ("HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else
               f"{constants.ENDPOINT} unreachable" if offline else f"the Hub could not be reached: {type(e).__name__}")
        raise CheckpointError(
            f"{name} (revision {revision or 'main'}) is not in the local Hub cache ({constants.HF_HUB_CACHE}: no "
            f"snapshot) and it cannot be downloaded ({why}). On a machine with network run `hf download {name}` "
            f"(or `huggingface-cli download {name}`, with HF_HOME pointing at the cache you will use here), or pass "
            f"a local checkpoint folder with --model"
        ) from None


def load_config(name_or_path: str | os.PathLike, *, revision: str | None = None) -> QwenConfig:
    """A checkpoint's config alone: a config.json file, a folder's, a Hub repo's (only that file is
    fetched, not the weights, so FLOPs can be planned before anything large is downloaded), or a GGUF
    file's metadata."""
    if is_gguf_checkpoint(name_or_path, revision):
        return gguf.gguf_config(gguf.read_gguf(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return QwenConfig.from_json(path)
    if path.is_dir():
        return QwenConfig.from_json(path / "config.json")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name}: not a checkpoint folder or config.json, and not a Hub repo id of the form "
                              f"'owner/name'")
    from huggingface_hub import hf_hub_download

    return QwenConfig.from_json(_from_hub(lambda **kw: hf_hub_download(name, "config.json", revision=revision, **kw),
                                          name, revision))


# ---------------------------------------------------------------------------------------------
# The explicit name map


def name_map(config: QwenConfig) -> dict[str, str]:
    """Checkpoint tensor name -> our parameter name, for every tensor a checkpoint must hold."""
    names = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"}
    for i in range(config.num_hidden_layers):
        ours = f"layers.{i}."
        for p in ("input_layernorm.weight", "post_attention_layernorm.weight",
                  "self_attn.q_proj.weight", "self_attn.q_proj.bias",
                  "self_attn.k_proj.weight", "self_attn.k_proj.bias",
                  "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                  "self_attn.o_proj.weight",
                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
            names[f"model.{ours}{p}"] = ours + p
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


# ---------------------------------------------------------------------------------------------
# Reading safetensors files


@contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    """safetensors' own reader on ``path``; a file it cannot parse is a CheckpointError naming it.

    safetensors checks the header (its length, JSON, dtypes, and that the tensors' byte ranges
    cover the file exactly), so a truncated or corrupt file fails here, before any data is read.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def load_weights(model: Qwen2, directory: Path) -> None:
    """Fill every parameter of ``model`` from the safetensors file(s) in ``directory``.

    All names and shapes are checked before any data is read: a missing tensor, an unexpected one,
    or one of the wrong shape is an error naming the tensor (and both shapes).
    """
    config = model.config
    expected = name_map(config)
    params = dict(model.named_parameters(remove_duplicate=False))
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}  # checkpoint name -> (file, shape), from the headers
    for file in _weight_files(directory):
        with _open_safetensors(file) as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                found[name] = (file, tuple(f.get_slice(name).get_shape()))

    missing = [n for n in expected if n not in found]
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {', '.join(missing[:10])}"
                              + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    # A tied checkpoint may still carry a copy of lm_head.weight; it must at least have the right shape.
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = [n for n in found if n not in expected and n not in ignorable]
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor(s) {', '.join(unexpected[:10])} "
                              f"(not part of a Qwen2 model with this config.json)")
    for hf_name, ours in list(expected.items()) + [(n, "lm_head.weight") for n in ignorable if n in found]:
        file, shape = found[hf_name]
        want = tuple(params[ours].shape)
        if shape != want:
            raise CheckpointError(f"{file}: tensor {hf_name} has shape {shape}, the config.json implies {want}")

    by_file: dict[Path, set[str]] = {}
    for hf_name in expected:
        by_file.setdefault(found[hf_name][0], set()).add(hf_name)
    with torch.no_grad():
        for file, names in by_file.items():
            with _open_safetensors(file) as f:
                order = [n for n in f.offset_keys() if n in names]  # the file front to back
            for hf_name in order:
                # One tensor at a time, converted to the parameter's dtype on the copy. A fresh handle
                # for each: safe_open maps the file into memory, and every page read through a mapping
                # stays in the process's resident set until the mapping closes, so one handle for the
                # whole file would hold a second copy of the weights' size by the end.
                with _open_safetensors(file) as f:
                    params[expected[hf_name]].copy_(f.get_tensor(hf_name))


def is_gguf_checkpoint(name_or_path: str | os.PathLike, revision: str | None) -> bool:
    """Whether ``name_or_path`` names a GGUF file, by its extension (read by ``qwen_min.gguf``; a missing
    file is its error to report). A local file has no Hub revision, so one given is refused."""
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() != ".gguf" or path.is_dir():
        return False
    if revision is not None:
        raise CheckpointError(f"{name_or_path}: a local GGUF file has no revision (got {revision!r}); drop --revision")
    return True


def from_pretrained(name_or_path: str | os.PathLike, *, revision: str | None = None,
                    dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> Qwen2:
    """Load a Qwen2 checkpoint (Hub repo id, local folder or GGUF file) as a ``Qwen2`` in eval mode.

    A GGUF file's tensors are dequantized to float32 and then converted to ``dtype`` (see qwen_min.gguf).
    """
    if is_gguf_checkpoint(name_or_path, revision):
        return gguf.from_gguf(name_or_path, dtype=dtype, device=device)
    directory = resolve(name_or_path, revision=revision)
    model = empty_model(QwenConfig.from_json(directory / "config.json"), dtype, device)
    load_weights(model, directory)
    model.name_or_path = str(name_or_path)
    model.checkpoint_files = tuple(str(f) for f in _weight_files(directory))  # for lora's base fingerprint
    return model.eval()


def save_pretrained(model: Qwen2, directory: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors in the Hub layout (transformers loads it too).

    The model must be a plain Qwen2 (merge any LoRA first: ``lora.merge_lora`` then
    ``lora.remove_lora``); an lm_head bias has no place in the Qwen2 format and is refused.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    hf_to_ours = name_map(model.config)
    extra = set(params) - set(hf_to_ours.values()) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    if extra:
        raise CheckpointError(f"cannot save parameters with no Qwen2 checkpoint name: {sorted(extra)[:5]} "
                              "(merge and remove LoRA first)")
    tensors = {hf: params[ours].detach().contiguous() for hf, ours in hf_to_ours.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def load_tokenizer(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Tokenizer:
    """The tokenizer of a Hub repo id, a local checkpoint folder or a GGUF file."""
    if is_gguf_checkpoint(name_or_path, revision):
        return gguf.tokenizer_from_gguf(name_or_path)
    return Tokenizer(resolve(name_or_path, revision=revision))

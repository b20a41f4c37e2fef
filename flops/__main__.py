"""python -m flops --model <repo-or-folder> --seq-len 512 --batch 4 --lora-rank 4 --mode train [--json]

Counting needs only the shapes, so only ``config.json`` is read (from a local folder, a path to the
file itself, or a Hub repo id — just that one file is fetched or found in the cache) and the model
is built on the meta device: no weights are loaded and no memory is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flops.counter import MODES, count, format_report
from qwen_min import Qwen2, QwenConfig


def load_config(model: str, revision: str | None = None) -> QwenConfig:
    path = Path(model).expanduser()
    if path.is_file():
        return QwenConfig.from_json(path)
    if path.is_dir():
        return QwenConfig.from_json(path / "config.json")
    from huggingface_hub import hf_hub_download

    return QwenConfig.from_json(hf_hub_download(model, "config.json", revision=revision))


def build(config: QwenConfig, *, lora_rank: int = 0, targets: tuple[str, ...] = ("q_proj", "v_proj"),
          train_lm_head_bias: bool = False) -> Qwen2:
    """The model's structure on the meta device, LoRA-wrapped (base frozen) when lora_rank > 0."""
    with torch.device("meta"):
        model = Qwen2(config)
        if lora_rank > 0 or train_lm_head_bias:
            from lora import apply_lora

            apply_lora(model, rank=max(lora_rank, 1), targets=targets, train_lm_head_bias=train_lm_head_bias)
    return model


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m flops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hub repo id, checkpoint folder, or config.json path")
    p.add_argument("--revision", default=None)
    p.add_argument("--seq-len", type=int, required=True, help="new tokens per row in this call")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--past-len", type=int, default=0, help="cached positions (decode)")
    p.add_argument("--mode", choices=MODES, default="forward")
    p.add_argument("--lora-rank", type=int, default=0, help="0: no LoRA")
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--train-lm-head-bias", action="store_true")
    p.add_argument("--no-loss", action="store_true", help="forward/train without the cross-entropy")
    p.add_argument("--scored-tokens", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None, help="output rows computed (constrained decoding)")
    p.add_argument("--sampling", action="store_true", help="prefill/decode: sample instead of argmax")
    p.add_argument("--terms", action="store_true", help="with --json: every priced term")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    config = load_config(args.model, args.revision)
    model = build(config, lora_rank=args.lora_rank, targets=tuple(args.lora_targets.split(",")),
                  train_lm_head_bias=args.train_lm_head_bias)
    report = count(model, batch=args.batch, seq_len=args.seq_len, mode=args.mode, past_len=args.past_len,
                   include_loss=False if args.no_loss else None, scored_tokens=args.scored_tokens,
                   vocab=args.vocab, sampling=args.sampling)
    d = report.to_dict(terms=args.terms)
    if args.json:
        json.dump(d, sys.stdout, indent=1)
        print()
    else:
        print(format_report(report))
    return d


if __name__ == "__main__":
    main()

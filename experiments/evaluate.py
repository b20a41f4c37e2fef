"""Cross-entropy of the untrained model, or of a saved adapter, on validation or test windows.

    python experiments/evaluate.py --split test                          # the untrained model
    python experiments/evaluate.py --adapter runs/train/adapter --split val

The encoding (alpha, decimals) and the split come from the adapter's run folder when there is one,
so a trained model is scored on exactly the numbers it was trained to continue. The FLOPs of the
forward passes go to the ledger. Writes --out/eval_metrics.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flops
import lora
import qwen_min
from experiments.lib import data, files, planning, runs, training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runs.add_common_args(p, out_default="runs/eval")
    runs.add_adapter_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = runs.start_run(args, "evaluate")
    runs.seed_everything(args.seed)
    device = runs.pick_device(args.device)
    # the trained run's splits.json / encoding.json, so the model sees the numbers it was trained on
    run_data = runs.prepare_data(args, out, reuse=runs.adapter_run_dir(args.adapter))
    texts = run_data.texts(args.split, args.max_systems)
    tokenizer = qwen_min.load_tokenizer(args.model, revision=args.revision)
    windows = data.training_windows(texts, tokenizer, context_length=args.context_length,
                                    stride=args.context_length - 1)

    # ---- plan, checked against the ledger before any model work
    shape = planning.meta_model(planning.model_config(args.model, args.revision))
    if args.adapter:
        lora.load_adapter(shape, args.adapter)
    planned = flops.count(shape, batch=len(windows.input_ids), seq_len=args.context_length, mode="forward").total
    ledger = flops.Ledger(args.ledger, budget=args.budget)
    ledger.check(planned, name=args.name)

    model, _ = runs.load_model(args, device)
    if args.adapter:
        lora.load_adapter(model, args.adapter)
    model.eval()
    t0 = time.time()
    loss, tokens = training.windows_loss(model, windows.input_ids, windows.labels, args.batch_size, device)
    ledger.append(name=args.name, kind="eval", flops=planned, tokens=len(windows.input_ids) * args.context_length,
                  steps=0, seconds=time.time() - t0,
                  config={"split": args.split, "adapter": args.adapter, "windows": len(windows.input_ids)})
    result = {"split": args.split, "adapter": args.adapter, "model": args.model, "loss": loss,
              "scored_tokens": tokens, "windows": len(windows.input_ids), "systems": len(texts), "flops": planned}
    files.write_json(out / "eval_metrics.json", result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

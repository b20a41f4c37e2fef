"""Cross-entropy of the untrained model, or of a saved adapter, on validation or test windows.

    python experiments/evaluate.py --split test                          # the untrained model
    python experiments/evaluate.py --adapter runs/train/adapter --split val

With --adapter, the encoding (alpha, decimals), the splits and the data file come from the adapter
folder itself (its data file checked by SHA-256; --allow-other-data scores another, with a warning
in the results), so a trained model is scored on exactly the numbers it was trained to continue;
its own training split is refused. The planned FLOPs are reserved in the ledger before any model
work and each batch is charged as it is done. Writes --out/eval_metrics.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qwen_min
from experiments.lib import cli, data, files, planning, runs, training
from experiments.lib.booking import Booking
from experiments.lib.windows import require_scored


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = runs.script_parser(__doc__)
    runs.add_common_args(p, out_default="runs/eval")
    runs.add_adapter_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = runs.start_run(args, "evaluate")
    runs.seed_everything(args.seed)
    device = runs.pick_device(args.device)
    run_data = runs.prepare_data(args, out)  # with --adapter: its splits, encoding and (checked) data file
    texts = run_data.texts(args.split, args.max_systems)
    tokenizer = qwen_min.load_tokenizer(args.model, revision=args.revision)
    L = args.context_length
    windows = data.training_windows(texts, tokenizer, context_length=L, stride=L - 1)
    what = f"the {args.split} split ({len(texts)} systems)"
    require_scored(windows, what)

    # ---- plan (the tokens each batch scores: exactly what it charges), reserved before any model work
    shape = planning.meta_model(qwen_min.load_config(args.model, revision=args.revision))
    if args.adapter:
        runs.load_adapter(shape, args)
    n = len(windows.input_ids)
    costs = planning.ScoredCosts(shape, args.batch_size, L)
    planned = costs.windows_loss(windows.labels)
    reservation = runs.reserve(args, planned, kind="eval",
                                   config={"split": args.split, "adapter": args.adapter, "windows": n})
    with Booking(reservation) as booking:  # closed on any exit, releasing what was not spent
        model, _ = runs.load_model(args, device)
        if args.adapter:
            runs.load_adapter(model, args, run_data)
        model.eval()

        def charge_batch(rows: int, scored: int) -> None:
            booking.charge(costs.evaluation(rows, scored), kind="eval", tokens=rows * L,
                           config={"split": args.split, "adapter": args.adapter, "windows": rows, "of": n})

        loss, tokens = training.windows_loss(model, windows.input_ids, windows.labels, args.batch_size, device,
                                             what=what, after_batch=charge_batch)
    result = {"split": args.split, "adapter": args.adapter, "model": args.model, "loss": loss,
              "scored_tokens": tokens, "windows": n, "systems": len(texts), "flops": booking.charged,
              "flops_planned": planned, "data": run_data.data_path, "data_sha256": run_data.sha256,
              "warnings": run_data.warnings}
    files.write_json(out / "eval_metrics.json", result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(cli.run_as_script(main))

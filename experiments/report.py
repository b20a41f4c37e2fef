"""One folder with everything a write-up needs: the FLOP table, the metrics tables and the plots.

    python experiments/report.py --runs runs --out runs/report

Reads the ledger (every experiment's FLOPs, totals and percent of the budget), every training run
under --runs (summary.json, metrics.jsonl -> loss curves), every evaluation (eval_metrics.json)
and every forecast run (forecast_metrics.json and its plots), and writes report.md, flops.csv,
flops.md and PNG files into --out.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flops
from experiments.lib import cli, errors, plots, reporting
from experiments.lib import runs as run_args


def main(argv: list[str] | None = None) -> Path:
    p = run_args.script_parser(__doc__)
    p.add_argument("--runs", default="runs", help="folder searched (recursively) for run folders")
    p.add_argument("--ledger", default=flops.DEFAULT_LEDGER, help="the FLOP ledger to report")
    p.add_argument("--budget", type=run_args.finite_positive_float, default=flops.DEFAULT_BUDGET,
                   help="total FLOP budget (for the percentages)")
    p.add_argument("--out", default="runs/report", help="folder the report is written to")
    args = p.parse_args(argv)
    if not Path(args.runs).is_dir():
        raise errors.UsageError(f"--runs {args.runs}: no such folder")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs)
    sections = ["# qwen-lora-ts report\n"]

    # ---- FLOPs
    ledger = flops.Ledger(args.ledger, budget=args.budget)
    (out / "flops.md").write_text(flops.report_markdown(ledger))
    (out / "flops.csv").write_text(flops.report_csv(ledger))
    sections += ["## FLOPs by experiment\n", flops.report_markdown(ledger)]

    # ---- training runs
    train_runs = sorted(d.parent for d in runs.rglob("summary.json") if (d.parent / "metrics.jsonl").is_file())
    train_runs = [d for d in train_runs if out not in d.parents]
    if train_runs:
        summaries = [(d, json.loads((d / "summary.json").read_text())) for d in train_runs]
        rows = [[str(d), s["lr"], s["rank"], s["context_length"], s["steps"], s["select_by"], s["best_step"],
                 s["best_val"].get("relative_score"), s["val_loss"], f"{s['flops']:.3e}"] for d, s in summaries]
        sections += ["\n## Training runs\n", reporting.md_table(
            ["run", "lr", "rank", "context", "steps", "kept by", "best step", "val relative score", "val CE",
             "FLOPs"], rows)]
        try:
            plots.plot_loss_curves(out / "loss_curves.png", train_runs)
            sections.append("\n![loss curves](loss_curves.png)")
        except ImportError as e:
            print(f"no loss-curve plot: {e}")

    # ---- evaluations
    evals = sorted(runs.rglob("eval_metrics.json"))
    if evals:
        rows = [[str(f.parent)] + [m.get(k) for k in ("split", "adapter", "loss", "scored_tokens")]
                for f in evals for m in [json.loads(f.read_text())]]
        sections += ["\n## Cross-entropy\n", reporting.md_table(["run", "split", "adapter", "CE", "scored tokens"],
                                                                  rows)]

    # ---- forecasts
    for f in sorted(runs.rglob("forecast_metrics.json")):
        if out in f.parents:
            continue
        m = json.loads(f.read_text())
        sections += [f"\n## Forecasts: {f.parent}\n", reporting.forecast_table(m)]
        for png in sorted(f.parent.glob("*.png")):
            target = out / f"{f.parent.name}_{png.name}"
            shutil.copy(png, target)
            sections.append(f"\n![{png.stem}]({target.name})")
    (out / "report.md").write_text("\n".join(sections) + "\n")
    print(f"wrote {out / 'report.md'}")
    return out / "report.md"


if __name__ == "__main__":
    sys.exit(cli.run_as_script(main))

"""One folder with everything a write-up needs: the FLOP table, the metrics tables and the plots.

    python experiments/report.py --runs runs --out runs/report

Reads the ledger (every experiment's FLOPs, totals and percent of the budget), every training run
under --runs (summary.json, metrics.jsonl -> loss curves), every evaluation (eval_metrics.json)
and every forecast run (forecast_metrics.json and its plots), and writes report.md, flops.csv,
flops.md, loss_curves.png, the forecast runs' plots (<run>_<plot>.png) and report_args.json (the
command line; it marks the folder as report.py's) into --out, printing each file it wrote. Each is
written whole (a temporary name, then a rename).

Running it again regenerates the report in place. It holds --out/.lock while it writes, and is refused
while another script holds it (a study writing there); an --out holding report.md, loss_curves.png, ...
that report.py did not write (a study's own) is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flops
from experiments.lib import errors, files, plots, reporting
from experiments.lib.run import cli
from experiments.lib.run.flagtypes import finite_positive_float
from experiments.lib.run.folder import holding_run

# The files report.py writes in --out (beside a forecast run's copied plots, <run>_<plot>.png).
OWN_FILES = ("report_args.json", "flops.md", "flops.csv", "loss_curves.png", "report.md")


def build_parser() -> argparse.ArgumentParser:
    p = cli.script_parser(__doc__)
    p.add_argument("--runs", default="runs", help="folder searched (recursively) for run folders")
    p.add_argument("--ledger", default=flops.DEFAULT_LEDGER, help="the FLOP ledger to report")
    p.add_argument("--budget", type=finite_positive_float, default=flops.DEFAULT_BUDGET,
                   help="total FLOP budget (for the percentages)")
    p.add_argument("--out", default="runs/report",
                   help="folder the report is written to (an earlier report there is regenerated)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out whose report.md, loss_curves.png, ... report.py did not write (e.g. a "
                        "study's own report), replacing them")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if not Path(args.runs).is_dir():
        raise errors.UsageError(f"--runs {args.runs}: no such folder")
    out, runs = Path(args.out), Path(args.runs)
    train_runs = sorted(d.parent for d in runs.rglob("summary.json") if (d.parent / "metrics.jsonl").is_file())
    train_runs = [d for d in train_runs if out not in d.parents]
    evals = sorted(runs.rglob("eval_metrics.json"))
    forecasts = [f for f in sorted(runs.rglob("forecast_metrics.json")) if out not in f.parents]
    copies = {f: [(png, out / f"{f.parent.name}_{png.name}") for png in sorted(f.parent.glob("*.png"))
                  if not png.name.startswith(".")]   # (not a plot a killed write left under a temporary name)
              for f in forecasts}
    with holding_run(out):   # (refused while another script holds --out; held while writing)
        check_out(out, [out / name for name in OWN_FILES] + [t for pairs in copies.values() for _, t in pairs],
                    overwrite=args.overwrite)
        wrote = [files.write_json(out / "report_args.json", {"argv": sys.argv, **vars(args)})]
        sections = ["# qwen-lora-ts report\n"]

        # ---- FLOPs
        ledger = flops.Ledger(args.ledger, budget=args.budget)
        wrote.append(files.write_text(out / "flops.md", flops.report_markdown(ledger)))
        wrote.append(files.write_text(out / "flops.csv", flops.report_csv(ledger)))
        sections += ["## FLOPs by experiment\n", flops.report_markdown(ledger)]

        # ---- training runs
        if train_runs:
            summaries = [(d, json.loads((d / "summary.json").read_text())) for d in train_runs]
            rows = [[str(d), s["lr"], s["rank"], s["context_length"], s["steps"], s["select_by"], s["best_step"],
                     s["best_val"].get("relative_score"), s["val_loss"], f"{s['flops']:.3e}"] for d, s in summaries]
            sections += ["\n## Training runs\n", reporting.md_table(
                ["run", "lr", "rank", "context", "steps", "kept by", "best step", "val relative score", "val CE",
                 "FLOPs"], rows),
                         "\n### Each run against the untrained model (its kept evaluation's validation forecasts)\n",
                         "Paired differences of filled-in MAE per horizon block, ± SE, in brackets the systems "
                         "improved and the median per-system difference (negative: better than the untrained "
                         "model):\n",
                         reporting.lever_table(train_runs)]
            try:
                with files.writing(out / "loss_curves.png") as tmp:
                    plots.plot_loss_curves(tmp, train_runs)
                wrote.append(out / "loss_curves.png")
                sections.append("\n![loss curves](loss_curves.png)")
            except ImportError as e:
                print(f"no loss-curve plot: {e}")

        # ---- evaluations
        if evals:
            rows = [[str(f.parent)] + [m.get(k) for k in ("split", "adapter", "loss", "scored_tokens")]
                    for f in evals for m in [json.loads(f.read_text())]]
            sections += ["\n## Cross-entropy\n", reporting.md_table(
                ["run", "split", "adapter", "CE", "scored tokens"], rows)]

        # ---- forecasts
        for f in forecasts:
            m = json.loads(f.read_text())
            sections += [f"\n## Forecasts: {f.parent}\n", reporting.forecast_table(m)]
            for png, target in copies[f]:
                wrote.append(files.write_bytes(target, png.read_bytes()))
                sections.append(f"\n![{png.stem}]({target.name})")
        wrote.append(files.write_text(out / "report.md", "\n".join(sections) + "\n"))
    for path in wrote:
        print(f"wrote {path}")
    return out / "report.md"


def check_out(out: Path, targets: list[Path], *, overwrite: bool) -> None:
    """Refuse (nothing written) an --out holding files report.py would replace but did not write: no
    report_args.json beside them (a study's report.md and loss_curves.png, say), unless --overwrite. An
    earlier report there is regenerated: that is what report.py is for."""
    if overwrite or (out / "report_args.json").is_file():
        return
    taken = [t.name for t in targets if t.exists()]
    if taken:
        raise errors.RunFolderError(f"--out {out} already holds {', '.join(taken)}, not written by report.py (no "
                                    f"report_args.json there): pass --overwrite to replace them, or choose another "
                                    f"--out")


if __name__ == "__main__":
    sys.exit(cli.run_as_script(main))

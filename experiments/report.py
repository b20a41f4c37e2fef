"""One folder with everything a write-up needs: the FLOP table, the metrics tables and the plots.

    python experiments/report.py --runs runs --out runs/report

Reads the ledger (every experiment's FLOPs, totals and percent of the budget), every training run
under --runs (summary.json, metrics.jsonl -> loss curves), every evaluation (eval_metrics.json)
and every forecast run (forecast_metrics.json and its plots), and writes report.md, flops.csv,
flops.md and PNG files into --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flops
from experiments.lib.runs import DEFAULT_LEDGER


def md_table(rows: list[dict], fields: list[str]) -> str:
    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)

    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in fields) + " |" for r in rows]
    return "\n".join(lines)


def loss_curves(train_runs: list[Path], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no loss-curve plot")
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in train_runs:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        for kind, style in (("train", "-"), ("val", "o--")):
            pts = [(r["step"], r["loss"]) for r in rows if r["kind"] == kind]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=f"{run.name} {kind}", alpha=0.8, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs", help="folder searched (recursively) for run folders")
    p.add_argument("--ledger", default=DEFAULT_LEDGER)
    p.add_argument("--budget", type=float, default=1e17)
    p.add_argument("--out", default="runs/report")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs)
    sections = ["# qwen-lora-ts report\n"]

    # ---- FLOPs
    ledger = flops.Ledger(args.ledger, budget=args.budget)
    (out / "flops.md").write_text(ledger.report_markdown())
    (out / "flops.csv").write_text(ledger.report_csv())
    sections += ["## FLOPs by experiment\n", ledger.report_markdown()]

    # ---- training runs
    train_runs = sorted(d.parent for d in runs.rglob("summary.json") if (d.parent / "metrics.jsonl").is_file())
    train_runs = [d for d in train_runs if out not in d.parents]
    if train_runs:
        rows = [dict(json.loads((d / "summary.json").read_text()), run=str(d)) for d in train_runs]
        sections += ["\n## Training runs\n", md_table(rows, ["run", "lr", "rank", "context_length", "steps",
                                                             "best_step", "val_loss", "flops"])]
        if loss_curves(train_runs, out / "loss_curves.png"):
            sections.append("\n![loss curves](loss_curves.png)")

    # ---- evaluations
    evals = sorted(runs.rglob("eval_metrics.json"))
    if evals:
        rows = [dict(json.loads(f.read_text()), run=str(f.parent)) for f in evals]
        sections += ["\n## Cross-entropy\n", md_table(rows, ["run", "split", "adapter", "loss", "scored_tokens"])]

    # ---- forecasts
    for f in sorted(runs.rglob("forecast_metrics.json")):
        if out in f.parents:
            continue
        m = json.loads(f.read_text())
        rows = [{"model": name, **{k: v for k, v in s.items() if not isinstance(v, (list, dict))}}
                for name, s in m.get("summary", {}).items()]
        sections += [f"\n## Forecasts: {f.parent}\n", md_table(rows, list(rows[0]) if rows else ["model"])]
        for png in sorted(f.parent.glob("*.png")):
            target = out / f"{f.parent.name}_{png.name}"
            shutil.copy(png, target)
            sections.append(f"\n![{png.stem}]({target.name})")
    (out / "report.md").write_text("\n".join(sections) + "\n")
    print(f"wrote {out / 'report.md'}")
    return out / "report.md"


if __name__ == "__main__":
    main()

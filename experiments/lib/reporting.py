"""Markdown for report.py and study.py: tables of runs and forecast scores, and the study's report.md.

The study's test comparison puts the untrained model and the baselines (zeroshot_test/) beside the
final adapter (final_test/), all forecast on the same test systems from the same prompts, and
scores them together with ``metrics.compare``, so the paired differences are system by system.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import flops
from experiments.lib import errors, files, plots
from experiments.lib.run.metrics_log import read_rows
from experiments.lib.science import metrics


def fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pm(value: float | None, se: float | None) -> str:
    """value ± standard error."""
    return "–" if value is None else f"{value:.4f} ± {se:.4f}" if se is not None else f"{value:.4f}"


def forecast_table(scores: dict[str, Any]) -> str:
    """Per forecaster: filled-in MAE (first 10 steps and all), coverage, relative score, CRPS; its MAE
    per horizon block and variable; then the paired differences of the trained model against every
    other, per block, with the systems it beats."""
    rows = [[name, pm(r.get("mae_h1_10", r["mae"]), r.get("mae_h1_10_se", r["mae_se"])), pm(r["mae"], r["mae_se"]),
             fmt(r["coverage"], 3), pm(r["relative_score"], r["relative_score_se"]),
             pm(r.get("crps"), r.get("crps_se"))] for name, r in scores["summary"].items()]
    table = md_table(["forecaster", "MAE h1–10", "MAE h1–H", "coverage", "relative score", "CRPS"], rows)
    blocks = [b for b in next(iter(scores["summary"].values()), {}).get("blocks", {})]
    if blocks:
        head = ["filled-in MAE"] + [f"{v} {label(b)}" for v in ("prey", "predator") for b in blocks]
        rows = [[name] + [fmt(r["blocks"][b][f"{v}_mae"], 3) for v in ("prey", "predator") for b in blocks]
                for name, r in scores["summary"].items()]
        table += "\n\nPer horizon block and variable (original units):\n\n" + md_table(head, rows)
    paired = [[pair] + [block_diff(d, b) for b in blocks]
              + [diff(d["mae_diff"], d["mae_diff_se"], d["better"], d["systems"], d.get("median")),
                 pm(d["common_mae_diff"], d["common_mae_diff_se"])]
              for pair, d in scores.get("paired", {}).items() if pair.startswith("trained")]
    if not paired:
        return table
    return table + ("\n\nPaired differences of filled-in MAE, system by system (negative: the first is better; "
                    "in brackets the systems it is better on and the median per-system difference):\n\n") + md_table(
        ["a - b"] + [f"MAE {label(b)}" for b in blocks] + ["MAE h1–H", "common-support MAE"], paired)


def label(block: str) -> str:
    """"h11_25" -> "h11–25"."""
    return block.replace("_", "–")


def diff(value: float | None, se: float | None, better: int, systems: int, median: float | None = None) -> str:
    """A paired difference ± SE with the systems it improves and, where recorded, the median
    per-system difference: "-0.250 ± 0.093 (25/32, median -0.210)"."""
    if value is None:
        return "–"
    middle = "" if median is None else f", median {median:+.3f}"
    return f"{value:+.3f} ± {se or 0:.3f} ({better}/{systems}{middle})"


BLOCKS = tuple(f"h{a}_{b}" for a, b in metrics.HORIZON_BLOCKS)


def block_diff(paired: dict, block: str) -> str:
    """One block of a ``vs_untrained`` figure (as ``metrics.paired_difference`` gives it); "–" past the horizon."""
    b = paired["blocks"].get(block)
    return diff(b["mae_diff"], b["se"], b["better"], paired["systems"], b.get("median")) if b else "–"


def vs_untrained_cells(paired: dict | None) -> list[str]:
    """A ``vs_untrained`` figure (metrics.jsonl, summary.json) as four cells: h1–10, h11–25, h26–50, h1–50."""
    if not paired:
        return ["–"] * 4
    return [block_diff(paired, k) for k in BLOCKS] + [diff(paired["mae_diff"], paired["se"], paired["better"],
                                                           paired["systems"], paired.get("median"))]


def evaluation_line(step: int, figures: dict) -> str:
    """One evaluation's validation forecasts as train.py prints them: filled-in MAE, relative score
    and, after step 0, the paired difference to the untrained model per block and overall."""
    line = f"step {step}{' (untrained)' if step == 0 else ''}: val MAE {fmt(figures.get('mae'), 3)}, " \
           f"relative score {fmt(figures.get('relative_score'), 3)}"
    paired = figures.get("vs_untrained")
    if paired and step > 0:
        cells = vs_untrained_cells(paired)
        line += "; vs untrained " + ", ".join(f"{name} {c}" for name, c in
                                              zip([*map(label, BLOCKS), "all"], cells, strict=True) if c != "–")
    return line


def lever_table(run_dirs: list[Path]) -> str:
    """One row per training run: its settings, the evaluation it kept and that evaluation's paired
    difference to the untrained model's validation forecasts per horizon block (metrics.jsonl's
    ``vs_untrained``), with the FLOPs the run charged and its wall time."""
    rows = []
    for d in run_dirs:
        s = json.loads((d / "summary.json").read_text())
        # the run's arguments; a run folder without them (written by hand, or by another tool) shows its summary
        a = {**s, **(json.loads((d / "train_args.json").read_text()) if (d / "train_args.json").is_file() else {})}
        kept = next((e for e in read_rows(d, "val_forecast") if e["step"] == s["best_step"]), {})
        rows.append([d.name, a.get("lr"), a.get("schedule", "–"), a.get("rank"), a.get("context_length"),
                     {True: "yes", False: "no"}.get(a.get("train_lm_head_bias"), "–"), s["steps"], s["best_step"],
                     fmt(kept.get("mae"), 3), *vs_untrained_cells(kept.get("vs_untrained")),
                     f"{s['flops']:.2e}", f"{s['wall_s'] / 60:.1f}" if s.get("wall_s") else "–"])
    return md_table(["run", "lr", "schedule", "rank", "context", "lm_head bias", "steps", "kept step", "val MAE",
                     "vs untrained h1–10", "h11–25", "h26–50", "h1–50", "FLOPs", "wall (min)"], rows)


def read_forecasts(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """(forecasts, samples, bands, arrays) of a forecasts.h5: name -> (N, H, 2), (N, S, H, 2), (N, 2, H, 2),
    and the shared arrays (system_ids, truth, prompt, time)."""
    forecasts, samples, bands = {}, {}, {}
    with h5py.File(path) as f:
        arrays = {k: f[k][()] for k in ("system_ids", "truth", "prompt", "time")}
        for name, g in f.items():
            if isinstance(g, h5py.Group):
                forecasts[name] = g["forecast"][()]
                if "band" in g:
                    bands[name] = g["band"][()]
                if "samples" in g:
                    samples[f"{name}_median"] = g["samples"][()]
    return forecasts, samples, bands, arrays


def test_comparison(out: Path) -> dict[str, Any]:
    """The untrained model and the baselines (zeroshot_test) beside the final adapter (final_test), scored together."""
    zs, zs_samples, zs_bands, arrays = read_forecasts(out / "zeroshot_test" / "forecasts.h5")
    tr, tr_samples, tr_bands, arrays_tr = read_forecasts(out / "final_test" / "forecasts.h5")
    if not np.array_equal(arrays["system_ids"], arrays_tr["system_ids"]):
        raise errors.RunFolderError(
            f"{out}: zeroshot_test forecast systems {arrays['system_ids'].tolist()} but final_test "
            f"{arrays_tr['system_ids'].tolist()}; remove {out / 'final_test'} and run the study again to forecast "
            f"the same systems")
    forecasts = {**zs, **{k: v for k, v in tr.items() if k.startswith("trained")}}
    samples = {**zs_samples, **{k: v for k, v in tr_samples.items() if k.startswith("trained")}}
    scores = metrics.compare(forecasts, arrays["truth"], arrays["prompt"][:, -1], samples=samples)
    return {"scores": scores, "forecasts": forecasts, "bands": {**zs_bands, **tr_bands}, "arrays": arrays}


def charged_by_run(ledger: flops.Ledger) -> dict[str, float]:
    """FLOPs charged per experiment name (every kind: training, evaluations, generation)."""
    out: dict[str, float] = {}
    for e in ledger.entries():
        out[e.name] = out.get(e.name, 0.0) + e.flops
    return out


def write_study_report(out: Path, *, ledger: flops.Ledger, plan: dict, choices: dict, seconds: float,
                       model: str) -> Path:
    """report.md, test_metrics.json and the plots of a finished study in ``out``; returns the report's path."""
    sections = [f"# Study report: {out}\n",
                f"Model: `{model}`. Wall time of this invocation: {seconds / 60:.1f} min.\n"]

    # ---- FLOPs: every run, generation included: the bound reserved first, the price once its choices
    # were made (generation at its token limit), what it charged, and the gap
    charged, spent = charged_by_run(ledger), ledger.spent()
    by_item = [charged.get(i["name"].replace("/", "_"), 0.0) for i in plan["items"]]
    rows = [[i["name"], i["script"], f"{i.get('bound', i['flops']):.4e}", f"{i['flops']:.4e}",
             f"{i.get('generation', 0.0):.4e}", f"{c:.4e}", f"{i['flops'] - c:.4e}", f"{c / ledger.budget:.4%}"]
            for i, c in zip(plan["items"], by_item, strict=True)]
    total = sum(by_item)
    sections += ["## FLOPs\n", md_table(["run", "script", "bound (reserved)", "price", "of it generation",
                                         "charged", "price - charged", "% of budget"], rows),
                 f"\nReserved before anything ran: {plan.get('bound', plan['planned_flops']):.4e} FLOPs, every choice "
                 f"not yet made at its most expensive option. Priced, each run once its choices were made: "
                 f"{plan['planned_flops']:.4e}, exact for training steps and cross-entropy evaluations, generation "
                 f"at its token limit. Charged by these runs: {total:.4e} ({total / plan['planned_flops'] - 1:+.4%} "
                 f"against the price): the gap is generation stopping at the horizon, decoding less than its "
                 f"limit. The ledger holds {spent:.4e} in all, {spent / ledger.budget:.2%} of the "
                 f"{ledger.budget:.3g} budget. The ledger in full:\n", flops.report_markdown(ledger)]

    # ---- the choices, by the validation forecasts
    head = ["run", "lr", "rank", "context", "steps", "best step", "val MAE", "vs untrained h1–10", "h11–25",
            "h26–50", "h1–50", "val relative score", "val CE"]

    def row(r: dict) -> list:
        # the kept evaluation's paired difference to the untrained model (None: the untrained model itself)
        return [r["name"], r["lr"], r["rank"], r["context_length"], r["steps"], r["best_step"], r["score"],
                *vs_untrained_cells(r.get("vs_untrained")), r["relative_score"], r["val_loss"]]

    u, final = choices["untrained"], choices["final"]
    sections += [f"## Learning rate x rank (validation forecasts of {len(choices['grid'])} runs)\n",
                 md_table(head, [row(u)] + [row(r) for r in choices["grid"]]),
                 f"\nChosen: lr {choices['best']['lr']:g}, rank {choices['best']['rank']}.\n",
                 "## Context length (validation forecasts)\n",
                 md_table(head, [row(r) for r in choices["contexts"]]) if choices["contexts"] else
                 "No context runs in this preset: the grid's window.\n",
                 f"\nChosen: {choices['context_length']} tokens.\n", "## Final run\n", md_table(head, [row(final)]),
                 "\n" + ("The final run's best validation forecasts were the untrained model's (step 0): its "
                         "adapter is the untrained model, training did not improve the validation forecasts."
                         if final["best_step"] == 0 else f"The final adapter is step {final['best_step']}'s.") + "\n"]

    # ---- the test systems
    test = test_comparison(out)
    files.write_json(out / "test_metrics.json", test["scores"])
    sections += ["## Test systems: untrained vs final adapter vs baselines\n", forecast_table(test["scores"])]
    arrays = test["arrays"]
    series = np.concatenate([arrays["prompt"], arrays["truth"]], axis=1)
    try:
        shown = {k: v for k, v in test["forecasts"].items()
                 if k in ("untrained", "trained", "trained_median", "persistence", "ode_fit")}
        with files.writing(out / "test_examples.png") as tmp:
            plots.plot_examples(tmp, series, arrays["prompt"].shape[1], shown, test["bands"],
                                system_ids=arrays["system_ids"])
        with files.writing(out / "test_error_vs_horizon.png") as tmp:
            plots.plot_error_vs_horizon(tmp, test["scores"]["summary"])
        train_runs = sorted(p.parent for p in out.glob("**/summary.json"))
        with files.writing(out / "loss_curves.png") as tmp:
            plots.plot_loss_curves(tmp, train_runs)
        sections += ["\n![example forecasts](test_examples.png)\n", "![error vs horizon](test_error_vs_horizon.png)\n",
                     "![loss curves](loss_curves.png)\n"]
    except ImportError as e:
        sections.append(f"\n(no plots: {e})\n")
    path = files.write_text(out / "report.md", "\n".join(sections) + "\n")
    print(f"[study] wrote {path}\n" + forecast_table(test["scores"]), flush=True)
    return path

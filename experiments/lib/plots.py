"""PNG plots: example forecasts with their bands, error against horizon, training curves.

matplotlib is an optional dependency (``pip install -e '.[plot]'``), imported only when a plot is
drawn and always with the file-only Agg backend, so forecasting works on machines without it or
without a display.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from experiments.lib.metrics import VARIABLES


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install -e '.[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_examples(path: str | os.PathLike, time: np.ndarray, series: np.ndarray, C: int,
                  forecasts: dict[str, np.ndarray], bands: dict[str, np.ndarray] | None = None,
                  max_systems: int = 4) -> None:
    """The first ``max_systems`` systems, one row each, prey and predator side by side: the true
    series, the prompt end (dashed line), every forecast (N, H, 2) after it, and for forecasts
    named in ``bands`` their (N, 2, H, 2) lower/upper band shaded."""
    plt = _pyplot()
    time, series = np.asarray(time), np.asarray(series)
    bands = bands or {}
    n = min(max_systems, series.shape[0])
    fig, axes = plt.subplots(n, 2, figsize=(11, 2.6 * n), squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i in range(n):
        for v, name in enumerate(VARIABLES):
            ax = axes[i, v]
            ax.plot(time, series[i, :, v], color="black", lw=1.2, label="truth")
            ax.axvline(time[C - 1], color="grey", ls="--", lw=0.8)
            for j, (label, pred) in enumerate(forecasts.items()):
                H = pred.shape[1]
                t_future, color = time[C:C + H], colors[j % len(colors)]
                ax.plot(t_future, pred[i, :, v], color=color, lw=1.0, label=label)
                if label in bands:
                    ax.fill_between(t_future, bands[label][i, 0, :, v], bands[label][i, 1, :, v],
                                    color=color, alpha=0.2, lw=0)
            ax.set_title(f"system {i}: {name}", fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def spans_decades(values: list[float | None], factor: float = 100.0) -> bool:
    """True if the positive, finite values differ by more than ``factor`` (then plot them on a log axis)."""
    v = [x for x in values if x is not None and np.isfinite(x) and x > 0]
    return bool(v) and max(v) > factor * min(v)


def plot_error_vs_horizon(path: str | os.PathLike, summary: dict[str, dict[str, Any]], metric: str = "mae") -> None:
    """``metric`` (default MAE) against horizon step for every model in ``summary`` (name ->
    ``metrics.forecast_scores`` result), prey and predator in two panels, +-1 standard error shaded."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
    for v, name in enumerate(VARIABLES):
        ax = axes[0, v]
        if spans_decades([x for r in summary.values() for x in r["per_horizon"][name][metric]]):
            ax.set_yscale("log", nonpositive="clip")  # else an untrained model's errors flatten the rest
        for label, result in summary.items():
            block = result["per_horizon"][name]
            mean = np.array([np.nan if x is None else x for x in block[metric]], dtype=float)
            se = np.array([np.nan if x is None else x for x in block[f"{metric}_se"]], dtype=float)
            steps = np.arange(1, len(mean) + 1)
            (line,) = ax.plot(steps, mean, lw=1.2, label=label)
            ax.fill_between(steps, mean - se, mean + se, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(f"{name}: {metric.upper()} vs horizon", fontsize=10)
        ax.set_xlabel("steps ahead")
        ax.set_ylabel(metric.upper())
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss_curves(path: str | os.PathLike, runs: list[Path]) -> None:
    """Training and validation-subset cross-entropy against step for every training run folder in
    ``runs`` (its metrics.jsonl), and beside them each run's validation forecasts' relative score."""
    plt = _pyplot()
    fig, (ax, ax_f) = plt.subplots(1, 2, figsize=(12, 4))
    for run in runs:
        rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]
        label = f"{Path(run).parent.name}/{Path(run).name}" if Path(run).parent.name != "." else Path(run).name
        for kind, style, key, axis in (("train", "-", "loss", ax), ("val", "o--", "loss", ax),
                                       ("val_forecast", "o-", "relative_score", ax_f)):
            pts = [(r["step"], r[key]) for r in rows if r["kind"] == kind and r.get(key) is not None]
            if pts:
                axis.plot(*zip(*pts, strict=True), style, label=f"{label} {kind}", alpha=0.8, markersize=3)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="training and validation CE")
    ax_f.set(xlabel="optimizer step", ylabel="relative score (< 1 beats persistence)",
             title="validation forecasts")
    for a in (ax, ax_f):
        if a.lines:
            a.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

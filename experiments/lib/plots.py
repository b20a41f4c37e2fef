"""PNG plots: example forecasts with their bands, error against horizon, training curves.

matplotlib is an optional dependency (``pip install -e '.[plot]'``), imported only when a plot is
drawn and always with the file-only Agg backend, so forecasting works on machines without it or
without a display. Each plot writes its PNG and returns the (closed) figure, for tests to inspect.

Read at a glance: panels titled with the data's system ids, axes labelled with units, integer step
ticks, every curve its own colour, dash pattern and marker (markers offset, so coinciding curves
both show, and a title names forecasts that are identical or decoded nothing), sibling panels on the
same kind of axis, legends outside the axes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from experiments.lib.run.metrics_log import read_rows
from experiments.lib.science.metrics import VARIABLES


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install -e '.[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Line styles: colour, dash pattern and marker all change from one curve to the next, so curves stay
# apart in greyscale, where they coincide (markers offset along the line) and past the 10 colours.
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
          "tab:cyan", "tab:gray")
DASHES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "x", "P", "*", "<", ">")
UNITS = "population, data units"


def style(j: int, n_points: int = 0) -> dict[str, Any]:
    """Keyword arguments for ax.plot of the j-th curve: a colour, a dash pattern that changes every
    colour cycle, a marker; with ``n_points`` the markers are thinned and offset per curve, so two
    identical curves still show both markers."""
    kw: dict[str, Any] = dict(color=COLORS[j % len(COLORS)], ls=DASHES[(j + j // len(COLORS)) % len(DASHES)],
                              marker=MARKERS[j % len(MARKERS)], markersize=3.5, lw=1.1)
    if n_points:
        every = max(1, n_points // 8)
        kw["markevery"] = (j % every, every)
    return kw


def integer_steps(ax) -> None:
    """Integer ticks on the x axis (steps)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def legend_below(fig, handles: list, labels: list[str], ncol: int = 4):
    """One legend for the figure, below its axes, in a few columns (save with bbox_inches="tight")."""
    return fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                      ncol=max(1, min(ncol, len(labels))), fontsize=8, frameon=False)


def _same_groups(preds: dict[str, np.ndarray]) -> list[list[str]]:
    """Names whose arrays are equal (NaN equal to NaN), in groups of two or more."""
    groups: list[list[str]] = []
    for name, a in preds.items():
        for g in groups:
            if np.array_equal(preds[g[0]], a, equal_nan=True):
                g.append(name)
                break
        else:
            groups.append([name])
    return [g for g in groups if len(g) > 1]


def plot_examples(path: str | os.PathLike, series: np.ndarray, C: int, forecasts: dict[str, np.ndarray],
                  bands: dict[str, np.ndarray] | None = None, *, system_ids: Any, max_systems: int = 4):
    """The first ``max_systems`` systems, one row each, prey and predator side by side, against the
    time step: the true series (N, T, 2), the prompt/forecast divider (after step C - 1), every
    forecast (N, H, 2) from step C, and for forecasts named in ``bands`` their (N, 2, H, 2)
    lower/upper band shaded. Panels are titled with the data's ``system_ids`` (one per row of
    ``series``); a title also says which forecasts are identical and which decoded no step."""
    plt = _pyplot()
    series = np.asarray(series)
    system_ids = [int(x) for x in np.asarray(system_ids).reshape(-1)]
    if len(system_ids) != series.shape[0]:
        raise ValueError(f"{len(system_ids)} system ids for {series.shape[0]} series")
    bands = bands or {}
    n = min(max_systems, series.shape[0])
    fig, axes = plt.subplots(n, 2, figsize=(11, 2.7 * n), squeeze=False, sharex=True)
    steps = np.arange(series.shape[1])
    handles: dict[str, Any] = {}
    for i in range(n):
        preds = {k: np.asarray(p[i]) for k, p in forecasts.items()}
        notes = [" = ".join(g) + " identical" for g in _same_groups(preds)]
        if empty := [k for k, p in preds.items() if not np.isfinite(p).any()]:
            notes.append("nothing decoded: " + ", ".join(empty))
        for v, name in enumerate(VARIABLES):
            ax = axes[i, v]
            (handles["truth"],) = ax.plot(steps, series[i, :, v], color="black", lw=1.3, label="truth")
            handles["prompt | forecast"] = ax.axvline(C - 0.5, color="grey", ls=(0, (4, 3)), lw=0.9)
            for j, (label, pred) in enumerate(preds.items()):
                H = pred.shape[0]
                future = steps[C:C + H] if C + H <= len(steps) else np.arange(C, C + H)
                (handles[label],) = ax.plot(future, pred[:, v], **style(j, H), label=label)
                if label in bands:
                    handles[f"{label} 10–90% band"] = ax.fill_between(
                        future, bands[label][i, 0, :, v], bands[label][i, 1, :, v], color=COLORS[j % len(COLORS)],
                        alpha=0.2, lw=0)
            ax.set_title(f"system {system_ids[i]}: {name}" + (f" ({'; '.join(notes)})" if notes else ""),
                         fontsize=8.5)
            ax.set_ylabel(f"{name} ({UNITS})", fontsize=8)
            integer_steps(ax)
    for ax in axes[-1]:
        ax.set_xlabel("time step")
    fig.tight_layout()
    legend_below(fig, list(handles.values()), list(handles), ncol=4)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return fig


def spans_decades(values: list[float | None], factor: float = 100.0) -> bool:
    """True if the positive, finite values differ by more than ``factor`` (then plot them on a log axis)."""
    v = [x for x in values if x is not None and np.isfinite(x) and x > 0]
    return bool(v) and max(v) > factor * min(v)


def plot_error_vs_horizon(path: str | os.PathLike, summary: dict[str, dict[str, Any]], metric: str = "mae"):
    """``metric`` (default MAE) against horizon step for every model in ``summary`` (name ->
    ``metrics.forecast_scores`` result), prey and predator in two panels on the same kind of axis
    (both logarithmic when the errors span decades, which the label says), +-1 standard error shaded."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
    log = spans_decades([x for r in summary.values() for name in VARIABLES for x in r["per_horizon"][name][metric]])
    handles: list = []
    for v, name in enumerate(VARIABLES):
        ax = axes[0, v]
        if log:  # else an untrained model's errors flatten the rest
            ax.set_yscale("log", nonpositive="clip")
        handles = []
        means = {label: np.array([np.nan if x is None else x for x in r["per_horizon"][name][metric]], dtype=float)
                 for label, r in summary.items()}
        same = [" = ".join(g) for g in _same_groups(means)]
        for j, result in enumerate(summary.values()):
            block = result["per_horizon"][name]
            mean = np.array([np.nan if x is None else x for x in block[metric]], dtype=float)
            se = np.array([np.nan if x is None else x for x in block[f"{metric}_se"]], dtype=float)
            steps = np.arange(1, len(mean) + 1)
            kw = style(j, len(mean))
            (line,) = ax.plot(steps, mean, **kw)
            ax.fill_between(steps, mean - se, mean + se, color=kw["color"], alpha=0.15, lw=0)
            handles.append(line)
        note = f"\n(identical: {'; '.join(same)})" if same else ""
        ax.set_title(f"{name}: {metric.upper()} vs horizon (±1 SE){note}", fontsize=10)
        ax.set_xlabel("steps ahead (time steps)")
        ax.set_ylabel(f"{metric.upper()} ({UNITS}{', log scale' if log else ''})", fontsize=9)
        integer_steps(ax)
    fig.tight_layout()
    legend_below(fig, handles, list(summary), ncol=4)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return fig


def plot_loss_curves(path: str | os.PathLike, runs: list[Path]):
    """For every training run folder in ``runs`` (its metrics.jsonl): training (solid) and
    validation-subset (dashed, markers) cross-entropy against step, and beside them the run's
    validation forecasts' filled-in MAE (what selects the kept adapter). One row of panels per
    stage (the runs' parent folder, e.g. a study's grid/ and context/), so no panel holds more than
    a stage's runs; each row's legend sits outside its axes, a run in one colour and marker
    throughout the row."""
    plt = _pyplot()
    stages: dict[Path, list[Path]] = {}
    for run in runs:
        stages.setdefault(Path(run).parent, []).append(Path(run))
    fig, axes = plt.subplots(len(stages) or 1, 2, figsize=(12, 3.4 * max(1, len(stages))), squeeze=False)
    for row, (stage, members) in enumerate(stages.items()):
        ax, ax_f = axes[row]
        for j, run in enumerate(members):
            rows = read_rows(run)
            kw = style(j)
            for kind, axis, key, extra in (("train", ax, "loss", dict(marker=None, ls="-")),
                                           ("val", ax, "loss", dict(ls="--")),
                                           ("val_forecast", ax_f, "mae", dict(ls="-"))):
                pts = [(r["step"], r[key]) for r in rows if r["kind"] == kind and r.get(key) is not None]
                if pts:
                    axis.plot(*zip(*pts, strict=True), **{**kw, **extra}, alpha=0.85,
                              label=run.name if kind != "val" else None)
        where = members[0].name if len(members) == 1 else f"{stage.name}/"
        ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)",
               title=f"{where}: training CE (solid), validation CE (dashed)")
        ax_f.set(xlabel="optimizer step", ylabel="filled-in MAE (data units)",
                 title=f"{where}: validation forecasts (step 0: untrained)")
        for a in (ax, ax_f):
            a.title.set_fontsize(9)
            integer_steps(a)
        handles, labels = ax_f.get_legend_handles_labels()  # lines with their markers
        if not handles:
            handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax_f.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                        ncol=1 if len(labels) <= 12 else 2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return fig

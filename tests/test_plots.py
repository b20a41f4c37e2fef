"""The plots: non-empty PNG files a person reads at a glance (titles with the data's system ids,
labelled axes with units, integer step ticks, legends, distinguishable and flagged identical
curves, the same scale on sibling panels), and when the error axis goes logarithmic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.lib import plots
from experiments.lib.science import metrics


def _is_png(path, fig, dpi: int) -> bool:
    """The file is a PNG that decodes to an image drawn on (not blank) of about the figure's size at
    ``dpi`` (saved tight, so cropped or widened by a legend, by at most a third)."""
    from matplotlib import image

    if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    img = image.imread(path)
    width, height = fig.get_size_inches() * dpi
    return (img.ndim == 3 and abs(img.shape[1] - width) < width / 3 and abs(img.shape[0] - height) < height / 3
            and img[..., :3].std() > 0.05)


def _integer_ticks(ax) -> bool:
    from matplotlib.ticker import MaxNLocator

    loc = ax.xaxis.get_major_locator()
    return isinstance(loc, MaxNLocator) and loc._integer


@pytest.fixture
def forecasts():
    rng = np.random.default_rng(0)
    series = rng.uniform(0.5, 2.0, (3, 12, 2))
    truth = series[:, 8:12]
    fc = {"a": truth + 0.1, "b": np.where(rng.uniform(size=truth.shape) < 0.3, np.nan, truth)}
    fc["a_copy"] = fc["a"].copy()
    fc["nothing"] = np.full_like(truth, np.nan)
    median, band = metrics.median_and_band(truth[:, None] + rng.normal(0, 0.1, (3, 5, 4, 2)))
    fc["b_median"] = median
    return series, truth, fc, {"b_median": band}


def test_examples_plot(tmp_path, forecasts):
    pytest.importorskip("matplotlib")
    series, _, fc, bands = forecasts
    fig = plots.plot_examples(tmp_path / "ex.png", series, 8, fc, bands, system_ids=np.array([812, 17, 403]))
    assert _is_png(tmp_path / "ex.png", fig, 100)
    axes = np.array(fig.axes).reshape(3, 2)
    for i, sid in enumerate((812, 17, 403)):
        for v, name in enumerate(("prey", "predator")):
            ax = axes[i, v]
            assert ax.get_title().startswith(f"system {sid}: {name}")
            assert "a = a_copy identical" in ax.get_title() and "nothing decoded: nothing" in ax.get_title()
            assert ax.get_ylabel() == f"{name} (population, data units)"
            assert _integer_ticks(ax)
    assert [ax.get_xlabel() for ax in axes[-1]] == ["time step", "time step"]
    [legend] = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert {"truth", "prompt | forecast", "a", "a_copy", "b_median", "b_median 10–90% band"} <= set(labels)
    # every forecast its own colour, dash pattern and marker, the identical pair included
    for i in range(3):   # the truth and every forecast, each at its own steps
        for v in range(2):
            drawn = {ln.get_label(): ln for ln in axes[i, v].lines}
            assert np.array_equal(drawn["truth"].get_ydata(), series[i, :, v])
            for name, pred in fc.items():
                assert list(drawn[name].get_xdata()) == [8, 9, 10, 11]
                assert np.array_equal(drawn[name].get_ydata(), pred[i, :, v], equal_nan=True)
    lines = {ln.get_label(): ln for ln in axes[0, 0].lines}
    styles = [(plots.style(j)["color"], plots.style(j)["ls"], plots.style(j)["marker"]) for j in range(len(fc))]
    assert len(set(styles)) == len(fc)
    assert lines["a"].get_marker() != lines["a_copy"].get_marker()
    with pytest.raises(ValueError, match="2 system ids for 3 series"):
        plots.plot_examples(tmp_path / "x.png", series, 8, fc, system_ids=[1, 2])


def test_error_vs_horizon_plot(tmp_path, forecasts):
    pytest.importorskip("matplotlib")
    series, truth, fc, _ = forecasts
    summary = metrics.compare({k: v for k, v in fc.items() if k != "nothing"}, truth, series[:, 7])["summary"]
    fig = plots.plot_error_vs_horizon(tmp_path / "err.png", summary)
    assert _is_png(tmp_path / "err.png", fig, 100)
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "linear"]
    for ax in fig.axes:
        assert ax.get_xlabel() == "steps ahead (time steps)" and ax.get_ylabel() == "MAE (population, data units)"
        assert _integer_ticks(ax)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(summary)
    for ax, variable in zip(fig.axes, ("prey", "predator"), strict=True):   # each model's MAE at each step ahead
        for line, (name, scores) in zip(ax.lines, summary.items(), strict=True):
            assert list(line.get_xdata()) == [1, 2, 3, 4], name
            assert list(line.get_ydata()) == scores["per_horizon"][variable]["mae"], name
        drawn = dict(zip(summary, ax.lines, strict=True))
        assert drawn["a"].get_ydata() == pytest.approx([0.1] * 4)   # (a is the truth + 0.1 everywhere)
    assert all("(identical: a = a_copy)" in ax.get_title() for ax in fig.axes)  # two curves, one line
    # errors spanning decades in one variable only: both panels logarithmic, and the labels say so
    summary["tiny"] = json.loads(json.dumps(summary["a"]))
    summary["tiny"]["per_horizon"]["prey"]["mae"] = [1e-5] * 4
    fig = plots.plot_error_vs_horizon(tmp_path / "err.png", summary)
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log"]
    assert all(ax.get_ylabel().endswith("log scale)") for ax in fig.axes)


def test_loss_curves_one_row_per_stage(tmp_path):
    pytest.importorskip("matplotlib")
    runs = []
    for stage, names in (("grid", ["lr1e-05_r2", "lr1e-05_r4", "lr5e-05_r2"]), ("context", ["ctx128", "ctx512"])):
        for k, name in enumerate(names):
            d = tmp_path / "study" / stage / name
            d.mkdir(parents=True)
            rows = [{"kind": "train", "step": s, "loss": 1.0 - 0.01 * s * k} for s in range(1, 5)]
            rows += [{"kind": "val", "step": s, "loss": 0.9} for s in (0, 4)]
            rows += [{"kind": "val_forecast", "step": s, "mae": 0.5 + k * s, "relative_score": 9.0} for s in (0, 4)]
            (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
            runs.append(d)
    fig = plots.plot_loss_curves(tmp_path / "curves.png", runs)
    assert _is_png(tmp_path / "curves.png", fig, 110)
    axes = np.array(fig.axes).reshape(2, 2)
    assert axes[0, 0].get_title().startswith("grid/")
    assert axes[1, 1].get_title() == "context/: validation forecasts (step 0: untrained)"
    assert [t.get_text() for t in axes[0, 1].get_legend().get_texts()] == ["lr1e-05_r2", "lr1e-05_r4", "lr5e-05_r2"]
    assert all(_integer_ticks(ax) and ax.get_xlabel() == "optimizer step" for ax in axes.flat)
    assert axes[0, 0].get_ylabel() == "cross-entropy (nats/token)"
    assert axes[0, 1].get_ylabel() == "filled-in MAE (data units)"   # the selection criterion, not the relative score
    line = axes[0, 1].get_lines()[2]                                 # grid's third run: MAE 0.5 + 2 * step
    assert list(line.get_xdata()) == [0, 4] and list(line.get_ydata()) == [0.5, 8.5]


def test_error_plot_axis_goes_logarithmic_when_errors_span_decades():
    assert plots.spans_decades([0.005, 0.01, None, 3.0])  # an ODE fit beside an untrained model
    assert not plots.spans_decades([0.2, 0.5, 1.9, None, float("nan"), 0.0])
    assert not plots.spans_decades([None])

"""The plots: non-empty PNG files, and when the error axis goes logarithmic."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.lib import metrics, plots


def test_plots_write_nonempty_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    time = np.linspace(0, 10, 12)
    series = rng.uniform(0.5, 2.0, (3, 12, 2))
    truth = series[:, 8:12]
    forecasts = {"a": truth + 0.1, "b": np.where(rng.uniform(size=truth.shape) < 0.3, np.nan, truth)}
    median, band = metrics.median_and_band(truth[:, None] + rng.normal(0, 0.1, (3, 5, 4, 2)))
    forecasts["b_median"] = median
    plots.plot_examples(tmp_path / "ex.png", time, series, 8, forecasts, {"b_median": band})
    summary = metrics.compare(forecasts, truth, series[:, 7])["summary"]
    plots.plot_error_vs_horizon(tmp_path / "err.png", summary)
    for name in ("ex.png", "err.png"):
        data = (tmp_path / name).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_error_plot_axis_goes_logarithmic_when_errors_span_decades():
    assert plots.spans_decades([0.005, 0.01, None, 3.0])  # an ODE fit beside an untrained model
    assert not plots.spans_decades([0.2, 0.5, 1.9, None, float("nan"), 0.0])
    assert not plots.spans_decades([None])

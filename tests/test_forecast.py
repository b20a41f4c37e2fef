"""forecast.py end to end on a tiny checkpoint: every model and baseline on the trained run's own
test systems, the files it writes, and one ledger entry per model and mode."""

from __future__ import annotations

import json

import h5py
import numpy as np

from experiments import forecast, train
from experiments.lib import baselines
from experiments.lib.lotka_volterra import load_h5
from flops import Ledger
from tests.conftest import script_argv


def test_forecast_script_end_to_end(tmp_path, tiny_ckpt, lv_data_file, monkeypatch):
    monkeypatch.setattr(baselines, "ODE_STEPS", 20)  # the fit's quality is tested in test_baselines.py
    run, out = tmp_path / "run", tmp_path / "fc"
    train.main(script_argv(tiny_ckpt, lv_data_file, run, "--max-systems", 2, "--context-length", 128,
                           "--batch-size", 2, "--lr", 0.3, "--max-steps", 6, "--eval-every", 0, "--val-systems", 2,
                           "--train-lm-head-bias"))
    rep = forecast.main(script_argv(tiny_ckpt, lv_data_file, out, "--adapter", run / "adapter", "--max-systems", 3,
                                    "--context-steps", 20, "--horizon", 4, "--samples", 2))
    models = {"untrained", "trained", "untrained_median", "trained_median", "persistence", "linear_ar", "ode_fit"}
    assert set(rep["summary"]) == models
    for m in models:
        assert rep["summary"][m]["systems"] == 3 and rep["summary"][m]["horizon"] == 4
    assert "trained_vs_untrained" in rep["paired"]
    # the test systems of the trained run's own split
    assert rep["systems"] == json.loads((run / "splits.json").read_text())["test"][:3]
    traj, _ = load_h5(lv_data_file)
    with h5py.File(out / "forecasts.h5") as f:
        assert f["truth"].shape == (3, 4, 2) and f["trained/forecast"].shape == (3, 4, 2)
        assert f["trained/samples"].shape == (3, 2, 4, 2)
        assert np.array_equal(f["truth"][()], traj[rep["systems"], 20:24])
        assert np.array_equal(f["prompt"][()], traj[rep["systems"], :20])
    for png in ("examples.png", "error_vs_horizon.png"):
        assert (out / png).stat().st_size > 1000
    # the ledger: one entry per model and mode, holding what the forecasts spent
    entries = [e for e in Ledger(tmp_path / "ledger.jsonl").entries() if e.kind == "forecast"]
    assert sorted((e.config["model"], e.config["mode"]) for e in entries) == [
        ("trained", "greedy"), ("trained", "samples"), ("untrained", "greedy"), ("untrained", "samples")]
    for name in ("trained", "untrained"):
        assert sum(e.flops for e in entries if e.config["model"] == name) == rep["summary"][name]["flops"]
    assert all(e.tokens > 0 for e in entries)

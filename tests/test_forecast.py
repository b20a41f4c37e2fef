"""forecast.py end to end on a tiny checkpoint: every model and baseline on the trained run's own
test systems, figures that equal a hand computation, texts that decode again to the stored
numbers, and the ledger charged per generate call."""

from __future__ import annotations

import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest

from experiments import forecast, train
from experiments.lib import errors
from experiments.lib.science import baselines, forecasting, llmtime
from experiments.lib.science.lotka_volterra import load_h5
from flops import Ledger
from tests.conftest import script_argv


def test_forecast_script_end_to_end(tmp_path, tiny_ckpt, lv_data_file, monkeypatch):
    monkeypatch.setattr(baselines, "ODE_STEPS", 20)  # the fit's quality is tested in test_baselines.py
    run, out = tmp_path / "run", tmp_path / "fc"
    train.main(script_argv(tiny_ckpt, lv_data_file, run, "--max-systems", 2, "--context-length", 128,
                           "--batch-size", 2, "--lr", 0.3, "--max-steps", 6, "--eval-every", 0, "--val-systems", 2,
                           "--train-lm-head-bias"))
    C, H, N = 20, 4, 3
    rep = forecast.main(script_argv(tiny_ckpt, lv_data_file, out, "--adapter", run / "adapter", "--max-systems", N,
                                    "--context-steps", C, "--horizon", H, "--samples", 2))
    models = {"untrained", "trained", "untrained_median", "trained_median", "persistence", "linear_ar", "ode_fit"}
    assert set(rep["summary"]) == models
    # the test systems of the trained run's own split
    assert rep["systems"] == json.loads((run / "splits.json").read_text())["test"][:N]
    traj, _ = load_h5(lv_data_file)
    truth, last = traj[rep["systems"], C:C + H], traj[rep["systems"], C - 1]

    # persistence by hand: per system the mean |last prompt value - truth|, then mean and SE over systems
    per_system = np.abs(last[:, None] - truth).mean(axis=(1, 2))
    pers = rep["summary"]["persistence"]
    assert pers["mae"] == pytest.approx(per_system.mean())
    assert pers["mae_se"] == pytest.approx(per_system.std(ddof=1) / np.sqrt(N))
    assert pers["relative_score"] == pytest.approx(1.0) and pers["coverage"] == 1.0 and pers["malformed_steps"] == 0
    assert pers["per_horizon"]["prey"]["mae"] == pytest.approx(np.abs(last[:, None, 0] - truth[:, :, 0]).mean(axis=0))

    enc = llmtime.EncodingConfig.load(out / "encoding.json")
    with h5py.File(out / "forecasts.h5") as f:
        assert np.array_equal(f["truth"][()], truth) and np.array_equal(f["prompt"][()], traj[rep["systems"], :C])
        assert llmtime.EncodingConfig(**json.loads(f.attrs["encoding_json"])) == enc
        for name in ("untrained", "trained"):
            # the stored texts, decoded again with the saved encoding, are the stored numbers
            assert h5py.check_string_dtype(f[f"{name}/greedy_texts"].dtype) is not None
            greedy = f[f"{name}/greedy_texts"].asstr()[()]
            assert greedy.shape == (N, 1) and isinstance(greedy[0, 0], str)
            again = np.stack([forecasting.decode_forecast(t[0], H, enc)[0] for t in greedy])
            assert np.array_equal(again, f[f"{name}/forecast"][()], equal_nan=True)
            texts = f[f"{name}/samples_texts"].asstr()[()]
            assert texts.shape == (N, 2) and not f[name].attrs.keys()  # no JSON in attributes
            again = np.stack([[forecasting.decode_forecast(t, H, enc)[0] for t in row] for row in texts])
            assert np.array_equal(again, f[f"{name}/samples"][()], equal_nan=True)
            # and the coverage in the metrics is the share of those steps that decoded
            ok = np.isfinite(again).all(axis=-1)
            assert rep["summary"][f"{name}_median"]["coverage"] == pytest.approx(ok.any(axis=1).mean())
            assert f[f"{name}_median/band"].shape == (N, 2, H, 2)
    for png in ("examples.png", "error_vs_horizon.png"):
        assert (out / png).stat().st_size > 1000

    # paired: trained - untrained is the per-system difference of the filled-in MAEs
    d = rep["paired"]["trained - untrained"]
    assert d["mae_diff"] == pytest.approx(rep["summary"]["trained"]["mae"] - rep["summary"]["untrained"]["mae"])
    assert "trained - persistence" in rep["paired"] and "persistence - untrained" in rep["paired"]

    # the ledger: one charge per generate call, adding up to what each model spent; the reservation closed
    ledger = Ledger(tmp_path / "ledger.jsonl")
    charges = [e for e in ledger.entries() if e.kind == "forecast"]
    for name in ("trained", "untrained"):
        mine = [e for e in charges if e.config["model"] == name]
        assert len(mine) == 2 and sum(e.flops for e in mine) == pytest.approx(rep["summary"][name]["flops"])
    assert sum(r.unspent for r in ledger.reservations()) == 0.0

    # the adapter folder copied elsewhere (its run folder gone) forecasts the same systems with the same
    # encoding, whatever --seed and --splits say, and writes the same trained forecasts
    moved = tmp_path / "elsewhere" / "my_adapter"
    shutil.copytree(run / "adapter", moved)
    shutil.rmtree(run)
    again = forecast.main(script_argv(tiny_ckpt, lv_data_file, tmp_path / "fc2", "--adapter", moved,
                                      "--max-systems", N, "--context-steps", C, "--horizon", H, "--no-untrained",
                                      "--no-baselines", "--seed", 7, "--splits", 0.5, 0.25, 0.25))
    assert again["systems"] == rep["systems"] and again["encoding"] == rep["encoding"]
    with h5py.File(out / "forecasts.h5") as f, h5py.File(tmp_path / "fc2" / "forecasts.h5") as g:
        assert np.array_equal(f["trained/forecast"][()], g["trained/forecast"][()], equal_nan=True)
    # another data file is refused, naming both files' checksums
    other = tmp_path / "other.h5"
    shutil.copy(lv_data_file, other)
    with h5py.File(other, "a") as f:
        f["trajectories"][0, 0, 0] += 1.0
    theirs, mine = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (lv_data_file, other))
    with pytest.raises(errors.DataError, match=f"sha256 {mine}.*sha256 {theirs}"):
        forecast.main(script_argv(tiny_ckpt, other, tmp_path / "fc3", "--adapter", moved, "--no-untrained"))

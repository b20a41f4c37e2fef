"""forecast.py end to end on a tiny checkpoint whose generation writes numbers (tests/number_writer.py):
every model and baseline on the trained run's own test systems, figures that equal a hand computation
from the known truth and the known forecasts (malformed steps included), texts that decode again to
the stored numbers, plots that show those numbers, and the ledger charged per generate call."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings

import h5py
import numpy as np
import pytest

from experiments import forecast, train
from experiments.lib import errors, plots
from experiments.lib.science import baselines, forecasting, llmtime
from experiments.lib.science.lotka_volterra import load_h5
from flops import Ledger
from tests.conftest import keep_returns, script_argv
from tests.number_writer import hand_fill, hand_forecasts, hand_paired, hand_scores, written_for


def _png(path) -> np.ndarray:
    """The PNG decoded by matplotlib's reader: (height, width, RGBA) floats in [0, 1]."""
    from matplotlib import image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return image.imread(path)


def test_forecast_script_end_to_end(tmp_path, tiny_ckpt, lv_data_file, monkeypatch, number_writer):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(baselines, "ODE_STEPS", 20)  # the fit's quality is tested in test_baselines.py
    C, H, N, S = 20, 12, 4, 3
    written = number_writer(H)   # the models write numbers (tests/number_writer.py), some steps malformed
    examples_figs = keep_returns(monkeypatch, plots, "plot_examples")
    error_figs = keep_returns(monkeypatch, plots, "plot_error_vs_horizon")
    run, out = tmp_path / "run", tmp_path / "fc"
    train.main(script_argv(tiny_ckpt, lv_data_file, run, "--max-systems", 2, "--context-length", 128,
                           "--batch-size", 2, "--lr", 0.3, "--max-steps", 6, "--eval-every", 0, "--val-systems", 2,
                           "--train-lm-head-bias"))
    rep = forecast.main(script_argv(tiny_ckpt, lv_data_file, out, "--adapter", run / "adapter", "--max-systems", N,
                                    "--context-steps", C, "--horizon", H, "--samples", S))
    models = {"untrained", "trained", "untrained_median", "trained_median", "persistence", "linear_ar", "ode_fit"}
    assert set(rep["summary"]) == models
    # the test systems of the trained run's own split
    assert rep["systems"] == json.loads((run / "splits.json").read_text())["test"][:N]
    traj, _ = load_h5(lv_data_file)
    series = traj[rep["systems"]]
    truth, last = series[:, C:C + H], series[:, C - 1]

    # persistence by hand: per system the mean |last prompt value - truth|, then mean and SE over systems
    per_system = np.abs(last[:, None] - truth).mean(axis=(1, 2))
    pers = rep["summary"]["persistence"]
    assert pers["mae"] == pytest.approx(per_system.mean())
    assert pers["mae_se"] == pytest.approx(per_system.std(ddof=1) / np.sqrt(N))
    assert pers["relative_score"] == pytest.approx(1.0) and pers["coverage"] == 1.0 and pers["malformed_steps"] == 0
    assert pers["per_horizon"]["prey"]["mae"] == pytest.approx(np.abs(last[:, None, 0] - truth[:, :, 0]).mean(axis=0))

    # the language models: what the writer wrote after each prompt, decoded and scored by hand
    alpha = llmtime.EncodingConfig.load(out / "encoding.json").alpha
    greedy, hand = {}, {}
    for who in ("untrained", "trained"):
        assert written_for(written, series, alpha, C, who)   # (each model forecast these very prompts)
        greedy[who], values = hand_forecasts(series, alpha, C, H, who)
        hand[who] = hand_scores(values, truth, last) | {"values": values}
        assert 0 < hand[who]["coverage"] < 1                 # numbers, and malformed steps the fill rule meets
        got = rep["summary"][who]
        assert got["mae"] == pytest.approx(hand[who]["mae"], rel=1e-12)
        assert got["mae_se"] == pytest.approx(hand[who]["mae_se"], rel=1e-12)
        assert got["mae_h1_10"] == pytest.approx(hand[who]["h1_10"], rel=1e-12)
        assert got["blocks"]["h1_10"]["mae"] == pytest.approx(hand[who]["h1_10"], rel=1e-12)
        assert got["blocks"]["h11_25"]["mae"] == pytest.approx(hand[who]["h11_25"], rel=1e-12)
        assert got["coverage"] == pytest.approx(hand[who]["coverage"], rel=1e-12)
        assert got["malformed_steps"] == hand[who]["malformed"]
        assert got["relative_score"] == pytest.approx(hand[who]["relative"], rel=1e-12)
    # the medians of the samples: each step the median of the samples that decoded there
    samples = {}
    for who in ("untrained", "trained"):
        samples[who] = np.stack([hand_forecasts(series, alpha, C, H, who, s)[1] for s in range(S)], axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # (an all-NaN step has no median: NaN)
            median = np.nanmedian(samples[who], axis=1)
        mine = hand_scores(median, truth, last)
        got = rep["summary"][f"{who}_median"]
        assert got["mae"] == pytest.approx(mine["mae"], rel=1e-12)
        assert got["coverage"] == pytest.approx(mine["coverage"], rel=1e-12)
        # CRPS of the filled-in samples: E|X - y| - E|X - X'| / 2 over the S draws, per value
        filled = np.stack([[hand_fill(samples[who][i, s], last[i]) for s in range(S)] for i in range(N)])
        crps = (np.abs(filled - truth[:, None]).mean(axis=1)
                - 0.5 * np.abs(filled[:, :, None] - filled[:, None, :]).mean(axis=(1, 2)))
        assert got["crps"] == pytest.approx(crps.mean(), rel=1e-12)

    # paired: trained - untrained, system by system, by hand
    d, mine = rep["paired"]["trained - untrained"], hand_paired(hand["trained"]["values"], hand["untrained"]["values"],
                                                               truth, last)
    assert d["mae_diff"] == pytest.approx(mine["mae_diff"], rel=1e-12)
    assert d["mae_diff_se"] == pytest.approx(mine["se"], rel=1e-12)
    assert d["better"] == mine["better"] and 0 < mine["better"] < N   # (some systems better, some worse)
    assert d["blocks"]["h1_10"]["mae_diff"] == pytest.approx(mine["h1_10"], rel=1e-12)
    assert d["blocks"]["h1_10"]["better"] == mine["h1_10_better"]
    assert d["median"] == pytest.approx(mine["median"], rel=1e-12)
    assert d["blocks"]["h1_10"]["median"] == pytest.approx(mine["h1_10_median"], rel=1e-12)
    assert d["mae_diff"] == pytest.approx(rep["summary"]["trained"]["mae"] - rep["summary"]["untrained"]["mae"])
    assert "trained - persistence" in rep["paired"] and "persistence - untrained" in rep["paired"]

    enc = llmtime.EncodingConfig.load(out / "encoding.json")
    with h5py.File(out / "forecasts.h5") as f:
        assert np.array_equal(f["truth"][()], truth) and np.array_equal(f["prompt"][()], series[:, :C])
        assert llmtime.EncodingConfig(**json.loads(f.attrs["encoding_json"])) == enc
        for name in ("untrained", "trained"):
            # the stored texts are what the model wrote, and decode again to the stored numbers
            assert h5py.check_string_dtype(f[f"{name}/greedy_texts"].dtype) is not None
            texts = f[f"{name}/greedy_texts"].asstr()[()]
            assert texts.shape == (N, 1) and list(texts[:, 0]) == greedy[name]
            stored = f[f"{name}/forecast"][()]
            ok = np.isfinite(hand[name]["values"]).all(-1)
            assert (np.isfinite(stored).all(-1) == ok).all() and ok.any()   # numbers where they decode, NaN else
            assert np.array_equal(stored[ok], hand[name]["values"][ok])
            again = np.stack([forecasting.decode_forecast(t[0], H, enc)[0] for t in texts])
            assert np.array_equal(again, stored, equal_nan=True)
            texts = f[f"{name}/samples_texts"].asstr()[()]
            assert texts.shape == (N, S) and not f[name].attrs.keys()  # no JSON in attributes
            again = np.stack([[forecasting.decode_forecast(t, H, enc)[0] for t in row] for row in texts])
            assert np.array_equal(again, f[f"{name}/samples"][()], equal_nan=True)
            assert np.array_equal(again, samples[name], equal_nan=True) and np.isfinite(again).any()
            # and the coverage in the metrics is the share of those steps that decoded
            ok = np.isfinite(again).all(axis=-1)
            assert rep["summary"][f"{name}_median"]["coverage"] == pytest.approx(ok.any(axis=1).mean())
            assert f[f"{name}_median/band"].shape == (N, 2, H, 2)

    # the plots: the figures hold the data they should, and the PNGs are those figures drawn
    [fig] = examples_figs
    axes = np.array(fig.axes).reshape(-1, 2)
    assert axes.shape == (N, 2)   # (at most 4 systems, prey and predator)
    for i in range(N):
        for v in range(2):
            lines = {ln.get_label(): ln for ln in axes[i, v].lines}
            assert np.array_equal(lines["truth"].get_ydata(), series[i, :, v])
            for name in ("untrained", "trained"):
                assert list(lines[name].get_xdata()) == list(range(C, C + H))
                assert np.array_equal(lines[name].get_ydata(), hand[name]["values"][i, :, v], equal_nan=True)
    [fig] = error_figs
    for v in range(2):   # prey, predator: one line per model, in the summary's order
        lines = dict(zip(rep["summary"], fig.axes[v].lines, strict=True))
        for name in ("untrained", "trained"):
            assert lines[name].get_ydata() == pytest.approx(hand[name]["errors"][:, :, v].mean(axis=0), rel=1e-12)
    for png, (width, height) in (("examples.png", (1100, 270 * N)), ("error_vs_horizon.png", (1100, 380))):
        img = _png(out / png)
        # saved tight, with the legend below: about the figure's width, at least its height; drawn on
        assert img.ndim == 3 and abs(img.shape[1] - width) < 0.15 * width and img.shape[0] >= 0.8 * height, img.shape
        assert img[..., :3].std() > 0.05

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
        assert np.isfinite(f["trained/forecast"][()]).any()
        assert np.array_equal(f["trained/forecast"][()], g["trained/forecast"][()], equal_nan=True)
    # another data file is refused, naming both files' checksums
    other = tmp_path / "other.h5"
    shutil.copy(lv_data_file, other)
    with h5py.File(other, "a") as f:
        f["trajectories"][0, 0, 0] += 1.0
    theirs, mine = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (lv_data_file, other))
    with pytest.raises(errors.DataError, match=f"sha256 {mine}.*sha256 {theirs}"):
        forecast.main(script_argv(tiny_ckpt, other, tmp_path / "fc3", "--adapter", moved, "--no-untrained"))

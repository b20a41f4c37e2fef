"""Metrics against hand-computed values on small arrays, and NaN handling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from experiments.lib import metrics


def test_horizon_metrics_equal_hand_computed_values():
    # 2 systems, 2 steps; errors chosen so every figure is easy to work out by hand
    truth = np.array([[[1.0, 2.0], [2.0, 4.0]],
                      [[4.0, 1.0], [5.0, 2.0]]])
    pred = np.array([[[2.0, 2.0], [0.0, 5.0]],      # prey errors +1, -2; predator 0, +1
                     [[1.0, 1.5], [5.0, 6.0]]])     # prey errors -3, 0;  predator +0.5, +4
    r = metrics.horizon_metrics(pred, truth)
    prey, predator = r["per_horizon"]["prey"], r["per_horizon"]["predator"]
    assert prey["mae"] == pytest.approx([2.0, 1.0])                 # (1+3)/2, (2+0)/2
    assert prey["mse"] == pytest.approx([5.0, 2.0])                 # (1+9)/2, (4+0)/2
    assert prey["mape"] == pytest.approx([(100 + 75) / 2, (100 + 0) / 2])   # 1/1, 3/4; 2/2, 0/5
    assert predator["mae"] == pytest.approx([0.25, 2.5])
    # SE over 2 systems of values u, v: |u - v| / 2 (sample sd |u-v|/sqrt(2), over sqrt(2))
    assert prey["mae_se"] == pytest.approx([1.0, 1.0])
    assert predator["mse_se"] == pytest.approx([0.125, 7.5])       # mse 0, 0.25 and 1, 16
    assert prey["n"] == [2, 2] and r["malformed_steps"] == 0 and r["systems"] == 2 and r["horizon"] == 2
    # overall: per-system means over both variables and steps, then mean over systems
    s0, s1 = (1 + 2 + 0 + 1) / 4, (3 + 0 + 0.5 + 4) / 4
    assert r["mae_mean"] == pytest.approx((s0 + s1) / 2) and r["mae_se"] == pytest.approx(abs(s0 - s1) / 2)
    assert r["mse_mean"] == pytest.approx(((1 + 4 + 0 + 1) / 4 + (9 + 0 + 0.25 + 16) / 4) / 2)
    assert r["prey_mae_mean"] == pytest.approx(((1 + 2) / 2 + (3 + 0) / 2) / 2)
    json.dumps(r, allow_nan=False)


def test_nan_steps_are_counted_and_left_out():
    truth = np.ones((3, 2, 2))
    pred = np.full((3, 2, 2), 2.0)
    pred[0, 1] = np.nan            # a whole malformed step
    pred[1, 1, 1] = np.nan         # one bad value: still one malformed step
    pred[2, 1, 0] = 5.0            # error 4
    r = metrics.horizon_metrics(pred, truth)
    assert r["malformed_steps"] == 2
    assert r["per_horizon"]["prey"]["n"] == [3, 2] and r["per_horizon"]["predator"]["n"] == [3, 1]
    assert r["per_horizon"]["prey"]["mae"] == pytest.approx([1.0, (1 + 4) / 2])
    assert r["per_horizon"]["predator"]["mae"] == pytest.approx([1.0, 1.0])
    assert r["per_horizon"]["predator"]["mae_se"][1] is None          # one system: no SE
    assert r["mae_mean"] == pytest.approx((1 + 1 + (1 + 1 + 4 + 1) / 4) / 3)   # systems' own valid values
    every = metrics.horizon_metrics(np.full((2, 2, 2), np.nan), np.ones((2, 2, 2)))
    assert every["malformed_steps"] == 4 and every["mae_mean"] is None
    assert every["per_horizon"]["prey"]["mae"] == [None, None]
    json.dumps(every, allow_nan=False)
    with pytest.raises(ValueError):
        metrics.horizon_metrics(np.ones((2, 3, 2)), np.ones((2, 2, 2)))


def test_mape_leaves_out_zero_truth():
    truth = np.array([[[0.0, 2.0]], [[2.0, 2.0]]])
    pred = np.array([[[1.0, 3.0]], [[3.0, 1.0]]])
    r = metrics.horizon_metrics(pred, truth)
    assert r["per_horizon"]["prey"]["mape"] == pytest.approx([50.0])        # only system 1: 1/2
    assert r["per_horizon"]["prey"]["mae"] == pytest.approx([1.0])          # MAE keeps both


def test_paired_comparison_equals_hand_computed_mean_and_se():
    truth = np.zeros((4, 2, 2))
    a = np.array([1.0, 2.0, 3.0, 4.0])[:, None, None] * np.ones((4, 2, 2))
    b = np.array([2.0, 2.0, 1.0, 0.0])[:, None, None] * np.ones((4, 2, 2))
    b[3, 1, 0] = np.nan            # system 3 loses one value from the pairing, still counts
    r = metrics.paired_comparison(a, b, truth)
    d = np.array([-1.0, 0.0, 2.0, 4.0])                 # |a| - |b| per system (every value equal)
    assert r["mean_diff"] == pytest.approx(d.mean())
    assert r["se"] == pytest.approx(d.std(ddof=1) / 2)
    assert r["systems"] == 4
    prey = r["per_horizon"]["prey"]
    assert prey["n"] == [4, 3]
    assert prey["mean_diff"] == pytest.approx([d.mean(), d[:3].mean()])
    assert prey["se"][1] == pytest.approx(d[:3].std(ddof=1) / math.sqrt(3))
    b[0] = np.nan                  # a system with no value valid in both drops out
    assert metrics.paired_comparison(a, b, truth)["systems"] == 3
    json.dumps(r, allow_nan=False)


def test_median_and_band_ignore_nan():
    samples = np.arange(1.0, 12.0)[None, :, None, None] * np.ones((1, 11, 2, 2))   # 1..11 over samples
    samples[0, :, 1, 1] = np.nan
    samples[0, 10, 0, 0] = np.nan              # leaves 1..10 at this value
    median, band = metrics.median_and_band(samples)
    assert median.shape == (1, 2, 2) and band.shape == (1, 2, 2, 2)
    assert median[0, 0, 0] == 5.5 and median[0, 0, 1] == 6.0
    assert band[0, :, 0, 1] == pytest.approx([2.0, 10.0])        # 10%/90% of 1..11 (linear interpolation)
    assert band[0, :, 0, 0] == pytest.approx([1.9, 9.1])          # of 1..10
    assert np.isnan(median[0, 1, 1]) and np.isnan(band[0, :, 1, 1]).all()

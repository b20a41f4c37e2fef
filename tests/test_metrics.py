"""Forecast scores against values worked out by hand on small arrays: the fill rule, coverage,
filled-in and common-support errors, the relative score, CRPS, band coverage and paired differences."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from experiments.lib.science import metrics

# 2 systems, 3 steps; the last prompt values are the fill and persistence's forecast
TRUTH = np.array([[[1.0, 2.0], [2.0, 4.0], [3.0, 3.0]],
                  [[4.0, 1.0], [5.0, 2.0], [6.0, 3.0]]])
LAST = np.array([[0.0, 1.0], [3.0, 0.0]])


def test_fill_rule_uses_the_last_valid_step_or_the_prompt():
    pred = TRUTH.copy()
    pred[0, 1] = np.nan          # after a valid step: that step's values
    pred[1, 0] = np.nan          # before any valid step: the last prompt value
    pred[1, 1, 0] = np.nan       # one bad value makes the whole step malformed
    filled = metrics.fill_malformed(pred, LAST)
    assert filled[0].tolist() == [[1.0, 2.0], [1.0, 2.0], [3.0, 3.0]]
    assert filled[1].tolist() == [[3.0, 0.0], [3.0, 0.0], [6.0, 3.0]]
    samples = np.stack([pred, TRUTH], axis=1)          # (N, S, H, 2): the same rule per sample
    assert np.array_equal(metrics.fill_malformed(samples, LAST)[:, 0], filled)
    assert np.array_equal(metrics.fill_malformed(samples, LAST)[:, 1], TRUTH)


def test_scores_equal_hand_computed_values():
    pred = TRUTH.copy()
    pred[0, 1] = np.nan
    pred[1, 0] = np.nan
    r = metrics.forecast_scores(pred, TRUTH, LAST, short_horizon=2)
    # filled errors: system 0 |(1,2) - (2,4)| at step 1 = 1 + 2, system 1 |(3,0) - (4,1)| at step 0 = 1 + 1
    s0, s1 = 3 / 6, 2 / 6
    assert r["mae"] == pytest.approx((s0 + s1) / 2) and r["mae_se"] == pytest.approx(abs(s0 - s1) / 2)
    assert r["mse"] == pytest.approx(((1 + 4) / 6 + 2 / 6) / 2)
    assert r["mae_h1_2"] == pytest.approx((3 / 4 + 2 / 4) / 2)        # the first two steps only
    assert r["prey_mae"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert r["predator_mae"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert r["coverage"] == pytest.approx(4 / 6) and r["coverage_se"] == 0.0
    assert r["malformed_steps"] == 2 and r["malformed_per_step"] == [1, 1, 0]
    assert r["common_mae"] == 0.0 and r["common_steps"] == 4           # where it answered, it was exact
    # persistence's MAE is 12 / 6 = 2 on both systems: ratios 0.25 and 1/6, geometric mean sqrt(1/24)
    assert r["relative_score"] == pytest.approx(math.sqrt(0.25 / 6)) and r["relative_systems"] == 2
    log_r = np.log([0.25, 1 / 6])
    assert r["relative_score_se"] == pytest.approx(math.sqrt(0.25 / 6) * abs(log_r[0] - log_r[1]) / 2)
    prey = r["per_horizon"]["prey"]
    assert prey["mae"] == pytest.approx([0.5, 0.5, 0.0]) and prey["coverage"] == pytest.approx([0.5, 0.5, 1.0])
    assert r["per_horizon"]["predator"]["mae"] == pytest.approx([0.5, 1.0, 0.0])
    json.dumps(r, allow_nan=False)


def test_persistence_scores_one_and_its_own_error():
    pred = np.repeat(LAST[:, None], 3, axis=1)
    r = metrics.forecast_scores(pred, TRUTH, LAST)
    assert r["relative_score"] == pytest.approx(1.0) and r["coverage"] == 1.0 and r["mae"] == pytest.approx(2.0)
    # a forecast that never answers is filled with the last prompt value: it *is* persistence
    silent = metrics.forecast_scores(np.full_like(TRUTH, np.nan), TRUTH, LAST)
    assert silent["mae"] == r["mae"] and silent["relative_score"] == pytest.approx(1.0) and silent["coverage"] == 0.0
    assert silent["common_mae"] is None and silent["common_steps"] == 0


def test_failing_to_answer_never_beats_answering_correctly():
    rng = np.random.default_rng(0)
    for _ in range(200):
        truth = rng.uniform(0, 5, (4, 6, 2))
        last = rng.uniform(0, 5, (4, 2))
        wrong = rng.random((4, 6)) < 0.4                  # these steps malformed ...
        correct = truth.copy()                            # ... where the forecast would have been exact
        answered = np.where(wrong[..., None], np.nan, correct)
        a = metrics.forecast_scores(answered, truth, last)
        b = metrics.forecast_scores(correct, truth, last)
        assert a["mae"] >= b["mae"] and a["mse"] >= b["mse"]
        assert a["coverage"] == pytest.approx(1 - wrong.mean()) and b["coverage"] == 1.0
        # the valid-only mean that this replaces would have called them equal (both exact where answered)
        assert a["common_mae"] == b["common_mae"] == 0.0


def test_common_support_masks_steps_another_model_missed():
    pred = TRUTH + 1.0
    common = np.array([[True, False, True], [False, False, True]])
    r = metrics.forecast_scores(pred, TRUTH, LAST, common=common)
    assert r["common_mae"] == 1.0 and r["common_steps"] == 3 and r["mae"] == 1.0


def test_crps_and_band_coverage():
    # CRPS of the two-point distribution {0, 2} at y = 1: E|X - y| - E|X - X'| / 2 = 1 - 0.5
    assert metrics.crps_ensemble(np.array([[[[0.0]], [[2.0]]]]), np.array([[[1.0]]])).item() == pytest.approx(0.5)
    # one sample: the absolute error
    assert metrics.crps_ensemble(np.array([[[[3.0]]]]), np.array([[[1.0]]])).item() == pytest.approx(2.0)
    truth = np.zeros((1, 2, 2))
    samples = np.array([-2.0, -1.0, 1.0, 2.0, 10.0])[None, :, None, None] * np.ones((1, 5, 2, 2))
    samples[0, :, 1, 0] += 20.0                    # step 1 prey: every sample above the truth
    r = metrics.forecast_scores(np.median(samples, axis=1), truth, np.zeros((1, 2)), samples=samples)
    assert r["band_coverage"] == pytest.approx(3 / 4)
    x = np.array([-2.0, -1.0, 1.0, 2.0, 10.0])
    pairwise = np.abs(x[:, None] - x[None, :]).mean()
    assert r["per_horizon"]["prey"]["crps"][0] == pytest.approx(np.abs(x).mean() - pairwise / 2)
    assert r["per_horizon"]["prey"]["crps"][1] == pytest.approx(np.abs(x + 20).mean() - pairwise / 2)


def test_paired_difference_equals_hand_computed_mean_and_se():
    truth = np.zeros((4, 2, 2))
    last = np.full((4, 2), 10.0)
    a = np.array([1.0, 2.0, 3.0, 4.0])[:, None, None] * np.ones((4, 2, 2))
    b = np.array([2.0, 2.0, 1.0, 0.0])[:, None, None] * np.ones((4, 2, 2))
    b[3, 1] = np.nan               # filled with b's step 0 (= 0): the filled-in difference is unchanged
    r = metrics.paired_difference(a, b, truth, last, short_horizon=1)
    d = np.array([-1.0, 0.0, 2.0, 4.0])
    assert r["mae_diff"] == pytest.approx(d.mean()) and r["mae_diff_se"] == pytest.approx(d.std(ddof=1) / 2)
    assert r["mae_diff_h1_1"] == pytest.approx(d.mean())
    # common support: system 3 keeps only step 0, the others both steps: the same per-system means
    assert r["common_mae_diff"] == pytest.approx(d.mean())
    assert r["per_horizon"]["prey"]["mae_diff"] == pytest.approx([d.mean(), d.mean()])
    # log(MAE_a) - log(MAE_b) per system; system 3's b is exact (log 0): that system has no ratio
    assert r["log_relative_diff"] == pytest.approx(np.mean(np.log([1 / 2, 2 / 2, 3 / 1])))
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


def test_shapes_are_checked():
    with pytest.raises(ValueError):
        metrics.forecast_scores(np.ones((2, 3, 2)), TRUTH[:, :2], LAST)
    with pytest.raises(ValueError):
        metrics.forecast_scores(TRUTH, TRUTH, LAST[:1])
    with pytest.raises(ValueError):
        metrics.forecast_scores(TRUTH, TRUTH * np.nan, LAST)


def test_horizon_blocks_are_the_three_ranges_cut_at_the_horizon():
    assert metrics.horizon_blocks(50) == {"h1_10": slice(0, 10), "h11_25": slice(10, 25), "h26_50": slice(25, 50)}
    assert metrics.horizon_blocks(12) == {"h1_10": slice(0, 10), "h11_25": slice(10, 12)}
    assert metrics.horizon_blocks(3) == {"h1_10": slice(0, 3)}


def test_paired_blocks_and_block_mae_equal_hand_computed_values():
    # 3 systems, 30 steps; a's error is 1 everywhere, b's error is 2 on steps 1-10, 0 after, except
    # system 2, where b is 3 on steps 26-30
    truth = np.zeros((3, 30, 2))
    last = np.zeros((3, 2))
    a = np.ones((3, 30, 2))
    b = np.zeros((3, 30, 2))
    b[:, :10] = 2.0
    b[2, 25:] = 3.0
    d = metrics.paired_difference(a, b, truth, last)
    assert d["blocks"]["h1_10"] == {"mae_diff": -1.0, "se": 0.0, "better": 3, "median": -1.0}
    assert d["blocks"]["h11_25"] == {"mae_diff": 1.0, "se": 0.0, "better": 0, "median": 1.0}
    per_system = np.array([1.0, 1.0, -2.0])                        # steps 26-30: 1 - 0, 1 - 0, 1 - 3
    late = d["blocks"]["h26_50"]
    assert late["mae_diff"] == pytest.approx(per_system.mean()) and late["better"] == 1
    assert late["median"] == 1.0                                   # the mean is 0: system 2 alone decides it
    assert late["se"] == pytest.approx(per_system.std(ddof=1) / math.sqrt(3))
    # overall: systems 0 and 1 are (10 * -1 + 20 * 1) / 30 = 1/3 worse, system 2 (-10 + 15 - 10) / 30 better
    assert d["better"] == 1 and d["median"] == pytest.approx(1 / 3)
    s = metrics.forecast_scores(b, truth, last)
    assert s["blocks"]["h1_10"]["mae"] == 2.0 and s["blocks"]["h11_25"]["mae"] == 0.0
    late = s["blocks"]["h26_50"]
    assert late["mae"] == pytest.approx(1.0) and late["prey_mae"] == pytest.approx(1.0)

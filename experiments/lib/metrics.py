"""Forecast errors per horizon step, paired comparisons and sample bands, NaN-aware.

A NaN forecast value means the model produced no usable number there (a malformed or missing step
of a language-model forecast). Errors are computed over valid values only and the number of
malformed steps is reported beside them, so a model cannot look good by failing to answer.

Standard errors are across systems (sample standard deviation with ddof=1 over sqrt(n)): systems
are the independent units; horizon steps of one system are strongly correlated. Everything
returned is plain Python (lists, floats, ints, None for an undefined value) so it goes into JSON.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

VARIABLES = ("prey", "predator")


def _float(x: float) -> float | None:
    """JSON has no NaN: an undefined figure (no valid values, or one system for an SE) is None."""
    x = float(x)
    return x if np.isfinite(x) else None


def _floats(a: np.ndarray) -> list[float | None]:
    return [_float(v) for v in a]


def _mean_se(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, standard error, count) over ``axis`` ignoring non-finite values; NaN where undefined."""
    x = np.where(np.isfinite(x), x, np.nan)  # an inf forecast counts as invalid, like a malformed one
    n = np.isfinite(x).sum(axis=axis)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(x, axis=axis)
        se = np.nanstd(x, axis=axis, ddof=1) / np.sqrt(n)
    mean, se = np.where(n > 0, mean, np.nan), np.where(n > 1, se, np.nan)
    return mean, se, n


def _check(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if pred.shape != truth.shape or pred.ndim != 3 or pred.shape[2] != 2:
        raise ValueError(f"forecast {pred.shape} and truth {truth.shape} must both be (N, H, 2)")
    if not np.isfinite(truth).all():
        raise ValueError("truth must be finite (NaN marks a malformed forecast step, never a true value)")
    return pred, truth


def horizon_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Per-horizon-step and overall errors of ``pred`` against ``truth``, both (N, H, 2).

    Returns ``per_horizon[variable][metric]`` (lists of H) for metric in mae, mse, mape (each with a
    ``_se`` across systems) and ``n`` (systems valid at that step); ``{metric}_mean`` and
    ``{metric}_se`` overall and ``{variable}_{metric}_mean`` per variable; ``malformed_steps`` (the
    (system, step) pairs with any NaN), ``systems`` and ``horizon``.

    Overall means are means over systems of each system's mean over its valid values, and their
    SE is across those per-system means: each system weighs the same however many steps it got right.
    MAPE is 100 |pred - truth| / truth (percent); truth values of 0 are left out of it (no relative
    error exists there). Values near 0 make it large, which is what MAPE means, so read it with MAE.
    """
    pred, truth = _check(pred, truth)
    N, H, _ = pred.shape
    err = pred - truth                                   # NaN where the forecast is NaN
    with np.errstate(invalid="ignore", divide="ignore"):
        ape = np.where(truth != 0, 100.0 * np.abs(err) / np.abs(truth), np.nan)
    per_metric = {"mae": np.abs(err), "mse": err ** 2, "mape": ape}
    out: dict[str, Any] = {"systems": N, "horizon": H,
                           "malformed_steps": int((~np.isfinite(pred)).any(axis=2).sum()),
                           "per_horizon": {}}
    for v, name in enumerate(VARIABLES):
        block: dict[str, list] = {}
        for metric, values in per_metric.items():
            mean, se, n = _mean_se(values[:, :, v], axis=0)
            block[metric], block[f"{metric}_se"] = _floats(mean), _floats(se)
            if metric == "mae":
                block["n"] = [int(k) for k in n]
            system_mean, _, _ = _mean_se(values[:, :, v], axis=1)
            out[f"{name}_{metric}_mean"] = _float(_mean_se(system_mean)[0])
        out["per_horizon"][name] = block
    for metric, values in per_metric.items():
        system_mean, _, _ = _mean_se(values.reshape(N, -1), axis=1)   # both variables together
        mean, se, _ = _mean_se(system_mean)
        out[f"{metric}_mean"], out[f"{metric}_se"] = _float(mean), _float(se)
    return out


def paired_comparison(pred_a: np.ndarray, pred_b: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Mean difference of absolute error, ``|a - truth| - |b - truth|`` (negative: a is better).

    Paired: at each step only the systems where both forecasts are valid enter, so the difference
    is between the two models on the same values. Per horizon step and variable: ``mean_diff``,
    ``se`` and ``n`` (systems). Overall: each system's mean difference over the values valid in both
    forecasts, then ``mean_diff``, ``se`` across systems and ``systems`` (those with any such value).
    """
    pred_a, truth = _check(pred_a, truth)
    pred_b, _ = _check(pred_b, truth)
    diff = np.abs(pred_a - truth) - np.abs(pred_b - truth)   # NaN unless both are valid
    N = diff.shape[0]
    out: dict[str, Any] = {"per_horizon": {}}
    for v, name in enumerate(VARIABLES):
        mean, se, n = _mean_se(diff[:, :, v], axis=0)
        out["per_horizon"][name] = {"mean_diff": _floats(mean), "se": _floats(se), "n": [int(k) for k in n]}
        system_mean, _, _ = _mean_se(diff[:, :, v], axis=1)
        out[f"{name}_mean_diff"] = _float(_mean_se(system_mean)[0])
    system_mean, _, _ = _mean_se(diff.reshape(N, -1), axis=1)
    mean, se, n = _mean_se(system_mean)
    out.update(mean_diff=_float(mean), se=_float(se), systems=int(n))
    return out


def median_and_band(samples: np.ndarray, quantiles: tuple[float, float] = (0.1, 0.9)) -> tuple[np.ndarray, np.ndarray]:
    """(median (N, H, 2), band (N, 2, H, 2)) of sampled forecasts (N, S, H, 2) over the samples,
    ignoring NaN (a malformed sample drops out of that step only); NaN where no sample is valid.
    band[:, 0] is the lower quantile (default 10%), band[:, 1] the upper (90%)."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 4 or samples.shape[3] != 2:
        raise ValueError(f"samples {samples.shape} must be (N, S, H, 2)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN steps: NaN is the right answer
        median = np.nanmedian(samples, axis=1)
        band = np.nanquantile(samples, list(quantiles), axis=1).transpose(1, 0, 2, 3)
    return median, band

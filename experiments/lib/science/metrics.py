"""Forecast scores that cannot be gamed by failing to answer: coverage, filled-in errors, a scale-free
score, CRPS, and paired differences, each with its standard error over systems.

A forecast is (N systems, H steps, 2 variables) in original units, NaN where the language model wrote
no usable number (a malformed step, or one it never reached). The rules:

- ``coverage``: the fraction of (system, step) pairs that decoded.
- Filled-in errors (``mae``, ``mse``): every step counts. A malformed step is filled with that
  forecast's last valid step before it, or the last prompt value if there is none (what a user
  holding the forecast would do). A model that fails to answer scores what its fallback scores.
- ``common_mae``: MAE over the steps valid in *every* forecast compared (the common support), so a
  paired view that only compares numbers every model actually wrote.
- ``relative_score``: each system's filled-in MAE divided by last-value persistence's MAE on the same
  system, aggregated over systems by the geometric mean (Chronos's relative score): scale-free, so a
  few large-valued systems cannot dominate. Below 1 beats persistence. Systems on which persistence is
  exact (MAE 0) have no ratio and are left out (``relative_systems`` counts those used).
- With samples (N, S, H, 2): ``crps``, the continuous ranked probability score of the filled-in samples
  as an empirical distribution (LLMTIME's metric; lower is better), and ``band_coverage``, the fraction
  of true values inside the samples' 10-90% quantile band (0.8 for a calibrated band).

Standard errors are across systems (sample sd, ddof=1, over sqrt(n)): each system is one independent
unit, its steps are strongly correlated. The SE of the geometric mean comes from the SE of the mean log
ratio by the delta method (se = score * se_log). Everything returned is plain Python (None for an
undefined figure) so it goes into JSON.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

VARIABLES = ("prey", "predator")
FILL_RULE = ("a malformed or missing step is filled with the forecast's last valid step before it, or the last "
             "prompt value if there is none; filled-in MAE/MSE/CRPS count every step")


def _float(x: float) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _floats(a: np.ndarray) -> list[float | None]:
    return [_float(v) for v in np.asarray(a, dtype=np.float64)]


def mean_se(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, standard error, count) over ``axis``, ignoring NaN; NaN where undefined (no value; one value for SE)."""
    x = np.where(np.isfinite(x), x, np.nan)
    n = np.isfinite(x).sum(axis=axis)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(x, axis=axis)
        se = np.nanstd(x, axis=axis, ddof=1) / np.sqrt(n)
    return np.where(n > 0, mean, np.nan), np.where(n > 1, se, np.nan), n


def _check(pred: np.ndarray, truth: np.ndarray, last_prompt: np.ndarray) -> tuple[np.ndarray, ...]:
    pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    last_prompt = np.asarray(last_prompt, dtype=np.float64)
    sample_axis_dropped = pred.shape if pred.ndim == 3 else pred.shape[:1] + pred.shape[2:]
    if truth.ndim != 3 or truth.shape[2] != 2 or pred.ndim not in (3, 4) or sample_axis_dropped != truth.shape:
        raise ValueError(f"forecast {pred.shape} must be (N, H, 2) or (N, S, H, 2) with truth {truth.shape} (N, H, 2)")
    if last_prompt.shape != (truth.shape[0], 2):
        raise ValueError(f"last prompt values {last_prompt.shape} must be (N, 2) for truth {truth.shape}")
    if not (np.isfinite(truth).all() and np.isfinite(last_prompt).all()):
        raise ValueError("truth and prompt must be finite (NaN marks a malformed forecast step, never a true value)")
    return pred, truth, last_prompt


def valid_steps(pred: np.ndarray) -> np.ndarray:
    """[..., H] True where a step decoded: both variables finite."""
    return np.isfinite(np.asarray(pred, dtype=np.float64)).all(axis=-1)


def fill_malformed(pred: np.ndarray, last_prompt: np.ndarray) -> np.ndarray:
    """(..., H, 2) forecasts with every invalid step replaced by the last valid step before it, or by
    ``last_prompt`` (N, 2) where there is none. Leading axes: (N, H, 2) or (N, S, H, 2)."""
    pred = np.asarray(pred, dtype=np.float64)
    last = np.asarray(last_prompt, dtype=np.float64)
    last = last if pred.ndim == 3 else np.broadcast_to(last[:, None], pred.shape[:2] + (2,))
    out = np.empty_like(pred)
    ok = valid_steps(pred)
    current = last.copy()
    for h in range(pred.shape[-2]):
        current = np.where(ok[..., h, None], pred[..., h, :], current)
        out[..., h, :] = current
    return out


def crps_ensemble(samples: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """CRPS of the empirical distribution of ``samples`` (N, S, H, 2) at ``truth`` (N, H, 2) -> (N, H, 2):
    E|X - y| - E|X - X'| / 2, the exact CRPS of the S-point distribution (lower is better; equals
    the absolute error when S = 1)."""
    spread = np.abs(samples[:, :, None] - samples[:, None, :]).mean(axis=(1, 2))
    return np.abs(samples - truth[:, None]).mean(axis=1) - 0.5 * spread


# The horizon blocks every training change is judged by: short, middle and long range (1-based, inclusive).
HORIZON_BLOCKS = ((1, 10), (11, 25), (26, 50))


def horizon_blocks(horizon: int) -> dict[str, slice]:
    """``"h1_10"`` -> the steps of that block that a forecast of ``horizon`` steps has (the last block
    is cut at the horizon; a block starting past it is left out)."""
    return {f"h{a}_{b}": slice(a - 1, min(b, horizon)) for a, b in HORIZON_BLOCKS if a <= horizon}


def _summary(values: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and SE over systems of each system's mean over everything else; (N, ...) -> figures."""
    per_system = values.reshape(values.shape[0], -1)
    m, s, _ = mean_se(mean_se(per_system, axis=1)[0])
    return _float(m), _float(s)


def forecast_scores(pred: np.ndarray, truth: np.ndarray, last_prompt: np.ndarray, *,
                    common: np.ndarray | None = None, samples: np.ndarray | None = None,
                    short_horizon: int = 10, band: tuple[float, float] = (0.1, 0.9)) -> dict[str, Any]:
    """Every score of one forecaster: ``pred`` (N, H, 2), NaN where malformed, against ``truth`` (N, H, 2),
    with ``last_prompt`` (N, 2) the last prompt step (the fill and persistence's forecast).

    ``common`` (N, H) marks the common support for ``common_mae`` (default: this forecast's own valid
    steps). ``samples`` (N, S, H, 2) adds ``crps`` and ``band_coverage``.

    Overall figures: ``{metric}`` and ``{metric}_se`` over all H steps and both variables, the same
    per variable (``prey_mae``, ...), ``{metric}_h1_{k}`` over the first k = ``short_horizon`` steps
    (when H > k), plus ``malformed_steps`` (count), ``systems``, ``horizon``. Per horizon step:
    ``per_horizon[variable]`` with lists of H values (``mae``, ``mae_se``, ``mse``, ``mse_se``,
    ``coverage``, ``malformed`` and, with samples, ``crps``, ``crps_se``). Per horizon block
    (``HORIZON_BLOCKS``): ``blocks[h1_10 | h11_25 | h26_50]`` with ``mae``, ``mae_se``, ``prey_mae``,
    ``predator_mae``.
    """
    pred, truth, last_prompt = _check(pred, truth, last_prompt)
    N, H, _ = truth.shape
    ok = valid_steps(pred)                                              # (N, H)
    filled = fill_malformed(pred, last_prompt)
    err = filled - truth
    per_value = {"mae": np.abs(err), "mse": err ** 2}
    if samples is not None:
        samples, _, _ = _check(samples, truth, last_prompt)
        filled_samples = fill_malformed(samples, last_prompt)
        per_value["crps"] = crps_ensemble(filled_samples, truth)
        lo, hi = np.quantile(filled_samples, band, axis=1)
        per_value["band_coverage"] = ((truth >= lo) & (truth <= hi)).astype(np.float64)
    out: dict[str, Any] = {"systems": N, "horizon": H, "malformed_steps": int((~ok).sum())}
    out["coverage"], out["coverage_se"] = _summary(ok.astype(np.float64))
    horizons = {"": H} | ({f"_h1_{short_horizon}": short_horizon} if H > short_horizon else {})
    for suffix, k in horizons.items():
        for metric, values in per_value.items():
            out[f"{metric}{suffix}"], out[f"{metric}{suffix}_se"] = _summary(values[:, :k])
    for v, name in enumerate(VARIABLES):
        for metric, values in per_value.items():
            out[f"{name}_{metric}"], out[f"{name}_{metric}_se"] = _summary(values[:, :, v])
    # filled-in MAE per horizon block, both variables and each alone
    out["blocks"] = {block: {"mae": _summary(per_value["mae"][:, steps])[0],
                             "mae_se": _summary(per_value["mae"][:, steps])[1],
                             **{f"{name}_mae": _summary(per_value["mae"][:, steps, v])[0]
                                for v, name in enumerate(VARIABLES)}}
                     for block, steps in horizon_blocks(H).items()}

    # the common support: errors only where every compared forecast wrote a number
    support = ok if common is None else np.asarray(common, dtype=bool) & ok
    masked = np.where(support[..., None], np.abs(err), np.nan)
    out["common_mae"], out["common_mae_se"] = _summary_masked(masked)
    out["common_steps"] = int(support.sum())

    # scale-free: each system's MAE over persistence's, geometric mean over systems
    pers = np.abs(last_prompt[:, None] - truth).mean(axis=(1, 2))      # (N,)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.where(pers > 0, np.log(np.abs(err).mean(axis=(1, 2)) / pers), np.nan)
    m, s, n = mean_se(log_ratio)
    out["relative_score"] = _float(np.exp(m))
    out["relative_score_se"] = _float(np.exp(m) * s)
    out["relative_systems"] = int(n)

    per_h: dict[str, dict[str, list]] = {}
    for v, name in enumerate(VARIABLES):
        block: dict[str, list] = {}
        for metric, values in per_value.items():
            mean, se, _ = mean_se(values[:, :, v])
            block[metric], block[f"{metric}_se"] = _floats(mean), _floats(se)
        block["coverage"] = _floats(ok.mean(axis=0))
        per_h[name] = block
    out["per_horizon"] = per_h
    out["malformed_per_step"] = [int(x) for x in (~ok).sum(axis=0)]
    return out


def _better_median(diff: np.ndarray) -> tuple[int, float | None]:
    """(systems whose mean difference is below zero, the median of the per-system means) of diff (N, ...)."""
    per_system = diff.reshape(diff.shape[0], -1).mean(1)
    return int((per_system < 0).sum()), _float(float(np.median(per_system)))


def _summary_masked(masked: np.ndarray) -> tuple[float | None, float | None]:
    """Like ``_summary`` but NaN values are left out of each system's mean (a system with none drops out)."""
    per_system = mean_se(masked.reshape(masked.shape[0], -1), axis=1)[0]
    m, s, _ = mean_se(per_system)
    return _float(m), _float(s)


def paired_difference(pred_a: np.ndarray, pred_b: np.ndarray, truth: np.ndarray, last_prompt: np.ndarray, *,
                      common: np.ndarray | None = None, short_horizon: int = 10) -> dict[str, Any]:
    """a - b on the same systems (negative: a is better), each with its SE over systems:

    ``mae_diff`` filled-in MAE (every step; ``mae_diff_h1_{k}`` the first k steps), ``common_mae_diff``
    over the steps valid in both (and in ``common`` if given), ``log_relative_diff`` the mean difference
    of log(MAE / persistence's MAE) (exp of it is the ratio of the two relative scores), and per
    horizon step ``per_horizon[variable]["mae_diff"/"se"]`` of the filled-in absolute errors; ``better``
    the systems whose filled-in MAE a beats and ``median`` the median over systems of the per-system
    difference (a few systems whose phase drifts can decide the mean; the median and the count say
    whether they do), and ``blocks[h1_10 | h11_25 | h26_50]`` the same four figures (``mae_diff``,
    ``se``, ``better``, ``median``) over each horizon block.
    """
    pred_a, truth, last_prompt = _check(pred_a, truth, last_prompt)
    pred_b, _, _ = _check(pred_b, truth, last_prompt)
    N, H, _ = truth.shape
    ea = np.abs(fill_malformed(pred_a, last_prompt) - truth)
    eb = np.abs(fill_malformed(pred_b, last_prompt) - truth)
    diff = ea - eb
    out: dict[str, Any] = {"systems": N}
    out["mae_diff"], out["mae_diff_se"] = _summary(diff)
    out["better"], out["median"] = _better_median(diff)
    out["blocks"] = {}
    for block, steps in horizon_blocks(H).items():
        d = diff[:, steps]
        m, se = _summary(d)
        better, median = _better_median(d)
        out["blocks"][block] = {"mae_diff": m, "se": se, "better": better, "median": median}
    if H > short_horizon:
        k = short_horizon
        out[f"mae_diff_h1_{k}"], out[f"mae_diff_h1_{k}_se"] = _summary(diff[:, :k])
    support = valid_steps(pred_a) & valid_steps(pred_b)
    if common is not None:
        support &= np.asarray(common, dtype=bool)
    out["common_mae_diff"], out["common_mae_diff_se"] = _summary_masked(np.where(support[..., None], diff, np.nan))
    pers = np.abs(last_prompt[:, None] - truth).mean(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.where(pers > 0, np.log(ea.mean(axis=(1, 2))) - np.log(eb.mean(axis=(1, 2))), np.nan)
    m, s, _ = mean_se(lr)
    out["log_relative_diff"], out["log_relative_diff_se"] = _float(m), _float(s)
    out["per_horizon"] = {}
    for v, name in enumerate(VARIABLES):
        mean, se, _ = mean_se(diff[:, :, v])
        out["per_horizon"][name] = {"mae_diff": _floats(mean), "se": _floats(se)}
    return out


def median_and_band(samples: np.ndarray, quantiles: tuple[float, float] = (0.1, 0.9)) -> tuple[np.ndarray, np.ndarray]:
    """(median (N, H, 2), band (N, 2, H, 2)) of sampled forecasts (N, S, H, 2) over the samples,
    ignoring NaN (a malformed sample drops out of that step only); NaN where no sample is valid.
    band[:, 0] is the lower quantile (default 10%), band[:, 1] the upper (90%)."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 4 or samples.shape[3] != 2:
        raise ValueError(f"samples {samples.shape} must be (N, S, H, 2)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(samples, axis=1)
        band = np.nanquantile(samples, list(quantiles), axis=1).transpose(1, 0, 2, 3)
    return median, band


def compare(forecasts: dict[str, np.ndarray], truth: np.ndarray, last_prompt: np.ndarray, *,
            samples: dict[str, np.ndarray] | None = None, reference: str = "untrained", focus: str = "trained",
            short_horizon: int = 10) -> dict[str, Any]:
    """Score every forecaster on the same systems and pair them up.

    ``forecasts``: name -> (N, H, 2), NaN where malformed; ``samples``: name -> (N, S, H, 2) for the
    forecasters that are the median of samples (adds CRPS and band coverage). The common support is
    the steps valid in *every* forecast given. Paired differences: every forecaster minus
    ``reference`` (when present), and ``focus`` minus every other (when present), named "a - b".
    Returns {"summary": name -> forecast_scores, "paired": "a - b" -> paired_difference,
    "common_support": {"steps", "of"}}.
    """
    samples = samples or {}
    common = np.logical_and.reduce([valid_steps(p) for p in forecasts.values()])
    summary = {name: forecast_scores(pred, truth, last_prompt, common=common, samples=samples.get(name),
                                     short_horizon=short_horizon) for name, pred in forecasts.items()}
    pairs = [(a, reference) for a in forecasts if a != reference and reference in forecasts]
    pairs += [(focus, b) for b in forecasts if b not in (focus, reference) and focus in forecasts]
    paired = {f"{a} - {b}": paired_difference(forecasts[a], forecasts[b], truth, last_prompt, common=common,
                                              short_horizon=short_horizon) for a, b in pairs}
    support = {"steps": int(common.sum()), "of": int(common.size)}
    return {"summary": summary, "paired": paired, "common_support": support}


# One line per figure of ``forecast_scores`` / ``paired_difference``, written into forecast_metrics.json.
DEFINITIONS = {
    "coverage": "fraction of (system, step) pairs whose forecast decoded (strictly, with the run's encoding)",
    "mae, mse": "filled-in errors over every step and both variables: " + FILL_RULE,
    "mae_h1_10": "the same over the first 10 steps",
    "common_mae": "MAE over the steps that decoded in every forecast compared (the common support)",
    "relative_score": "geometric mean over systems of MAE / last-value persistence's MAE on that system (< 1 beats it)",
    "crps, band_coverage": "median-of-samples forecasts: CRPS of the filled-in samples; fraction of true values "
                           "inside their 10-90% band",
    "*_se": "standard error over systems (per-system figures, sample sd / sqrt(n))",
    "paired 'a - b'": "per-system differences a - b (negative: a is better), mean and SE over systems",
}

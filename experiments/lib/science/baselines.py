"""Forecast baselines fitted to the same prompts the language model sees.

Each baseline is a function ``(prompt_values (N, C, 2), prompt_times (C,), future_times (H,)) ->
forecast (N, H, 2)`` in original units, columns (prey, predator). ``BASELINES`` maps their names to
them, so forecast.py scores every one on the same systems as the language models:

- ``persistence``: the last prompt value, repeated. The floor any forecaster has to beat.
- ``linear_ar``: a vector autoregression of order ``AR_ORDER`` with intercept, fitted per prompt by
  ridge-stabilised least squares and iterated forward. The best a linear model of the recent past can
  do, without knowing the dynamics.
- ``ode_fit``: the Rosenzweig-MacArthur model (the family the data come from), its six parameters and
  initial state fitted per prompt by gradient descent through ``lotka_volterra.integrate`` and then
  integrated forward. Roughly the ceiling: the right model class, only its parameters unknown.

``ode_fit_diagnostics()`` reports how the last ODE fit went (fallbacks to persistence, fit error,
seconds), since a baseline that silently failed on some systems would flatter the language model.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from experiments.lib.science.lotka_volterra import PARAM_NAMES, PARAM_RANGES, integrate

Baseline = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _check(prompt_values: np.ndarray, prompt_times: np.ndarray, future_times: np.ndarray) -> tuple:
    values = np.asarray(prompt_values, dtype=np.float64)
    t_prompt, t_future = np.asarray(prompt_times, dtype=np.float64), np.asarray(future_times, dtype=np.float64)
    if values.ndim != 3 or values.shape[2] != 2 or values.shape[1] != len(t_prompt) or len(t_prompt) < 1:
        raise ValueError(f"prompt values {values.shape} and times {t_prompt.shape} are not (N, C, 2) and (C,)")
    if t_future.ndim != 1:
        raise ValueError(f"future times must be 1-D, got {t_future.shape}")
    return values, t_prompt, t_future


# ---------------------------------------------------------------------------------------------
# Persistence


def persistence(prompt_values: np.ndarray, prompt_times: np.ndarray, future_times: np.ndarray) -> np.ndarray:
    """Every future step equals the last prompt step."""
    values, _, t_future = _check(prompt_values, prompt_times, future_times)
    return np.repeat(values[:, -1:, :], len(t_future), axis=1)


# ---------------------------------------------------------------------------------------------
# Vector autoregression

AR_ORDER = 2      # lags: 2 is the fewest that can oscillate by itself (a damped/undamped rotation in the plane)
AR_RIDGE = 1e-4   # relative ridge: a fraction of the mean diagonal of the lagged Gram matrix
AR_CAP = 10.0     # forecasts clipped to [0, AR_CAP x the prompt's largest value] per variable


def fit_ar(prompt_values: np.ndarray, order: int = AR_ORDER, ridge: float = AR_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Per system, ``x_t = c + sum_k A_k x_{t-k}``: returns (c (N, 2), A (N, order, 2, 2)).

    Why ridge: a prompt of a smooth oscillation makes the lag columns nearly collinear, and plain
    least squares then returns huge, cancelling coefficients that explode when iterated. The penalty
    is relative (scaled by the Gram matrix's mean diagonal) so it means the same in any units, and it
    leaves the intercept free (the data are centred first) so a constant level costs nothing.
    """
    x = np.asarray(prompt_values, dtype=np.float64)
    N, C, _ = x.shape
    if x.shape[1] <= order:
        raise ValueError(f"an AR({order}) needs at least {order + 1} prompt steps, got {C}")
    # rows t = order..C-1: features [x_{t-1}, ..., x_{t-order}] (2*order), targets x_t (2)
    lags = np.concatenate([x[:, order - k:C - k] for k in range(1, order + 1)], axis=2)   # (N, C-order, 2*order)
    target = x[:, order:]
    lag_mean, target_mean = lags.mean(axis=1, keepdims=True), target.mean(axis=1, keepdims=True)
    X, Y = lags - lag_mean, target - target_mean
    gram = X.transpose(0, 2, 1) @ X
    lam = ridge * np.trace(gram, axis1=1, axis2=2) / gram.shape[1]
    gram = gram + (lam[:, None, None] + 1e-300) * np.eye(gram.shape[1])
    B = np.linalg.solve(gram, X.transpose(0, 2, 1) @ Y)                  # (N, 2*order, 2): x_t = lags @ B
    c = target_mean[:, 0] - np.einsum("nf,nfj->nj", lag_mean[:, 0], B)
    A = B.reshape(N, order, 2, 2).transpose(0, 1, 3, 2)                 # A[n, k] maps x_{t-k-1} to x_t
    return c, A


def linear_ar(prompt_values: np.ndarray, prompt_times: np.ndarray, future_times: np.ndarray,
              order: int = AR_ORDER, ridge: float = AR_RIDGE) -> np.ndarray:
    """Fit ``fit_ar`` to each prompt and iterate it forward, feeding its own forecasts back.

    Clipped to [0, AR_CAP x prompt maximum] at every step: populations cannot be negative, and an
    unstable fitted recursion would otherwise reach astronomically large values that swamp every
    mean squared error. Assumes equally spaced times (as the data are); the times are not used.
    """
    values, _, t_future = _check(prompt_values, prompt_times, future_times)
    c, A = fit_ar(values, order, ridge)
    cap = AR_CAP * values.max(axis=1)                                    # (N, 2)
    history = [values[:, -k] for k in range(1, order + 1)]               # most recent first
    out = np.empty((values.shape[0], len(t_future), 2))
    for h in range(len(t_future)):
        nxt = c + sum(np.einsum("nij,nj->ni", A[:, k], history[k]) for k in range(order))
        nxt = np.clip(nxt, 0.0, cap)
        out[:, h] = nxt
        history = [nxt, *history[:-1]]
    return out


# ---------------------------------------------------------------------------------------------
# Rosenzweig-MacArthur fitted to the prompt

ODE_RESTARTS = 8        # initial guesses per system; batched, so they cost little more than one
ODE_STEPS = 250         # Adam steps (measured: 150 leaves a tenth of the fits visibly unconverged)
ODE_LR = 0.05           # in log space: each step changes a parameter by about 5%
ODE_SUBSTEPS = 2        # RK4 steps per sample interval, for the fit and the forecast alike
ODE_WIDEN = 2.0         # parameters are kept within the data set's ranges widened by this factor each way
ODE_FLOOR = 0.01        # log(value + ODE_FLOOR x the prompt mean of that variable): relative error, floored
_last_diagnostics: dict[str, Any] = {}


def ode_fit_diagnostics() -> dict[str, Any]:
    """How the last ``ode_fit`` call went: systems, fallbacks (to persistence) and their indices,
    the per-system prompt fit error (RMS of the floored log error) and the seconds it took."""
    return dict(_last_diagnostics)


def _initial_guesses(restarts: int, seed: int) -> np.ndarray:
    """(restarts, 6) log-parameters: the centre of the ranges (geometric mean) and then seeded
    uniform draws in log space inside the data set's ranges, so every system gets the same guesses."""
    lo = np.log([PARAM_RANGES[k][0] for k in PARAM_NAMES])
    hi = np.log([PARAM_RANGES[k][1] for k in PARAM_NAMES])
    rng = np.random.default_rng(seed)
    draws = lo + (hi - lo) * rng.uniform(size=(max(restarts - 1, 0), len(PARAM_NAMES)))
    return np.concatenate([((lo + hi) / 2)[None], draws])[:restarts]


def _log_error(sim: torch.Tensor, obs: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Per-system mean squared log error, ``log(v + floor)`` per variable: both variables count
    equally whatever their scale, and a population near zero cannot dominate (the floor)."""
    d = torch.log(sim.clamp_min(0) + floor) - torch.log(obs + floor)
    return (d ** 2).mean(dim=(-2, -1))


def fit_ode(prompt_values: np.ndarray, prompt_times: np.ndarray, *, restarts: int = ODE_RESTARTS,
            steps: int = ODE_STEPS, lr: float = ODE_LR, substeps: int = ODE_SUBSTEPS,
            seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Fit (r, K, a, h, e, m) and the initial state to every prompt at once.

    Returns (params {name: (N,)}, initial state (N, 2) at prompt_times[0], prompt loss (N,)).
    Everything is in log space: positivity for free and steps that are relative changes. All
    N x restarts fits run as one batch through ``integrate`` (its cost is per operation, not per
    system, on CPU), Adam's update is elementwise so the fits do not interact, and each system keeps
    the restart with the smallest final prompt loss. Parameters are projected into the data set's
    ranges widened by ODE_WIDEN after every step, which keeps the fixed-step RK4 stable; a fit that
    still produces non-finite values has its loss set to infinity and is never chosen.
    """
    values = np.asarray(prompt_values, dtype=np.float64)
    N = values.shape[0]
    R = restarts
    obs = torch.as_tensor(values).repeat(R, 1, 1)                                  # (R*N, C, 2), restart-major
    floor = ODE_FLOOR * obs.mean(dim=1, keepdim=True).clamp_min(1e-12)
    t = torch.as_tensor(np.asarray(prompt_times, dtype=np.float64))
    guesses = torch.as_tensor(_initial_guesses(R, seed)).repeat_interleave(N, dim=0)   # (R*N, 6)
    theta = guesses.clone().requires_grad_(True)
    state0 = torch.log(obs[:, 0].clamp_min(1e-8)).clone().requires_grad_(True)   # start at the first observation
    lo = torch.log(torch.tensor([PARAM_RANGES[k][0] / ODE_WIDEN for k in PARAM_NAMES], dtype=torch.float64))
    hi = torch.log(torch.tensor([PARAM_RANGES[k][1] * ODE_WIDEN for k in PARAM_NAMES], dtype=torch.float64))
    state_lo, state_hi = state0.detach() - np.log(4.0), state0.detach() + np.log(4.0)

    def loss_per_fit() -> torch.Tensor:
        p = dict(zip(PARAM_NAMES, torch.exp(theta).unbind(-1), strict=True))
        y0 = torch.exp(state0)
        sim = integrate(y0[:, 0], y0[:, 1], p, t, substeps=substeps)
        return _log_error(sim, obs, floor)

    opt = torch.optim.Adam([theta, state0], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_per_fit()
        finite = torch.isfinite(loss)
        torch.where(finite, loss, torch.zeros_like(loss)).sum().backward()
        for v in (theta, state0):   # a diverged fit must not poison Adam's moments with NaN
            v.grad = torch.nan_to_num(v.grad, nan=0.0, posinf=0.0, neginf=0.0)
        opt.step()
        with torch.no_grad():
            theta.copy_(torch.maximum(torch.minimum(theta, hi), lo))
            state0.copy_(torch.maximum(torch.minimum(state0, state_hi), state_lo))
    with torch.no_grad():
        final = loss_per_fit()
        final = torch.where(torch.isfinite(final), final, torch.full_like(final, float("inf")))
        best = final.view(R, N).argmin(dim=0)                                    # (N,)
        idx = best * N + torch.arange(N)
        params = {k: torch.exp(theta[idx, i]).numpy() for i, k in enumerate(PARAM_NAMES)}
        return params, torch.exp(state0[idx]).numpy(), final[idx].numpy()


def ode_fit(prompt_values: np.ndarray, prompt_times: np.ndarray, future_times: np.ndarray, *,
            restarts: int | None = None, steps: int | None = None, lr: float | None = None,
            substeps: int | None = None, seed: int = 0) -> np.ndarray:
    """Fit the Rosenzweig-MacArthur model to each prompt (``fit_ode``) and integrate it forward.

    The forecast integrates from the fitted initial state across prompt and future times with the
    same RK4 step as the fit, so the forecast continues exactly the trajectory that was fitted. A
    system whose fit or forecast is non-finite (or negative, or over 1e6 x the prompt's largest
    value) falls back to persistence; how many did is in ``ode_fit_diagnostics()`` and in a warning.
    Settings left at None take the module's ODE_* values at call time.
    """
    values, t_prompt, t_future = _check(prompt_values, prompt_times, future_times)
    # None: the module's settings, read now, so a test can lower baselines.ODE_STEPS for a quick run
    restarts = ODE_RESTARTS if restarts is None else restarts
    steps = ODE_STEPS if steps is None else steps
    lr = ODE_LR if lr is None else lr
    substeps = ODE_SUBSTEPS if substeps is None else substeps
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: the cost is per-operation overhead, which threads only add to
    try:
        params, initial, loss = fit_ode(values, t_prompt, restarts=restarts, steps=steps, lr=lr, substeps=substeps,
                                        seed=seed)
    finally:
        torch.set_num_threads(threads)
    t_all = np.concatenate([t_prompt, t_future])
    forecast = integrate(initial[:, 0], initial[:, 1], params, t_all, substeps=substeps)[:, len(t_prompt):]
    scale = values.max(axis=(1, 2))
    bad = ~np.isfinite(loss) | ~np.isfinite(forecast).all(axis=(1, 2)) \
        | (forecast < 0).any(axis=(1, 2)) | (np.abs(forecast).max(axis=(1, 2), initial=0) > 1e6 * scale)
    if bad.any():
        forecast[bad] = persistence(values[bad], t_prompt, t_future)
        warnings.warn(f"ode_fit: {int(bad.sum())} of {len(values)} system(s) fell back to persistence "
                      f"(non-finite or diverging fit)", RuntimeWarning, stacklevel=2)
    _last_diagnostics.clear()
    _last_diagnostics.update(
        systems=len(values), fallbacks=int(bad.sum()), fallback_ids=np.flatnonzero(bad).tolist(),
        prompt_rms_log_error=np.sqrt(loss).tolist(), restarts=restarts, steps=steps, substeps=substeps,
        seconds=time.perf_counter() - start)
    return forecast


BASELINES: dict[str, Baseline] = {"persistence": persistence, "linear_ar": linear_ar, "ode_fit": ode_fit}

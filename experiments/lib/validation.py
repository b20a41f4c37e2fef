"""What train.py scores at each evaluation, and by which score it keeps the best adapter.

Teacher-forced cross-entropy on validation windows is cheap, but a lower one does not mean better
forecasts: most of it sits in the digits below the data's resolution, and a model that has learnt
to extrapolate locally scores well on it while its free-running forecasts drift into trends. So
by default an evaluation also *forecasts* a few validation systems, exactly as forecast.py does
(prompt = the first C steps, H steps greedy, strict decoding), and the adapter kept is the one with
the best relative score there (geometric mean over systems of MAE / persistence's MAE, malformed
steps filled in, so failing to answer cannot win). An evaluation at step 0 puts the untrained model
among the candidates: a run whose training does not help keeps it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from experiments.lib import data, forecasting, llmtime, metrics, planning, runs, training
from experiments.lib.training import RunState
from qwen_min import Qwen2, Tokenizer


@dataclass
class ForecastSet:
    """The validation systems forecast at every evaluation, and the generate call that forecasts them."""

    prompts: list[str]
    truth: np.ndarray          # (N, H, 2) original units
    last: np.ndarray           # (N, 2) the last prompt step: persistence, and the fill of malformed steps
    encoding: llmtime.EncodingConfig
    calls: list[dict]          # the one greedy generate call, run to its token limit (forecasting.planned_calls)
    to_limit: bool = False     # run it to the token limit (--run-to-limit), so it costs exactly what was planned

    @property
    def horizon(self) -> int:
        return self.truth.shape[1]


def forecast_set_of(args: argparse.Namespace, run_data: runs.RunData, tokenizer: Tokenizer) -> ForecastSet | None:
    """train.py's validation forecasts: the first --val-forecast-systems validation systems (None for 0)."""
    if args.val_forecast_systems < 0:
        raise SystemExit(f"--val-forecast-systems {args.val_forecast_systems}: must be 0 or more")
    if not args.val_forecast_systems:
        return None
    return forecast_set(run_data.trajectories, run_data.systems("val", args.val_forecast_systems), run_data.encoding,
                        tokenizer, context_steps=args.context_steps, horizon=args.horizon, to_limit=args.run_to_limit)


def forecast_set(trajectories: np.ndarray, systems: np.ndarray, encoding: llmtime.EncodingConfig,
                 tokenizer: Tokenizer, *, context_steps: int, horizon: int, to_limit: bool = False) -> ForecastSet:
    """The prompts and truths of ``systems`` (forecast.py's own, via ``data.forecast_examples``)."""
    if not len(systems):
        raise SystemExit("--val-forecast-systems: no validation system to forecast")
    try:
        examples = data.forecast_examples(trajectories, systems, encoding, context_steps=context_steps,
                                          horizon=horizon)
    except ValueError as e:
        raise SystemExit(f"--context-steps/--horizon: {e}") from None
    prompts = [e.prompt for e in examples]
    calls = forecasting.planned_calls([len(ids) for ids in tokenizer.encode_batch(prompts)], prompts, horizon,
                                      batch_size=len(prompts), num_samples=1, vocab=len(forecasting.ALPHABET),
                                      sampled=False)
    return ForecastSet(prompts, np.stack([e.target for e in examples]), trajectories[systems, context_steps - 1],
                       encoding, calls, to_limit)


def score_forecasts(model: Qwen2, tokenizer: Tokenizer, fs: ForecastSet, device: torch.device,
                    on_call: Callable[[dict, float], None] | None = None) -> dict[str, float | None]:
    """Greedy forecasts of ``fs`` in one generate call (charged through ``on_call``), scored as
    forecast.py scores them: relative score, filled-in MAE (overall and first 10 steps), coverage."""
    run = forecasting.forecast(model, tokenizer, fs.prompts, fs.horizon, fs.encoding, batch_size=len(fs.prompts),
                               device=device, to_limit=fs.to_limit, on_call=on_call)
    s = metrics.forecast_scores(run.values[:, 0], fs.truth, fs.last)
    if s["relative_score"] is None or not math.isfinite(s["relative_score"]):
        raise SystemExit("validation forecasts: no system has a nonzero persistence error to compare with; "
                         "choose other --val-forecast-systems or --select-by loss")
    return {k: s.get(k) for k in ("relative_score", "mae", "mae_h1_10", "coverage")}


class Validator:
    """One evaluation of train.py: the cross-entropy of the fixed validation subset and (with a
    ForecastSet) the greedy forecasts of the validation systems, each charged to the ledger as kind
    ``eval`` as it ends and logged; then early stopping's bookkeeping by the ``select_by`` score,
    keeping a copy of the best adapter in ``best``. Every rank of a data-parallel run evaluates, so
    every charge is ``world`` times one rank's work."""

    def __init__(self, windows: data.Windows, forecasts: ForecastSet | None, *, select_by: str, batch_size: int,
                 costs: planning.ScoredCosts, booking: training.Booking, log: training.MetricsLog,
                 tokenizer: Tokenizer, device: torch.device, world: int = 1,
                 best: dict[str, torch.Tensor] | None = None) -> None:
        if select_by not in runs.SELECT_BY:
            raise ValueError(f"select by {select_by!r}: one of {runs.SELECT_BY}")
        if select_by == "forecast" and forecasts is None:
            raise SystemExit("--select-by forecast needs --val-forecast-systems > 0")
        self.windows, self.forecasts, self.select_by, self.batch_size = windows, forecasts, select_by, batch_size
        self.costs, self.booking, self.log = costs, booking, log
        self.tokenizer, self.device, self.world = tokenizer, device, world
        self.best = best or {}  # the best adapter so far (a resumed run's from its checkpoint); empty: none yet

    def __call__(self, model: Qwen2, state: RunState, lr: float) -> None:
        model.eval()
        ids, labels = self.windows.input_ids, self.windows.labels
        loss, scored = training.windows_loss(model, ids, labels, self.batch_size, self.device,
                                             what="the validation subset")
        with self.booking.held():  # the evaluation's charge and its metrics row: a signal waits for both
            self._charge(state, self.costs.evaluation(len(ids), scored), len(ids) * ids.shape[1],
                         {"split": "val", "step": state.step, "windows": len(ids)})
            self.log(state, "val", loss, lr, scored_tokens=scored)
        training.check_finite(loss, "validation-subset", state.step)
        figures: dict[str, float | None] = {"val_loss": loss}
        if self.forecasts is not None:
            figures |= score_forecasts(model, self.tokenizer, self.forecasts, self.device, on_call=lambda call, f: (
                self._charge(state, f, call["batch"] * call["steps"],
                             {"split": "val", "step": state.step, "forecast": call})))
            with self.booking.held():
                self.log(state, "val_forecast", None, lr, **{k: v for k, v in figures.items() if k != "val_loss"})
        model.train()
        score = figures["relative_score"] if self.select_by == "forecast" else loss
        if state.record_val(score, figures):
            self.best = training.trainable_copy(model)

    def _charge(self, state: RunState, flops: float, tokens: int, config: dict) -> None:
        with self.booking.held():  # the charge and the run's count of its FLOPs: both or neither
            state.flops += self.world * flops
            self.booking.charge(self.world * flops, kind="eval", tokens=self.world * tokens, config=config)

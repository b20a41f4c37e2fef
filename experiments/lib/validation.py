"""What train.py scores at each evaluation, and by which score it keeps the best adapter.

Teacher-forced cross-entropy on validation windows is cheap, but a lower one does not mean better
forecasts: most of it sits in the digits below the data's resolution, and a model that has learnt
to extrapolate locally scores well on it while its free-running forecasts drift into trends. So
by default an evaluation also *forecasts* validation systems, exactly as forecast.py does (prompt =
the first C steps, H steps greedy, strict decoding), and the adapter kept is the one whose
forecasts have the lowest filled-in MAE (malformed steps filled in, so failing to answer cannot
win): the headline metric itself, on enough systems (32 by default) that a real difference stands
out of the noise. The relative score is reported beside it (``--select-by relative`` chooses by
it; a geometric mean of per-system ratios, it is noisier and can disagree with the MAE). The
evaluation at step 0 puts the untrained model among the candidates, and its forecasts are kept:
every later evaluation records, per horizon block, the paired per-system difference to them with
its standard error, so a run's log says whether and where training helps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from experiments.lib import data, errors, forecasting, llmtime, metrics, planning, runs, training
from experiments.lib.accounts import RunAccounts
from experiments.lib.config import SELECT_BY, TrainConfig
from experiments.lib.metrics_log import MetricsLog
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
    tokenizer: Tokenizer       # what the prompts are encoded with (and the calls were priced by)
    to_limit: bool = False     # run it to the token limit (--run-to-limit), so it costs exactly what was planned

    @property
    def horizon(self) -> int:
        return self.truth.shape[1]


def forecast_set_of(cfg: TrainConfig, run_data: runs.RunData, tokenizer: Tokenizer) -> ForecastSet | None:
    """train.py's validation forecasts: the first --val-forecast-systems validation systems (None for 0)."""
    if not cfg.val_forecast_systems:
        return None
    return forecast_set(run_data.trajectories, run_data.systems("val", cfg.val_forecast_systems), run_data.encoding,
                        tokenizer, context_steps=cfg.context_steps, horizon=cfg.horizon, to_limit=cfg.run_to_limit)


def forecast_set(trajectories: np.ndarray, systems: np.ndarray, encoding: llmtime.EncodingConfig,
                 tokenizer: Tokenizer, *, context_steps: int, horizon: int, to_limit: bool = False) -> ForecastSet:
    """The prompts and truths of ``systems`` (forecast.py's own, via ``data.forecast_examples``)."""
    if not len(systems):
        raise errors.UsageError("--val-forecast-systems: no validation system to forecast")
    try:
        examples = data.forecast_examples(trajectories, systems, encoding, context_steps=context_steps,
                                          horizon=horizon)
    except ValueError as e:
        raise errors.UsageError(f"--context-steps/--horizon: {e}") from None
    prompts = [e.prompt for e in examples]
    calls = forecasting.planned_calls([len(ids) for ids in tokenizer.encode_batch(prompts)], prompts, horizon,
                                      batch_size=len(prompts), num_samples=1, vocab=len(forecasting.ALPHABET),
                                      sampled=False)
    return ForecastSet(prompts, np.stack([e.target for e in examples]), trajectories[systems, context_steps - 1],
                       encoding, calls, tokenizer, to_limit)


def score_forecasts(model: Qwen2, fs: ForecastSet, device: torch.device,
                    on_call: Callable[[dict, float], None] | None = None) -> dict:
    """Greedy forecasts of ``fs`` in one generate call (charged through ``on_call``), scored as
    forecast.py scores them: relative score, filled-in MAE (overall, first 10 steps, each horizon
    block), coverage; ``"forecasts"`` holds the values themselves (N, H, 2), NaN where malformed."""
    run = forecasting.forecast(model, fs.tokenizer, fs.prompts, fs.horizon, fs.encoding, batch_size=len(fs.prompts),
                               device=device, to_limit=fs.to_limit, on_call=on_call)
    values = run.values[:, 0]
    s = metrics.forecast_scores(values, fs.truth, fs.last)
    if s["relative_score"] is None or not math.isfinite(s["relative_score"]):
        raise errors.DataError("validation forecasts: no system has a nonzero persistence error to compare with; "
                               "choose other --val-forecast-systems or --select-by loss")
    blocks = {f"mae_{b}": v["mae"] for b, v in s["blocks"].items()}
    return {k: s.get(k) for k in ("relative_score", "mae", "mae_h1_10", "coverage")} | blocks | {"forecasts": values}


def vs_untrained(values: np.ndarray, untrained: np.ndarray, fs: ForecastSet) -> dict:
    """These forecasts minus the untrained model's, system by system (negative: better): filled-in
    MAE overall and per horizon block, each with its SE over systems and the systems that improved."""
    d = metrics.paired_difference(values, untrained, fs.truth, fs.last)
    return {"mae_diff": d["mae_diff"], "se": d["mae_diff_se"], "better": d["better"], "systems": d["systems"],
            "blocks": d["blocks"]}


# The score each --select-by keeps the lowest of.
SELECTION_SCORE = {"mae": "mae", "relative": "relative_score", "loss": "val_loss"}


def selection_score(figures: dict, select_by: str) -> float:
    """The figure of one evaluation that ``select_by`` compares (lower is better; missing: worst)."""
    value = figures.get(SELECTION_SCORE[select_by])
    return math.inf if value is None or not math.isfinite(value) else float(value)


class Validator:
    """One evaluation of train.py: the cross-entropy of the fixed validation subset and (with a
    ForecastSet) the greedy forecasts of the validation systems, each charged (``accounts``, kind
    ``eval``) as it ends and logged; then early stopping's bookkeeping by the ``select_by`` score,
    keeping a copy of the best adapter in ``best``. The forecasts at step 0 (the untrained model)
    are kept in ``untrained``; every evaluation after them logs ``vs_untrained``. A resumed run
    passes its checkpoint's ``best`` and ``untrained``."""

    def __init__(self, windows: data.Windows, forecasts: ForecastSet | None, *, select_by: str,
                 accounts: RunAccounts, log: MetricsLog, best: dict[str, torch.Tensor] | None = None,
                 untrained: np.ndarray | None = None) -> None:
        if select_by not in SELECT_BY:
            raise ValueError(f"select by {select_by!r}: one of {SELECT_BY}")
        if select_by != "loss" and forecasts is None:
            raise errors.UsageError(f"--select-by {select_by} needs --val-forecast-systems > 0")
        self.windows, self.forecasts, self.select_by, self.accounts, self.log = windows, forecasts, select_by, \
            accounts, log
        self.best = best or {}  # the best adapter so far (a resumed run's from its checkpoint); empty: none yet
        self.untrained = untrained  # the step-0 forecasts (a resumed run's from its checkpoint); None: not yet

    def __call__(self, model: Qwen2, state: RunState, lr: float) -> None:
        ids, labels, costs, accounts = self.windows.input_ids, self.windows.labels, self.accounts.costs, self.accounts
        device = model.lm_head.weight.device
        cost = costs.evaluation(len(ids), int((labels != -100).sum()))
        if self.forecasts is not None:   # (generation priced at its token limit: at least what it spends)
            cost += planning.calls_flops(costs.shape, self.forecasts.calls)
        accounts.before_eval(cost)
        model.eval()
        loss, scored = training.windows_loss(model, ids, labels, costs.batch_size, device,
                                             what="the validation subset")
        with accounts.held():  # the evaluation's charge and its metrics row: a signal waits for both
            accounts.eval_done(costs.evaluation(len(ids), scored), len(ids) * ids.shape[1],
                               {"split": "val", "step": state.step, "windows": len(ids)})
            self.log(state, "val", loss, lr, scored_tokens=scored)
        training.check_finite(loss, "validation-subset", state.step)
        figures: dict = {"val_loss": loss}
        if self.forecasts is not None:
            figures |= score_forecasts(model, self.forecasts, device, on_call=lambda call, f: accounts.eval_done(
                f, call["batch"] * call["steps"], {"split": "val", "step": state.step, "forecast": call}))
            values = figures.pop("forecasts")
            if state.step == 0:   # every LoRA B is still zero: these are the untrained model's forecasts
                self.untrained = values
            if self.untrained is not None:
                figures["vs_untrained"] = vs_untrained(values, self.untrained, self.forecasts)
            with accounts.held():
                self.log(state, "val_forecast", None, lr, **{k: v for k, v in figures.items() if k != "val_loss"})
        model.train()
        if state.record_val(selection_score(figures, self.select_by), figures):
            self.best = training.trainable_copy(model)

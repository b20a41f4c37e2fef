"""What train.py scores at each evaluation (the cross-entropy of windows, the validation forecasts),
and by which score it keeps the best adapter.

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

import qwen_min
from experiments.lib import errors
from experiments.lib.science import data, forecasting, llmtime, metrics
from qwen_min import Qwen2, Tokenizer


@torch.no_grad()
def windows_loss(model: Qwen2, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 device: torch.device, *, what: str = "the windows",
                 after_batch: Callable[[int, int], None] | None = None) -> tuple[float, int]:
    """Mean next-token cross-entropy over every scored label (padding excluded), and their count.

    ``after_batch(rows, scored_tokens)`` is called as each batch is done (to charge it). No scored
    label at all is an error naming ``what``, raised before any work."""
    if not bool((labels != -100).any()):
        raise ValueError(f"{what}: no token to score ({len(input_ids)} windows, every label padding)")
    total, count = 0.0, 0
    for i in range(0, len(input_ids), batch_size):
        ids, y = input_ids[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        h = model.hidden(ids)  # right padding: causal attention already keeps real tokens off the pads
        total += qwen_min.chunked_cross_entropy(h, model.lm_head, y, reduction="sum").item()
        scored = int((y != -100).sum())
        count += scored
        if after_batch:
            after_batch(len(ids), scored)
    return total / count, count


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


def evaluate(model: Qwen2, windows: data.Windows, forecasts: ForecastSet | None, batch_size: int, *,
             after_loss: Callable[[float, int], None] | None = None,
             on_call: Callable[[dict, float], None] | None = None) -> dict:
    """One evaluation: the mean cross-entropy of ``windows`` (in batches of ``batch_size``) and, with
    a forecast set, its greedy forecasts scored (``score_forecasts``). Returns the figures:
    ``val_loss``, and the forecasts' scores with their values (``"forecasts"``).

    ``after_loss(loss, scored_tokens)`` is called once the cross-entropy is done, before any
    forecast; ``on_call(call, flops)`` as each generate call ends. The model is in eval mode
    meanwhile, and back in the mode it was in afterwards."""
    was_training = model.training
    model.eval()
    try:
        loss, scored = windows_loss(model, windows.input_ids, windows.labels, batch_size, model.lm_head.weight.device,
                                    what="the validation subset")
        if after_loss:
            after_loss(loss, scored)
        figures: dict = {"val_loss": loss}
        if forecasts is not None:
            figures |= score_forecasts(model, forecasts, model.lm_head.weight.device, on_call=on_call)
    finally:
        model.train(was_training)
    return figures


def vs_untrained(values: np.ndarray, untrained: np.ndarray, fs: ForecastSet) -> dict:
    """These forecasts minus the untrained model's, system by system (negative: better): filled-in
    MAE overall and per horizon block, each with its SE over systems, the systems that improved and
    the median per-system difference."""
    d = metrics.paired_difference(values, untrained, fs.truth, fs.last)
    return {"mae_diff": d["mae_diff"], "se": d["mae_diff_se"], "better": d["better"], "median": d["median"],
            "systems": d["systems"], "blocks": d["blocks"]}


# The score each --select-by keeps the lowest of.
SELECTION_SCORE = {"mae": "mae", "relative": "relative_score", "loss": "val_loss"}


def selection_score(figures: dict, select_by: str) -> float:
    """The figure of one evaluation that ``select_by`` compares (lower is better; missing: worst)."""
    value = figures.get(SELECTION_SCORE[select_by])
    return math.inf if value is None or not math.isfinite(value) else float(value)

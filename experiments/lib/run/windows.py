"""A training run's windows: its data (rundata.prepare_data) cut into training and validation
windows (data.training_windows), the refusals of what could not be scored, and the validation
systems forecast at every evaluation, all from its config, before any model work. Apart from
data.py and training/evaluation.py because it reads the run's config and data, which their other
users do not need.
"""

from __future__ import annotations

from pathlib import Path

import qwen_min
from experiments.lib import errors
from experiments.lib.run.config import TrainConfig
from experiments.lib.run.flagtypes import SERIES
from experiments.lib.run.rundata import RunData, prepare_data
from experiments.lib.science import data
from experiments.lib.training.evaluation import ForecastSet, forecast_set


def prepare_windows(cfg: TrainConfig, out: Path | None,
                    tokenizer: qwen_min.Tokenizer) -> tuple[RunData, data.Windows, data.Windows]:
    """The run's data (saved in ``out``) cut into training windows (stride --stride, default half a
    window) and validation windows (each transition scored once). With --context-length series, each
    window is one series from its start: the --context-steps + --horizon steps a forecast reads and
    writes, so training sees the very text it is asked to continue (see ``series_windows``). Refused
    (UsageError or DataError, before any model work) when either has nothing to score, or there are
    fewer training windows than a batch."""
    run_data = prepare_data(cfg, out)
    if cfg.context_length == SERIES:
        steps = cfg.context_steps + cfg.horizon
        train, val = series_windows([run_data.texts("train", cfg.max_systems, steps),
                                     run_data.texts("val", cfg.val_systems, steps)], tokenizer)
    else:
        L = cfg.context_length
        require_step_fits(L, run_data.texts("train", cfg.max_systems), tokenizer)
        train = data.training_windows(run_data.texts("train", cfg.max_systems), tokenizer, context_length=L,
                                      stride=cfg.stride or L // 2)
        val = data.training_windows(run_data.texts("val", cfg.val_systems), tokenizer, context_length=L,
                                    stride=L - 1)
    require_scored(train, f"the training split ({len(run_data.systems('train', cfg.max_systems))} systems)")
    require_scored(val, f"the validation split ({len(run_data.systems('val', cfg.val_systems))} systems)")
    if len(train.input_ids) < cfg.batch_size:
        raise errors.UsageError(f"only {len(train.input_ids)} training windows for batch size {cfg.batch_size}: "
                                f"lower --batch-size")
    return run_data, train, val


def series_windows(splits: list[list[str]], tokenizer: qwen_min.Tokenizer) -> list[data.Windows]:
    """One window per text of each split, all as long as the longest text of them all (in tokens; the
    shorter right-padded, their padding unscored), so no text is cut and every split's windows have
    one width: what --context-length series trains and scores on."""
    tokens = [tokenizer.encode_batch(texts) for texts in splits]
    L = max([2] + [len(ids) for split in tokens for ids in split])
    return [data.training_windows(ids, tokenizer, context_length=L, stride=L - 1) for ids in tokens]


def require_step_fits(context_length: int, texts: list[str], tokenizer: qwen_min.Tokenizer) -> None:
    """--context-length must hold at least one whole time step of text (its longest among the first
    steps of the first system): a window shorter than that never sees a value whole. UsageError."""
    if not texts:
        return
    steps = [t + ";" for t in texts[0].split(";")[:20] if t]
    need = max((len(tokenizer.encode(t)) for t in steps), default=0)
    if context_length < need:
        raise errors.UsageError(f"--context-length {context_length}: a window must hold at least one time step of "
                                f"text, and one step takes up to {need} tokens here (e.g. {steps[0]!r})")


def require_scored(windows: data.Windows, what: str) -> None:
    """Refuse to score nothing: a mean over zero tokens is no loss (0.0 would even win early stopping)."""
    if not len(windows.input_ids):
        raise errors.DataError(f"{what}: no windows to score")
    if not bool((windows.labels != -100).any()):
        raise errors.DataError(f"{what}: its {len(windows.input_ids)} windows hold no token to score (all padding)")


def forecast_set_of(cfg: TrainConfig, run_data: RunData, tokenizer: qwen_min.Tokenizer) -> ForecastSet | None:
    """train.py's validation forecasts: the first --val-forecast-systems validation systems (None for 0)."""
    if not cfg.val_forecast_systems:
        return None
    return forecast_set(run_data.trajectories, run_data.systems("val", cfg.val_forecast_systems), run_data.encoding,
                        tokenizer, context_steps=cfg.context_steps, horizon=cfg.horizon, to_limit=cfg.run_to_limit)

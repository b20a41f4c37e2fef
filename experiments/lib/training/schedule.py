"""What each optimizer step takes: its batch (an order of the training windows that depends only
on the seed and the epoch, so a resumed run draws the very same batches) and its learning rate (a
warm-up, then a decay to the last step). The loop and its FLOP plan both draw here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np

from experiments.lib.training.state import RunState

SCHEDULES = ("cosine", "linear", "constant")      # the learning rate after the warm-up


def batch_order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The window order of one epoch: a permutation that depends only on (seed, epoch), so a resumed
    run needs only (epoch, position) to continue with the very same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


def next_batch(state: RunState, n_windows: int, batch_size: int, seed: int) -> np.ndarray:
    """The windows of the next optimizer step: the next ``batch_size`` of this epoch's order, or, when
    fewer are left, the first of the next epoch's (``state.epoch``/``position`` move there; the
    caller advances ``position`` once the step is done). The loop and its FLOP plan both draw here."""
    if state.position + batch_size > n_windows:
        state.epoch, state.position = state.epoch + 1, 0
    return batch_order(n_windows, seed, state.epoch)[state.position:state.position + batch_size]


def lr_at(step: int, lr: float, warmup_steps: int, *, schedule: str = "constant", total_steps: int = 0,
          min_lr_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (0-based): a linear warm-up over ``warmup_steps``,
    then ``schedule`` from ``lr`` down to ``min_lr_ratio * lr`` at ``total_steps`` (cosine or linear),
    or constant. A function of the step alone, so a resumed run continues the schedule exactly.

    Why decay: at a constant high rate the adapter keeps moving, and its validation forecasts swing
    from one evaluation to the next; decaying to the end of the run lets it settle."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: one of {SCHEDULES}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))   # 0 after warm-up .. 1 at the end
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    low = min_lr_ratio * lr
    return low + (lr - low) * shape


class ScheduleFields(Protocol):
    """What the schedule reads of a training config (TrainConfig's fields of these names)."""

    lr: float
    warmup_steps: int
    schedule: str
    max_steps: int
    min_lr_ratio: float


def schedule_of(cfg: ScheduleFields) -> Callable[[int], float]:
    """train.py's learning rate at each step, from its config's schedule fields."""
    return lambda step: lr_at(step, cfg.lr, cfg.warmup_steps, schedule=cfg.schedule, total_steps=cfg.max_steps,
                              min_lr_ratio=cfg.min_lr_ratio)

"""The pieces of train.py's loop that are about training itself, each small enough to test alone:
the run's state (with early stopping's bookkeeping), the batch order, the learning rate schedule,
the loss over windows, and the copy of the trained weights early stopping keeps. The rest of the
loop has its own modules: the windows (windows.py), the metrics files (metrics_log.py), the
ledger bookings (booking.py), data parallel (parallel.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

import qwen_min
from experiments.lib import errors
from experiments.lib.config import SCHEDULES, TrainConfig
from qwen_min import Qwen2


@dataclass
class RunState:
    """Everything a resumed run needs besides the tensors; saved as the checkpoint's state.json."""

    step: int = 0                 # optimizer steps taken
    epoch: int = 0                # data epoch, and ...
    position: int = 0             # ... windows of its permutation already used
    best_val: float = math.inf    # early stopping: the best validation score so far (--select-by),
    best_step: int = 0            # the step it was measured at,
    bad_evals: int = 0            # and evaluations since then without improvement
    best_scores: dict = field(default_factory=dict)  # every validation figure of that evaluation
    tokens: int = 0               # tokens trained on (every position of every window)
    flops: float = 0.0            # FLOPs of the steps and evaluations that led to this state
    # Nothing about the ledger: a checkpoint is written only once every FLOP in it is charged (see
    # booking.Booking), so a resumed run owes nothing for the work before it, and what it re-runs it charges anew.

    def record_val(self, score: float, figures: dict | None = None) -> bool:
        """Early stopping's bookkeeping for one evaluation (lower ``score`` is better, ``figures`` all
        it measured); True when it is the best so far (keep this adapter)."""
        if score < self.best_val:
            self.best_val, self.best_step, self.bad_evals = score, self.step, 0
            self.best_scores = dict(figures or {})
            return True
        self.bad_evals += 1
        return False

    def out_of_patience(self, patience: int) -> bool:
        """``patience`` evaluations in a row without improvement (patience 0: never)."""
        return bool(patience) and self.bad_evals >= patience

    def advance(self, batch_size: int, context_length: int) -> None:
        """One optimizer step done: the step count, the data position and the tokens trained on move on."""
        self.step, self.position = self.step + 1, self.position + batch_size
        self.tokens += batch_size * context_length


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


def schedule_of(cfg: TrainConfig) -> Callable[[int], float]:
    """train.py's learning rate at each step, from its config."""
    return lambda step: lr_at(step, cfg.lr, cfg.warmup_steps, schedule=cfg.schedule, total_steps=cfg.max_steps,
                              min_lr_ratio=cfg.min_lr_ratio)


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


def check_finite(loss: float, what: str, step: int) -> None:
    """A loss that is not finite stops the run (errors.Diverged: exit 1 with its message; train.py
    keeps the best adapter so far)."""
    if not math.isfinite(loss):
        raise errors.Diverged(f"step {step}: the {what} loss is {loss}")


def trainable_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights (adapters, bias) as they are now: early stopping keeps the best of these."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        if n in weights:
            p.copy_(weights[n])

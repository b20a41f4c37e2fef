"""The pieces of train.py's loop, each small enough to test alone: the run's state, the batch order
and learning rate, the validation loss, early stopping, the metrics files, the ledger bookings
(reserve, charge as work ends, close on any exit, signals included) and the data-parallel plumbing.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import flops
import qwen_min
from experiments.lib import data, errors, files, runs
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
    # Booking), so a resumed run owes nothing for the work before it, and what it re-runs it charges anew.

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
    if schedule not in runs.SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: one of {runs.SCHEDULES}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))   # 0 after warm-up .. 1 at the end
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    low = min_lr_ratio * lr
    return low + (lr - low) * shape


def schedule_of(args: argparse.Namespace) -> Callable[[int], float]:
    """train.py's learning rate at each step, from its arguments."""
    return lambda step: lr_at(step, args.lr, args.warmup_steps, schedule=args.schedule, total_steps=args.max_steps,
                              min_lr_ratio=args.min_lr_ratio)


def prepare_windows(args: argparse.Namespace, out: Path | None,
                    tokenizer: qwen_min.Tokenizer) -> tuple[runs.RunData, data.Windows, data.Windows]:
    """The run's data (saved in ``out``) cut into training windows (stride --stride, default half a
    window) and validation windows (each transition scored once). Refused (UsageError or DataError, before any
    model work) when either has nothing to score, or the batch or the evaluated subset is empty."""
    run_data = runs.prepare_data(args, out)
    L = args.context_length
    require_step_fits(L, run_data.texts("train", args.max_systems), tokenizer)
    if args.stride is not None and not 1 <= args.stride <= L:
        raise errors.UsageError(f"--stride {args.stride}: must be between 1 and --context-length {L}, so no "
                                f"token is skipped")
    train = data.training_windows(run_data.texts("train", args.max_systems), tokenizer, context_length=L,
                                  stride=args.stride or L // 2)
    val = data.training_windows(run_data.texts("val", args.val_systems), tokenizer, context_length=L, stride=L - 1)
    require_scored(train, f"the training split ({len(run_data.systems('train', args.max_systems))} systems)")
    require_scored(val, f"the validation split ({len(run_data.systems('val', args.val_systems))} systems)")
    if len(train.input_ids) < args.batch_size:
        raise errors.UsageError(f"only {len(train.input_ids)} training windows for batch size {args.batch_size}: "
                         f"lower --batch-size")
    if args.eval_every and args.eval_windows < 1:
        raise errors.UsageError(f"--eval-windows {args.eval_windows}: the validation subset scored every "
                         f"--eval-every {args.eval_every} steps would be empty")
    return run_data, train, val


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


Diverged = errors.Diverged   # a loss that is not finite: exit 1 with its message, the best adapter so far kept


def check_finite(loss: float, what: str, step: int) -> None:
    if not math.isfinite(loss):
        raise Diverged(f"step {step}: the {what} loss is {loss}")


def trainable_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights (adapters, bias) as they are now: early stopping keeps the best of these."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        if n in weights:
            p.copy_(weights[n])


# ---------------------------------------------------------------------------------------------
# Metrics files and the ledger


class MetricsLog:
    """metrics.jsonl (the record, one row per step and per evaluation) and metrics.csv (the same
    rows for spreadsheets), optionally mirrored to Weights & Biases.

    ``resume_step``: the run continues from the checkpoint of that step, so the rows logged after it
    are dropped (those steps run again); otherwise the run starts both files afresh.
    ``write`` False (data-parallel ranks other than 0): nothing is written.
    """

    CSV_FIELDS = ("step", "kind", "loss", "mae", "mae_h1_10", "mae_h11_25", "mae_h26_50", "vs_untrained_mae_diff",
                  "vs_untrained_se", "relative_score", "coverage", "lr", "tokens", "flops", "tokens_per_s")

    def __init__(self, out: Path, *, resume_step: int | None = None, write: bool = True,
                 wandb_run: Any = None) -> None:
        self.jsonl, self.csv, self.write, self.wandb_run = out / "metrics.jsonl", out / "metrics.csv", write, wandb_run
        if not write:
            return
        self.csv.unlink(missing_ok=True)  # rebuilt from metrics.jsonl below, in step order
        if resume_step is None or not self.jsonl.is_file():
            self.jsonl.unlink(missing_ok=True)
            return
        rows = [r for r in map(json.loads, self.jsonl.read_text().splitlines()) if r["step"] <= resume_step]
        self.jsonl.write_text("".join(files.dumps(r) + "\n" for r in rows))
        for row in rows:
            self._csv_row(row)

    def __call__(self, state: RunState, kind: str, loss: float | None, lr: float, **extra: float | None) -> None:
        """One row: the step, the loss of this kind (train, val, val_full; None for val_forecast, whose
        figures are in ``extra``), and the run's totals so far."""
        if not self.write:
            return
        row = {"step": state.step, "kind": kind, "loss": loss, "lr": lr, "tokens": state.tokens,
               "flops": state.flops, **extra}
        with open(self.jsonl, "a") as f:
            f.write(files.dumps(row) + "\n")  # (strict: a NaN loss is null)
        self._csv_row(row)
        if self.wandb_run:
            figures = {"loss": loss, **{k: v for k, v in extra.items() if not isinstance(v, dict)}}
            self.wandb_run.log({f"{kind}/{k}": v for k, v in figures.items() if v is not None} | {"flops": state.flops},
                               step=state.step)

    def _csv_row(self, row: dict) -> None:
        new = not self.csv.exists()
        paired = row.get("vs_untrained") or {}
        row = row | {"vs_untrained_mae_diff": paired.get("mae_diff"), "vs_untrained_se": paired.get("se")}
        with open(self.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.CSV_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def start_wandb(args: argparse.Namespace) -> Any:
    """A Weights & Biases run (wandb is an optional dependency, imported only when asked for)."""
    try:
        import wandb
    except ImportError:
        raise errors.MissingDependencyError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project="qwen-lora-ts", name=args.name, config=vars(args), resume="allow")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, so no ``except Exception`` swallows it): the run
    charges what it spent and closes its reservation on the way out; ``cli.run_as_script`` then prints
    ``note`` (set on the way out, e.g. train.py's step and --resume command line) and ends the process
    by the same signal, with the exit status that signal always gives."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.note = ""
        self.step: int | None = None   # train.py: the optimizer steps taken when it arrived


class Booking:
    """A run's charges to its ledger reservation, made as the work ends, so a kill loses at most the
    work in flight: training steps (every ``every`` steps, pending in between), evaluations and
    evaluation batches at once. ``reservation`` None (a data-parallel rank other than 0): nothing is charged.

    As a context manager: SIGINT and SIGTERM raise Interrupted, except inside ``held()``, where they
    wait for the block's end (a charge and the metrics row it pays for, a checkpoint: each done
    whole). Leaving the block in any way (the end, an exception, a signal) charges what is pending
    and closes the reservation, releasing what was not spent. Work interrupted in flight was not
    completed and is not charged (after --resume it runs, and is charged, again).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, reservation: flops.Reservation | None, *, every: int = 1, step_tokens: int = 0) -> None:
        if every < 1:
            raise ValueError(f"charge every {every} steps: must be at least 1")
        self.reservation, self.every, self.step_tokens = reservation, every, step_tokens
        self.charged = 0.0                   # by this process
        self.pending_steps, self.pending_flops, self.to_step = 0, 0.0, 0
        self.since = time.time()
        self._depth, self._signal, self._previous = 0, None, {}

    def __enter__(self) -> Booking:
        if threading.current_thread() is threading.main_thread():  # (handlers can only be set there)
            self._previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        try:
            with self.held():
                try:
                    self.flush()
                finally:   # (a refused charge still closes the reservation)
                    if self.reservation and self.reservation.owner:  # (a study's reservation: the study closes it)
                        self.reservation.close()
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._depth:
            self._signal = signum  # raised when the held block ends
        else:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A block that SIGINT and SIGTERM do not cut short; they take effect once it is done."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._signal is not None:
                signum, self._signal = self._signal, None
                raise Interrupted(signum)

    def charge(self, amount: float, *, kind: str, tokens: int = 0, steps: int = 0,
               config: dict[str, Any] | None = None) -> None:
        """Charge work that has just ended."""
        if self.reservation is None or not amount:
            return
        with self.held():
            now = time.time()
            self.reservation.charge(amount, kind=kind, tokens=tokens, steps=steps, seconds=now - self.since,
                                    config=config)
            self.charged += amount
            self.since = now

    def ensure(self, amount: float, what: str) -> None:
        """Before doing work that will cost ``amount``: refuse it (flops.ReservationExceeded, nothing
        done, what ran already charged) when the reservation cannot pay for it and what is pending."""
        if self.reservation is None or self.reservation.fits(self.pending_flops + amount):
            return
        self.flush()
        raise flops.ReservationExceeded(
            f"{what} would cost {amount:.4e} FLOPs, but reservation {self.reservation.id} ({self.reservation.name}) "
            f"has {self.reservation.left():.4e} left of {self.reservation.planned:.4e}: the run stops before it; "
            f"everything that ran is charged, and --resume continues from the last checkpoint")

    def step(self, amount: float, step: int) -> None:
        """Optimizer step ``step`` is done: charged now, or with the next ``every``-th."""
        self.pending_steps, self.pending_flops, self.to_step = self.pending_steps + 1, self.pending_flops + amount, step
        if self.pending_steps >= self.every:
            self.flush()

    def flush(self) -> None:
        """Charge the pending steps (before every checkpoint, so a checkpoint never holds uncharged work)."""
        if self.pending_steps:
            n, f = self.pending_steps, self.pending_flops
            self.charge(f, kind="train", steps=n, tokens=n * self.step_tokens,
                        config={"from_step": self.to_step - n, "to_step": self.to_step})
            self.pending_steps, self.pending_flops = 0, 0.0


# ---------------------------------------------------------------------------------------------
# Data parallel (torchrun): every rank holds the whole model and takes a share of each batch


@dataclass
class Distributed:
    world: int           # processes (1: not distributed)
    rank: int            # this one
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and ledger entries."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


def start_distributed(device: str, batch_size: int) -> Distributed:
    """torchrun sets WORLD_SIZE and RANK: join the process group (gloo on CPU, nccl on GPU); alone, rank 0 of 1."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    where = runs.pick_device(device)
    if world > 1:
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
        if batch_size % world:
            raise errors.UsageError(f"--batch-size {batch_size} must be divisible by the {world} processes")
    return Distributed(world, rank, where)


def sum_over_ranks(params: Iterable[torch.Tensor], loss_sum: torch.Tensor) -> torch.Tensor:
    """Sum every rank's gradients (each is its share of the global mean, so the sum is the gradient
    of the whole batch's mean) and its loss sum; returns the summed loss."""
    for p in params:
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    loss_sum = loss_sum.detach()
    dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    return loss_sum

"""The pieces of train.py's loop, each small enough to test alone: the run's state, the batch order
and learning rate, the validation loss, early stopping, the metrics files, the ledger entries and
the data-parallel plumbing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import flops
import qwen_min
from experiments.lib import data, runs
from qwen_min import Qwen2


@dataclass
class RunState:
    """Everything a resumed run needs besides the tensors; saved as the checkpoint's state.json."""

    step: int = 0                 # optimizer steps taken
    epoch: int = 0                # data epoch, and ...
    position: int = 0             # ... windows of its permutation already used
    best_val: float = math.inf    # early stopping: the best validation-subset loss so far,
    best_step: int = 0            # the step it was measured at,
    bad_evals: int = 0            # and evaluations since then without improvement
    tokens: int = 0               # tokens trained on (every position of every window)
    flops: float = 0.0            # FLOPs spent by steps and evaluations
    logged_step: int = 0          # step and FLOPs already written to the ledger
    logged_flops: float = 0.0

    def record_val(self, loss: float) -> bool:
        """Early stopping's bookkeeping for one evaluation; True when it is the best so far (keep this adapter)."""
        if loss < self.best_val:
            self.best_val, self.best_step, self.bad_evals = loss, self.step, 0
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


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


def prepare_windows(args: argparse.Namespace, out: Path | None) -> tuple[runs.RunData, data.Windows, data.Windows]:
    """The run's data (saved in ``out``) cut into training windows (stride --stride, default half a
    window) and validation windows (each transition scored once)."""
    run_data = runs.prepare_data(args, out)
    tokenizer = qwen_min.load_tokenizer(args.model, revision=args.revision)
    L = args.context_length
    train = data.training_windows(run_data.texts("train", args.max_systems), tokenizer, context_length=L,
                                  stride=args.stride or L // 2)
    val = data.training_windows(run_data.texts("val", args.val_systems), tokenizer, context_length=L, stride=L - 1)
    return run_data, train, val


@torch.no_grad()
def windows_loss(model: Qwen2, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 device: torch.device) -> tuple[float, int]:
    """Mean next-token cross-entropy over every scored label (padding excluded), and their count."""
    total, count = 0.0, 0
    for i in range(0, len(input_ids), batch_size):
        ids, y = input_ids[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        h = model.hidden(ids)  # right padding: causal attention already keeps real tokens off the pads
        total += qwen_min.chunked_cross_entropy(h, model.lm_head, y, reduction="sum").item()
        count += int((y != -100).sum())
    return total / max(count, 1), count


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

    CSV_FIELDS = ("step", "kind", "loss", "lr", "tokens", "flops", "tokens_per_s")

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
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for row in rows:
            self._csv_row(row)

    def __call__(self, state: RunState, kind: str, loss: float, lr: float, **extra: float) -> None:
        """One row: the step, the loss of this kind (train, val, val_full), and the run's totals so far."""
        if not self.write:
            return
        row = {"step": state.step, "kind": kind, "loss": loss, "lr": lr, "tokens": state.tokens,
               "flops": state.flops, **extra}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._csv_row(row)
        if self.wandb_run:
            self.wandb_run.log({f"{kind}/loss": loss, "flops": state.flops}, step=state.step)

    def _csv_row(self, row: dict) -> None:
        new = not self.csv.exists()
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
        raise SystemExit("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project="qwen-lora-ts", name=args.name, config=vars(args), resume="allow")


def charge_ledger(ledger: flops.Ledger, state: RunState, args: argparse.Namespace, *, world: int,
                  seconds: float) -> None:
    """One ledger entry for the steps and evaluations since the last entry. What was charged is
    part of the state the checkpoint keeps, so after a kill and --resume every step is charged once
    (steps re-run after the checkpoint were never charged)."""
    flops_since = state.flops - state.logged_flops
    steps = state.step - state.logged_step
    if flops_since > 0:
        ledger.append(name=args.name, kind="train", flops=flops_since,
                      tokens=steps * args.batch_size * args.context_length, steps=steps,
                      config={"rank": args.rank, "lr": args.lr, "context_length": args.context_length,
                              "batch_size": args.batch_size, "from_step": state.logged_step,
                              "to_step": state.step, "world_size": world},
                      seconds=seconds)
    state.logged_step, state.logged_flops = state.step, state.flops


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
            raise SystemExit(f"--batch-size {batch_size} must be divisible by the {world} processes")
    return Distributed(world, rank, where)


def sum_over_ranks(params: Iterable[torch.Tensor], loss_sum: torch.Tensor) -> torch.Tensor:
    """Sum every rank's gradients (each is its share of the global mean, so the sum is the gradient
    of the whole batch's mean) and its loss sum; returns the summed loss."""
    for p in params:
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    loss_sum = loss_sum.detach()
    dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    return loss_sum

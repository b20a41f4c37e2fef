"""Data parallel under torchrun: every rank holds the whole model and takes a share of each batch;
their gradients are summed before the optimizer step, so the ranks stay identical and the run
matches one process on the whole batch. Alone (no torchrun), rank 0 of 1 and nothing to sum.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from experiments.lib import errors
from experiments.lib.run import devices


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
    where = devices.pick_device(device)
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

"""One LoRA training step's forward and backward, the way train.py runs it (optimizer step aside)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import qwen_min


def train_step(hidden: Callable[[Tensor], Tensor], lm_head: nn.Linear, ids: Tensor, labels: Tensor, *,
               n_scored: int | Tensor | None = None) -> Tensor:
    """Forward ``hidden(ids)`` [B, T, D], the chunked cross-entropy summed over the scored labels
    [B, T] (-100: not scored; already aligned, label[t] = ids[t + 1]), and backward of sum / n_scored.

    Returns the loss sum (detached from nothing: the caller may all-reduce it). ``n_scored``: the
    tokens the mean is over; default this batch's scored tokens, counted on the device (no sync).
    train.py passes the whole global batch's count, so each rank's loss is its share of the mean.
    """
    loss_sum = qwen_min.chunked_cross_entropy(hidden(ids), lm_head, labels, reduction="sum")
    if n_scored is None:
        n_scored = (labels != -100).sum().clamp(min=1)
    (loss_sum / n_scored).backward()
    return loss_sum


def next_token_labels(ids: Tensor) -> Tensor:
    """Labels for scoring every next token of ids [B, T]: ids shifted left, the last place unscored."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


__all__ = ["next_token_labels", "train_step"]

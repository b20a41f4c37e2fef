"""Next-token cross-entropy that never holds the full [tokens x vocabulary] logits at once.

With a 151,936-token vocabulary, batch 4 x 512 tokens of fp32 logits take 1.2 GB, and their
gradient as much again. Instead the loss runs over chunks of tokens; each chunk's logits are
recomputed during backward (activation checkpointing) so only one chunk's logits ever exist.
The result is the same mean as ``F.cross_entropy`` over all scored tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> Tensor:
    logits = F.linear(h, weight, bias).float()          # [chunk, V], upcast like the reference loss
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(hidden: Tensor, lm_head: nn.Linear, labels: Tensor, *, chunk_size: int = 1024,
                          reduction: str = "mean") -> Tensor:
    """Cross-entropy of lm_head(hidden) [B, T, V] against labels [B, T] (-100 = not scored).

    Labels are already aligned with the positions that predict them (label[t] = input[t + 1]).
    reduction "mean" averages over scored tokens, "sum" adds them up.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    keep = y != -100
    h, y = h[keep], y[keep]   # unscored positions (padding, prompt) cost nothing in the output layer
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk_size):
        args = (h[i:i + chunk_size], lm_head.weight, lm_head.bias, y[i:i + chunk_size])
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in lm_head.parameters())):
            total = total + checkpoint(_chunk_loss_sum, *args, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(*args)
    if reduction == "sum":
        return total
    return total / keep.sum().clamp(min=1)

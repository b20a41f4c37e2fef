"""The LoRA layer: a frozen linear plus a trainable low-rank update.

    y = base(x) + (alpha / rank) * B(A(dropout(x)))

A [rank, in] and B [out, rank] are the only trained weights. A starts Kaiming-uniform (a = sqrt(5),
the nn.Linear default that PEFT and loralib use), B starts at zero, so a fresh adapter changes
nothing. alpha defaults to rank, i.e. scaling 1: the update is exactly B @ A. (PEFT's own default is
lora_alpha = 8 whatever the rank; pass alpha=8 to reproduce it. The saved adapter records alpha, so
the two never get confused once on disk.)

Precision with a bf16 base and fp32 adapters:
  base(x)          in the base dtype (bf16): x @ W^T + b, as the frozen model computes it;
  A(dropout(x))    in fp32: x is upcast first, so no bf16 rounding enters the adapter path;
  B(...)           in fp32;
  the sum          in fp32 (base output upcast), rounded once to the base dtype at the end.
The adapter's gradient is therefore computed in fp32 too. This is PEFT's order of operations, so
the two agree bit for bit in fp32.

Merging folds the update into the base weight, W <- W + scaling * B @ A (computed in fp32, rounded
once to W's dtype), so inference costs nothing extra. Unmerging subtracts the same product again: in
fp32 that restores W to within rounding; in bf16 it is off by up to a bf16 rounding step, which is
why ``lora.export_merged`` writes a merged checkpoint without ever merging the live model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """``base`` (frozen, any dtype) plus a trainable rank-``rank`` update held in ``dtype`` (fp32)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.base_layer = base.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.scaling = self.alpha / rank
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> Tensor:
        """The update this adapter adds to the base weight: scaling * B @ A, [out, in], fp32."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scaling * B @ A, summed in fp32 and rounded once to W's dtype."""
        if not self.merged:
            W = self.base_layer.weight
            W.copy_(W.to(torch.float32) + self.delta_weight().to(torch.float32))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scaling * B @ A: the inverse of ``merge`` up to rounding in W's dtype."""
        if self.merged:
            W = self.base_layer.weight
            W.copy_(W.to(torch.float32) - self.delta_weight().to(torch.float32))
            self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        dtype = self.lora_A.weight.dtype
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(dtype))))
        return (y.to(dtype) + self.scaling * update).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"

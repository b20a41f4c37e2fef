"""The LoRA layer: a frozen linear plus a trainable low-rank update.

    y = base(x) + (alpha / rank) * B(A(dropout(x)))

A [rank, in] and B [out, rank] are the only trained weights. A starts Kaiming-uniform (a = sqrt(5),
the nn.Linear default that PEFT and loralib use), B starts at zero, so a fresh adapter changes
nothing.

Precision with a bf16 base and fp32 adapters:
  base(x)          in the base dtype (bf16): x @ W^T + b, as the frozen model computes it;
  A(dropout(x))    in fp32: x is upcast first, so no bf16 rounding enters the adapter path;
  B(...)           in fp32;
  the sum          in fp32 (base output upcast), rounded once to the base dtype at the end.
The adapter's gradient is therefore computed in fp32 too. This is PEFT's order of operations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
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

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        dtype = self.lora_A.weight.dtype
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(dtype))))
        return (y.to(dtype) + self.scaling * update).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"

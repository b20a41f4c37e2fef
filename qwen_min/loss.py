"""Next-token cross-entropy that never holds the full [tokens x vocabulary] logits at once.

With a 151,936-token vocabulary, batch 4 x 512 tokens of fp32 logits take 1.2 GB, and their
gradient as much again. Here the output layer and the loss run together over chunks of tokens, and
each chunk's gradient is computed right away, while its logits exist:

    logits_c = h_c @ W^T (+ b)                       [chunk, V], upcast to fp32 like the reference
    p        = softmax(logits_c)
    loss    += sum_i -log p[i, y_i]                    (= logsumexp(logits_c[i]) - logits_c[i, y_i])
    dlogits  = p - onehot(y_c)                         (d loss_sum / d logits_c)
    dh_c     = dlogits @ W,   db += sum_i dlogits[i],   dW += dlogits^T @ h_c   (the last two only if trained)

Only [chunk, V] logits and the [tokens, D] gradient of the hidden states are ever held. Backward
then just scales the stored gradients by the incoming gradient: no logits are recomputed, so the
output layer costs one forward and one input-gradient matmul, as in plain autograd. The result
equals ``F.cross_entropy`` over all scored tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of CE(h @ W^T + b, y), with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, chunk: int,
                grad_enabled: bool) -> Tensor:
        # needs_input_grad ignores torch.no_grad(), so the caller says whether gradients are wanted.
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        need_b = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 for bf16/fp16/fp32 inputs, fp64 stays fp64
        total = torch.zeros((), dtype=acc, device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=acc, device=h.device) if need_b else None
        for i in range(0, h.shape[0], chunk):
            hc, yc = h[i:i + chunk], y[i:i + chunk]
            logits = F.linear(hc, weight).to(acc)                               # [c, V]
            if bias is not None:  # added in the accumulation dtype: an fp32 bias is never rounded to bf16
                logits += bias.to(acc)
            # One softmax pass gives both the loss (-log p_y) and the gradient (p - onehot(y)).
            # Where p_y is so small that -log p_y would lose digits, fall back to logsumexp - x_y.
            grad = logits.softmax(-1)                                            # [c, V]
            p_y = grad.gather(1, yc[:, None]).squeeze(1)
            nll = -p_y.log()
            tiny = p_y < 1e-30
            if tiny.any():
                nll[tiny] = logits[tiny].logsumexp(-1) - logits[tiny].gather(1, yc[tiny, None]).squeeze(1)
            total += nll.sum()
            if need_h or need_w or need_b:
                grad[torch.arange(len(yc), device=h.device), yc] -= 1.0          # p - onehot(y)
                g = grad.to(h.dtype)
                if need_h:
                    dh[i:i + chunk] = g @ weight
                if need_w:
                    dw += (g.t() @ hc).to(acc)
                if need_b:
                    db += grad.sum(0)
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        dh, dw, db = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        dh = None if dh is None else (dh * grad_out).to(dh.dtype)
        dw = None if dw is None else (dw * grad_out).to(w_dtype)
        db = None if db is None else (db * grad_out).to(b_dtype)
        return dh, dw, db, None, None, None


def chunked_cross_entropy(hidden: Tensor, lm_head: nn.Linear, labels: Tensor, *, chunk_size: int = 256,
                          reduction: str = "mean") -> Tensor:
    """Cross-entropy of lm_head(hidden) against labels [B, T] (-100 = not scored), hidden [B, T, D].

    Labels are already aligned with the positions that predict them (label[t] = input[t + 1]).
    Unscored positions (padding, prompts) never reach the output layer. reduction "mean" averages
    over scored tokens, "sum" adds them up.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    keep = y != -100
    total = _LinearCrossEntropy.apply(h[keep], lm_head.weight, lm_head.bias, y[keep], chunk_size,
                                      torch.is_grad_enabled())
    if reduction == "sum":
        return total
    return total / keep.sum().clamp(min=1)

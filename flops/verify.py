"""Verification of the analytic counter against the operations that really run.

``DispatchCounter`` is a ``TorchDispatchMode``: every aten operation executed inside it is priced
with the same primitive table (``flops/primitives.py``) from the real tensors' shapes, and charged
to the innermost module running at the time (forward hooks keep a stack of module paths, the same
paths the analytic report uses). Attention runs on SDPA's math backend, which torch decomposes into
plain aten ops (mul, bmm, add, softmax, bmm), so attention is counted from what runs too.

Per-op prices (per output element unless said):
    add, sub, mul, div, neg, reciprocal, abs, relu, maximum, minimum   1   (add/sub with alpha != 1: 2)
    exp, log, sin, cos, sqrt                                            10
    rsqrt = sqrt + inverse                                              11
    sigmoid = neg, exp, +1, inverse                                     13
    silu = sigmoid, then * z                                            14
    pow(x, 2) 1;  pow(x, 0.5) 10;  pow(x, -1) 1;  any other exponent: log, mul, exp = 21
    sum / amax / amin over n (per output)                               n - 1
    mean over n (per output)                                            n
    mm, bmm (m x n) @ (n x p)                                           m*p*(2n - 1) per matrix
    addmm = mm + the bias add                                           + m*p
    _softmax, _safe_softmax over n (per row)                            14n - 2  (safe_softmax's guard
                                                                        for fully masked rows is a select)
    _log_softmax over n (per row)                                       14n + 8
    nll_loss_forward over k scored rows                                 k negations, k - 1 additions
                                                                        (sum), + 1 division (mean)
    native_dropout                                                      2 (mask multiply, rescale)
    views, copies, casts, cat, index, where, masked_fill, embedding     0
    any op without a floating-point output (integer/boolean work)       0
Ops inside ``RotaryEmbedding`` (computing cos/sin) are free by the rules and reported apart.
Anything else is collected in ``unknown`` — a test keeps that empty, so no executed op goes unpriced.

Known, exact difference from the analytic count: torch's math SDPA scales q and k by hd^-1/4 each
(B*H*T*hd + B*H*S*hd multiplications, k after the GQA repeat) where the analytic counter scales the
scores (B*H*T*S). Under ``qwen_min.fastpath.fast_inference`` a decoded token's query heads are folded
onto their KV head, so no repeat happens and k costs B*Hkv*S*hd instead; the count is of what runs.

``flop_counter_mode_total`` runs the same pass under ``torch.utils.flop_counter.FlopCounterMode``,
which counts only matmuls, at 2*m*n*p each: converted, 2mnp = m*p*(2n-1) + m*p, so it must equal the
analytic ``matmul_2mnp``.
"""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from flops import primitives as P

aten = torch.ops.aten

UNARY = {"neg": P.NEG, "reciprocal": P.INV, "abs": P.ABS, "relu": P.RELU, "exp": P.EXP, "log": P.LOG,
         "sin": P.SIN, "cos": P.COS, "sqrt": P.SQRT, "rsqrt": P.RSQRT, "sigmoid": P.SIGMOID, "silu": P.SILU}
BINARY = {"add": P.ADD, "sub": P.SUB, "rsub": P.SUB, "mul": P.MUL, "div": P.DIV, "maximum": P.CMP,
          "minimum": P.CMP}
REDUCE = {"sum": P.ADD, "amax": P.CMP, "amin": P.CMP}
FREE = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
        "clone", "_to_copy", "copy", "copy_", "cat", "stack", "split", "split_with_sizes", "chunk", "slice",
        "select", "index", "index_select", "gather", "embedding", "where", "masked_fill", "tril", "triu",
        "detach", "alias", "lift_fresh", "contiguous", "ones", "zeros", "ones_like", "zeros_like", "new_zeros",
        "new_ones", "new_empty", "empty", "empty_like", "full", "full_like", "scalar_tensor", "arange",
        "fill", "fill_", "zero_", "repeat_interleave", "bernoulli", "_local_scalar_dense", "empty_strided",
        "as_strided", "unbind", "index_put", "index_put_", "_unsafe_index", "masked_fill_", "diagonal"}


def _numel(x: Any) -> int:
    return x.numel() if isinstance(x, Tensor) else 1


def _floating(out: Any) -> bool:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(o, Tensor) and o.is_floating_point() for o in outs)


def price(func: Any, args: tuple, kwargs: dict, out: Any) -> tuple[int, int, int] | None:
    """FLOPs of one executed aten op: (total, matmul part, matmul output elements), or None if unknown."""
    name = func.overloadpacket.__name__.rstrip("_") if hasattr(func, "overloadpacket") else str(func)
    if not _floating(out) or name in FREE or name + "_" in FREE:
        return 0, 0, 0
    first = out[0] if isinstance(out, (tuple, list)) else out
    n_out = _numel(first)
    if name in UNARY:
        return UNARY[name] * n_out, 0, 0
    if name in BINARY:
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 and name in ("add", "sub") else 1)
        return (BINARY[name] + (P.MUL if alpha != 1 else 0)) * n_out, 0, 0
    if name == "pow":
        e = args[1]
        per = {2: P.MUL, 0.5: P.SQRT, -1: P.INV}.get(e, P.LOG + P.MUL + P.EXP) if not isinstance(e, Tensor) else 21
        return per * n_out, 0, 0
    if name in REDUCE or name == "mean":
        n_in = _numel(args[0])
        per_out = n_in // max(n_out, 1)
        cost = n_out * P.reduce_sum(per_out) * REDUCE.get(name, P.ADD)
        return cost + (n_out * P.DIV if name == "mean" else 0), 0, 0
    if name in ("mm", "bmm", "addmm", "baddbmm"):
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
        batch = a.shape[0] if a.dim() == 3 else 1
        m, n, p = a.shape[-2], a.shape[-1], b.shape[-1]
        mm = batch * P.matmul(m, n, p)
        extra = batch * m * p * P.ADD if name in ("addmm", "baddbmm") else 0
        if kwargs.get("alpha", 1) != 1 or kwargs.get("beta", 1) != 1:
            return None
        return mm + extra, mm, batch * m * p
    if name in ("_softmax", "_safe_softmax", "_log_softmax"):
        x, dim = args[0], args[1]
        n = x.shape[dim]
        rows = x.numel() // n
        return rows * (P.log_softmax(n) if name == "_log_softmax" else P.softmax(n)), 0, 0
    if name == "nll_loss_forward":
        target, reduction, ignore_index = args[1], args[3], args[4]
        k = int((target != ignore_index).sum())
        cost = k * P.NEG + (P.reduce_sum(k) * P.ADD if reduction in (1, 2) else 0) + (P.DIV if reduction == 1 else 0)
        return cost, 0, 0
    if name == "native_dropout":
        return 2 * _numel(args[0]), 0, 0
    return None


@dataclass
class DispatchCount:
    total: int = 0
    matmul: int = 0
    matmul_outputs: int = 0
    by_module: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    by_op: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    free: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # priced but free by the rules
    unknown: Counter = field(default_factory=Counter)

    @property
    def matmul_2mnp(self) -> int:
        return self.matmul + self.matmul_outputs


class DispatchCounter(TorchDispatchMode):
    """Prices every aten op run inside it; ``attach(model)`` charges each to the running module.

    Ops run by code outside any module (the loss) are charged to the current ``section(name)``;
    matmuls in the "loss" section are the output layer and are charged to "lm_head".
    """

    def __init__(self, free_modules: tuple[str, ...] = ("RotaryEmbedding",)) -> None:
        super().__init__()
        self.count = DispatchCount()
        self.stack: list[tuple[str, bool]] = [("", False)]
        self.free_modules = free_modules
        self._hooks: list[Any] = []

    def attach(self, model: nn.Module) -> DispatchCounter:
        def enter(name: str, free: bool) -> None:
            self.stack.append((name, free or self.stack[-1][1]))

        def leave() -> None:  # a forward hook that returned something would replace the output
            self.stack.pop()

        for name, mod in model.named_modules():
            free = type(mod).__name__ in self.free_modules
            self._hooks.append(mod.register_forward_pre_hook(lambda m, a, name=name, free=free: enter(name, free)))
            self._hooks.append(mod.register_forward_hook(lambda m, a, o: leave()))
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        self.stack.append((name, False))
        try:
            yield
        finally:
            self.stack.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        priced = price(func, args, kwargs, out)
        c = self.count
        module, free = self.stack[-1]
        if priced is None:
            c.unknown[str(func)] += 1
            return out
        flops, mm, mm_out = priced
        if flops == 0:
            return out
        if free:
            c.free[module] += flops
            return out
        if module == "loss" and mm:
            module = "lm_head"
        c.total += flops
        c.matmul += mm
        c.matmul_outputs += mm_out
        c.by_module[module] += flops
        c.by_op[func.overloadpacket.__name__] += flops
        return out


def _run(model: nn.Module, input_ids: Tensor, labels: Tensor | None, counter: DispatchCounter | None,
         cache: Any = None, last_only: bool = False) -> None:
    """The code path being priced: model(ids), or chunked CE over model.hidden(ids) with labels, or (for
    generation) hidden states then the output layer for each row's last position."""
    from qwen_min import chunked_cross_entropy

    section = counter.section if counter is not None else (lambda name: contextlib.nullcontext())
    if labels is not None:
        h = model.hidden(input_ids)
        with section("loss"):
            chunked_cross_entropy(h, model.lm_head, labels)
    elif last_only:
        h = model.hidden(input_ids, cache=cache)[:, -1]
        with section("lm_head"):
            F.linear(h, model.lm_head.weight, model.lm_head.bias)
    else:
        model(input_ids, cache=cache)


@torch.no_grad()
def dispatch_count(model: nn.Module, input_ids: Tensor, *, labels: Tensor | None = None, cache: Any = None,
                   last_only: bool = False) -> DispatchCount:
    """Run one forward pass (math SDPA) and price every aten op executed."""
    counter = DispatchCounter().attach(model)
    try:
        with sdpa_kernel(SDPBackend.MATH), counter:
            _run(model, input_ids, labels, counter, cache, last_only)
    finally:
        counter.detach()
    c = counter.count
    c.by_module, c.by_op, c.free = dict(c.by_module), dict(c.by_op), dict(c.free)
    return c


def flop_counter_mode_total(model: nn.Module, input_ids: Tensor, *, labels: Tensor | None = None,
                            backward: bool = False) -> int:
    """FlopCounterMode's count (2*m*n*p per matmul) of the same forward pass, or of forward + backward
    (the loss's backward through whatever requires grad) with ``backward``."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        if backward:
            from qwen_min import chunked_cross_entropy

            chunked_cross_entropy(model.hidden(input_ids), model.lm_head, labels).backward()
        else:
            with torch.no_grad():
                _run(model, input_ids, labels, None)
    return fc.get_total_flops()


__all__ = ["DispatchCount", "DispatchCounter", "dispatch_count", "flop_counter_mode_total", "price"]

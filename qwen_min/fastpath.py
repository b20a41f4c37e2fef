"""Inference speed devices, kept out of the model file and opted into explicitly.

``qwen_min/model.py`` is the math of Qwen2.5 with one plain code path per layer. The devices here
compute the same function in less time on a CPU; ``generate`` opts into them, and so can any other
no-grad caller::

    with fast_inference(model, rows=32):   # rows: the batch size of the decode steps
        ...

For the duration, on this model instance only:

* every ``Attention`` decodes one token with the query heads folded onto their KV head
  (``folded_decode_attend``);
* every ``MLP`` computes SwiGLU in place under no_grad (``inplace_swiglu``);
* with ``rows`` given, every bf16 CPU ``nn.Linear`` in the transformer blocks multiplies by a
  oneDNN-prepacked copy of its weight (``prepacked_layers``).

Each device is set as an instance attribute (``module.forward`` or ``module.attend``), which takes
precedence over the class's method; leaving the block deletes it again. A module already swapped
belongs to an enclosing ``fast_inference`` and is left alone, so nested use (a ``stop`` callback
that itself generates, say) undoes only its own swaps. ``reused_output`` is the fourth device: the
output layer of a decode loop writing into one buffer.

Equivalence with the plain path is tested in ``tests/test_fastpath.py``: bit-identical for the
in-place SwiGLU, the prepacked weights and the reused buffer, and to float tolerance for the folded
attention (a different SDPA call, so a different summation order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from types import MethodType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwen_min.model import MLP, Attention, Qwen2

# ---------------------------------------------------------------------------------------------
# The devices


def folded_decode_attend(attn: Attention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """``Attention.attend`` with, for one new token (T == 1), the G = H / Hkv query heads that share a
    KV head turned into G queries of that head: q [B, H, 1, hd] -> [B, Hkv, G, hd].

    Why: the same arithmetic as ``enable_gqa``, but one attention of G queries per KV head instead of
    G attentions of one query each, and torch's CPU SDPA kernel is much better at the former, which
    makes attention a far smaller share of a decode step. mask is [B, 1, 1, S] or None and
    broadcasts over the G queries. Any T > 1 takes the plain path.
    """
    B, H, T, hd = q.shape
    if T != 1:
        return Attention.attend(attn, q, k, v, mask)
    y = F.scaled_dot_product_attention(q.reshape(B, attn.n_kv_heads, H // attn.n_kv_heads, hd), k, v,
                                       attn_mask=mask)                                  # [B, Hkv, G, hd]
    return y.reshape(B, H, 1, hd)


def inplace_swiglu(mlp: MLP, x: Tensor) -> Tensor:
    """``MLP.forward`` with silu and the gating product computed in place under no_grad.

    Why: the same values, but two fewer fresh [tokens, F] tensors per layer; on a CPU a fresh large
    tensor page-faults on first touch, which costs more than the elementwise arithmetic. Autograd
    needs gate(x) and up(x) intact for the backward, so with grad enabled this is the plain forward.
    """
    if torch.is_grad_enabled():
        return MLP.forward(mlp, x)
    return mlp.down_proj(F.silu(mlp.gate_proj(x), inplace=True).mul_(mlp.up_proj(x)))


def can_prepack(weight: Tensor) -> bool:
    """True where oneDNN can prepack this weight: a bf16 CPU tensor on a CPU with bf16 support."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepack(weight: Tensor, rows: int) -> Callable[[Tensor, Tensor | None], Tensor]:
    """x [..., in] -> x @ weight.T (+ bias), with weight [out, in] reordered once into oneDNN's
    blocked layout for inputs of about ``rows`` rows. Needs ``can_prepack(weight)``.

    Why: a bf16 matmul on CPU otherwise reorders its weight on every call. Decoding multiplies the
    same weights by a few rows per step, hundreds of times, so the reorder is a large share of each
    matmul. Results are bit-identical; the cost is one reordered copy of the weight while it is alive.
    """
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    return lambda x, bias=None: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def reused_output(weight: Tensor, rows: int) -> Callable[[Tensor], Tensor]:
    """h [rows, D] -> h @ weight.T [rows, V], always written into the same buffer.

    Why: the output layer of a decode loop produces a [rows, V] tensor per step (V = 151936 for
    Qwen2.5); a fresh one each step page-faults on CPU. Each result is overwritten by the next
    call, so the caller must be done with it by then (a decode step uses its logits up before the
    next). Bit-identical to ``F.linear(h, weight)``.
    """
    out = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=weight.device)
    return lambda h: torch.mm(h, weight.t(), out=out)


# ---------------------------------------------------------------------------------------------
# Opting in


@contextmanager
def _swapped(modules: list[tuple[nn.Module, str, Callable[..., Tensor]]]) -> Iterator[None]:
    """Set each ``module.<name> = fn`` as an instance attribute, unless an enclosing call already
    did (that call will undo it); delete the ones set here on the way out, whatever happens."""
    done: list[tuple[nn.Module, str]] = []
    try:
        for module, name, fn in modules:
            if name not in vars(module):
                setattr(module, name, fn)
                done.append((module, name))
        yield
    finally:
        for module, name in done:
            delattr(module, name)


@contextmanager
def prepacked_layers(model: Qwen2, rows: int) -> Iterator[None]:
    """For the duration, every ``nn.Linear`` in the transformer blocks (LoRA's base layers included;
    fp32 adapters are left alone) whose weight ``can_prepack`` computes with a ``prepack``-ed copy.

    Meant for decoding under no_grad: the packed copies are not parameters and get no gradient.
    """
    with _swapped([(m, "forward", partial(prepack(m.weight, rows), bias=m.bias)) for m in model.layers.modules()
                   if type(m) is nn.Linear and "forward" not in vars(m) and can_prepack(m.weight)]):
        yield


@contextmanager
def fast_inference(model: Qwen2, rows: int | None = None) -> Iterator[None]:
    """For the duration: folded one-token attention, in-place SwiGLU under no_grad and, with ``rows``
    (the decode batch size), prepacked bf16 CPU weights in the blocks. See the module docstring."""
    attends = [(m, "attend", MethodType(folded_decode_attend, m)) for m in model.modules() if isinstance(m, Attention)]
    mlps = [(m, "forward", MethodType(inplace_swiglu, m)) for m in model.modules() if isinstance(m, MLP)]
    with ExitStack() as stack:
        stack.enter_context(_swapped(attends + mlps))
        if rows is not None:
            stack.enter_context(prepacked_layers(model, rows))
        yield


__all__ = ["can_prepack", "fast_inference", "folded_decode_attend", "inplace_swiglu", "prepack", "prepacked_layers",
           "reused_output"]

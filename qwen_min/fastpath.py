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

Which devices apply depends on where the model runs, and ``devices_for(device, dtype)`` says so
explicitly (``fast_inference`` asks it unless told): on a CPU the folded attention, the in-place
SwiGLU and the reused logits buffer, and the prepacked weights only for bf16 where oneDNN has bf16
kernels (a CPU with AVX-512 BF16 or AMX); on CUDA none of them (the plain model path, whose SDPA
calls take the flash / memory-efficient kernels, and a caching allocator that makes fresh tensors
cheap); on the meta device (planning) none, so nothing there ever asks about the hardware.

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
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from types import MethodType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwen_min.model import MLP, Attention, Qwen2

# ---------------------------------------------------------------------------------------------
# Which devices apply where


@dataclass(frozen=True)
class Devices:
    """The inference devices that pay on one (device, dtype), and how often a decode loop may wait
    for the device to learn whether every row has stopped."""

    folded_decode: bool = False    # folded_decode_attend for one-token steps
    inplace_swiglu: bool = False   # inplace_swiglu under no_grad
    prepack: bool = False          # prepacked_layers for the decode steps
    reused_logits: bool = False    # reused_output for the decode loop's output layer
    stop_check_every: int = 1      # decode steps between host-side "all rows done?" checks


# On an accelerator, reading a device value (bool(t), t.item(), t.tolist()) waits for everything
# queued before it: a check every step would keep the GPU idle between steps. Checked every 16 steps,
# a finished batch runs at most 15 steps more, whose tokens are discarded (stopped rows are padded).
ACCELERATOR_STOP_CHECK_EVERY = 16


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; elsewhere empty)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def cpu_has_bf16_kernels(flags: frozenset[str] | set[str] | None = None) -> bool:
    """True where oneDNN runs bf16 matmuls with native bf16 instructions: a CPU with AVX-512 BF16 or
    AMX and a torch built with oneDNN's bf16 support. Elsewhere (AVX2, AVX-512 without BF16) bf16 is
    emulated and prepacking it buys nothing. ``flags``: the CPU's flags (default: this machine's)."""
    flags = cpu_flags() if flags is None else flags
    if not ({"avx512_bf16", "amx_bf16"} & set(flags)):
        return False
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def devices_for(device: torch.device | str, dtype: torch.dtype, *, bf16_kernels: bool | None = None) -> Devices:
    """The devices that apply to a model with weights of ``dtype`` on ``device``.

    cpu: folded one-token attention, in-place SwiGLU and the reused logits buffer; prepacked weights
    only for bf16 with ``bf16_kernels`` (default: ``cpu_has_bf16_kernels()`` of this machine).
    cuda and any other accelerator: none (the plain path), and the stop check every
    ``ACCELERATOR_STOP_CHECK_EVERY`` steps. meta: none, and nothing about the hardware is asked.
    """
    device = torch.device(device)
    if device.type == "meta":
        return Devices()
    if device.type != "cpu":
        return Devices(stop_check_every=ACCELERATOR_STOP_CHECK_EVERY)
    prepack = dtype == torch.bfloat16 and (cpu_has_bf16_kernels() if bf16_kernels is None else bf16_kernels)
    return Devices(folded_decode=True, inplace_swiglu=True, prepack=prepack, reused_logits=True)


def model_devices(model: Qwen2) -> Devices:
    """``devices_for`` the device and dtype of the model's (base) weights."""
    w = model.embed_tokens.weight
    return devices_for(w.device, w.dtype)


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
    """True where prepacking this weight pays: a bf16 CPU tensor on a CPU whose oneDNN has native
    bf16 kernels (``cpu_has_bf16_kernels``)."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and cpu_has_bf16_kernels()


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
def fast_inference(model: Qwen2, rows: int | None = None, devices: Devices | None = None) -> Iterator[None]:
    """For the duration, the ``devices`` (default: ``model_devices(model)``, what pays where the
    model is): folded one-token attention, in-place SwiGLU under no_grad and, with ``rows`` (the
    decode batch size), prepacked bf16 CPU weights in the blocks. See the module docstring."""
    devices = model_devices(model) if devices is None else devices
    attends = [(m, "attend", MethodType(folded_decode_attend, m)) for m in model.modules()
               if isinstance(m, Attention)] if devices.folded_decode else []
    mlps = [(m, "forward", MethodType(inplace_swiglu, m)) for m in model.modules()
            if isinstance(m, MLP)] if devices.inplace_swiglu else []
    with ExitStack() as stack:
        stack.enter_context(_swapped(attends + mlps))
        if rows is not None and devices.prepack:
            stack.enter_context(prepacked_layers(model, rows))
        yield


__all__ = ["ACCELERATOR_STOP_CHECK_EVERY", "Devices", "can_prepack", "cpu_flags", "cpu_has_bf16_kernels", "devices_for",
           "fast_inference", "folded_decode_attend", "inplace_swiglu", "model_devices", "prepack", "prepacked_layers",
           "reused_output"]

"""Where the time goes: torch.profiler's operators of a call grouped into phases (matmul, attention,
norms/rotary, elementwise, output layer/loss, allocation/copy, other), in ms and as fractions.

The rotary functions (ours and transformers') are wrapped for the profile's duration (``labelled``):
their multiplies are the same operators as any other elementwise work, so a scope around them is
what places them. (The profiler's Python tracer, ``with_stack=True``, would name them as the
operators' parents too, but it records every Python call, which is overhead the small operators of
a decode step feel most: the fractions here are measured without it.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from experiments.lib.bench.env import sync

PHASES = ("matmul", "attention", "norms/rotary", "elementwise", "output layer/loss", "allocation/copy", "other")
_OPS = {  # operator names without namespace and underscores at either end
    "matmul": {"mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "mv", "addmv", "linear_pointwise",
               "mkldnn_linear"},
    "attention": {"scaled_dot_product_attention", "scaled_dot_product_flash_attention_for_cpu",
                  "scaled_dot_product_flash_attention", "scaled_dot_product_efficient_attention",
                  "scaled_dot_product_cudnn_attention", "flash_attention_forward", "efficient_attention_forward"},
    "norms/rotary": {"rms_norm", "fused_rms_norm", "layer_norm", "native_layer_norm"},
    "output layer/loss": {"cross_entropy", "cross_entropy_loss", "nll_loss", "nll_loss_nd", "nll_loss_forward",
                          "log_softmax", "logsumexp"},
    "elementwise": {"mul", "add", "sub", "rsub", "div", "neg", "pow", "rsqrt", "sqrt", "reciprocal", "exp", "tanh",
                    "silu", "sigmoid", "cos", "sin", "mean", "sum", "cat", "where", "masked_fill", "clamp",
                    "clamp_min", "maximum", "minimum", "eq", "ne", "gt", "lt", "ge", "le", "bitwise_and",
                    "bitwise_or", "bitwise_not", "logical_and", "logical_or", "logical_not", "and", "or", "fill",
                    "cumsum", "argmax", "max", "softmax", "isin"},
    "allocation/copy": {"empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full",
                        "full_like", "new_empty", "new_zeros", "new_full", "copy", "to", "to_copy", "clone",
                        "contiguous", "resize", "index_select", "embedding", "index", "index_put", "gather"},
}


def phase_of(name: str, shapes: list | None = None, vocab: int | None = None) -> str | None:
    """The phase of a profiled operator from its name (``aten::mm``), or None where the name says
    nothing. A matmul with a vocabulary-sized input is the output layer, not a block's matmul.
    Scopes named ``phase:<phase>`` (see ``labelled``) place everything run inside them."""
    if name.startswith("phase:"):
        return name.removeprefix("phase:")
    op = name.rpartition("::")[2].strip("_")
    for phase, ops in _OPS.items():
        if op in ops:
            if phase == "matmul" and vocab is not None and any(vocab in s for s in shapes or () if isinstance(s, list)):
                return "output layer/loss"
            return phase
    return None


@contextmanager
def labelled(model: torch.nn.Module) -> Iterator[None]:
    """For the duration, the model's RMSNorm and rotary modules, and the functions that rotate q and
    k (ours and transformers'), run inside a profiler scope "phase:norms/rotary": their multiplies
    then count as norms/rotary, not as elementwise work. For profiling only."""
    import importlib

    from torch.autograd.profiler import record_function

    scopes: list[record_function] = []

    def enter(*_: object) -> None:
        scopes.append(record_function("phase:norms/rotary").__enter__())

    def leave(*_: object) -> None:  # a forward hook returning anything but None would replace the output
        scopes.pop().__exit__(None, None, None)

    handles = []
    for m in model.modules():
        if type(m).__name__.endswith(("RMSNorm", "RotaryEmbedding")):
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    patched = []
    for module_name, fn_name in (("qwen_min.model", "apply_rotary"),
                                 ("transformers.models.qwen2.modeling_qwen2", "apply_rotary_pos_emb")):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        fn = getattr(module, fn_name)

        def scoped(*args, _fn=fn, **kwargs):
            with record_function("phase:norms/rotary"):
                return _fn(*args, **kwargs)

        setattr(module, fn_name, scoped)
        patched.append((module, fn_name, fn))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module, fn_name, fn in patched:
            setattr(module, fn_name, fn)


def profile_phases(fn: Callable[[], None], model: torch.nn.Module, device: torch.device, vocab: int,
                   per_decode_step: bool = False) -> dict:
    """Run fn once under torch.profiler (after one unprofiled warm-up call) and say where its time
    went: ms and fraction per phase.

    Each operator's self time goes to the phase of its outermost placed ancestor (the copy inside an
    addmm is matmul time, a mul inside an RMSNorm is norm time); "other" is the rest of the wall
    time: unplaced operators and the time between operators (Python, dispatch; on a GPU, idle time).
    On CUDA the operators' GPU time is summed. ``per_decode_step``: fn is a generation; the breakdown
    covers the model calls after the first (the prompt's) to the end, divided by their number:
    one decode step, sampling and the loop's own work included. Under the profiler many small
    operators slow down more than a few large ones, so read the fractions next to the timings.
    """
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    def mark(*_: object) -> None:  # an empty scope at the start of each model call
        with record_function("marker:model call"):
            pass

    # The input embedding runs once per model call (ours: embed_tokens; transformers' and PEFT's models
    # hand it out).
    embedding = model.embed_tokens if hasattr(model, "embed_tokens") else model.get_input_embeddings()
    hook = embedding.register_forward_pre_hook(mark)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        fn()
        with labelled(model), profile(activities=activities, record_shapes=True) as prof:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            wall = time.perf_counter() - t0
    finally:
        hook.remove()
    events = [e for e in prof.events() if e.device_type.name == "CPU"]  # GPU kernels: via their operator
    calls = sorted(e.time_range.start for e in events if e.name == "marker:model call")
    steps = 1
    if per_decode_step:
        if len(calls) < 2:
            raise ValueError(f"per_decode_step: the generation made {len(calls)} model call(s), need at least 2")
        events = [e for e in events if e.time_range.start >= calls[1]]
        wall = (max(e.time_range.end for e in events) - calls[1]) / 1e6
        steps = len(calls) - 1

    cache: dict[int, str | None] = {}

    def placed(e) -> str | None:
        if id(e) not in cache:
            parent = placed(e.cpu_parent) if e.cpu_parent is not None else None
            cache[id(e)] = parent or phase_of(e.name, e.input_shapes, vocab)
        return cache[id(e)]

    seconds = dict.fromkeys(PHASES, 0.0)
    for e in events:
        if not e.name.startswith("marker:"):
            seconds[placed(e) or "other"] += (e.self_device_time_total if device.type == "cuda"
                                               else e.self_cpu_time_total) / 1e6
    seconds["other"] += max(wall - sum(seconds.values()), 0.0)
    total = sum(seconds.values())
    return {"ms": {k: 1e3 * v / steps for k, v in seconds.items()},
            "fraction": {k: v / total if total else 0.0 for k, v in seconds.items()},
            "total_ms": 1e3 * total / steps, "steps": steps}


def print_phases(title: str, ours: dict, theirs: dict) -> None:
    print(f"{title:28s} {'ours ms':>10s} {'share':>6s} {'theirs ms':>11s} {'share':>6s}")
    for k in (*PHASES, "total"):
        o, t = (ours["total_ms"], theirs["total_ms"]) if k == "total" else (ours["ms"][k], theirs["ms"][k])
        fo, ft = (1.0, 1.0) if k == "total" else (ours["fraction"][k], theirs["fraction"][k])
        print(f"  {k:26s} {o:10.1f} {fo:6.0%} {t:11.1f} {ft:6.0%}", flush=True)

"""This project against transformers + PEFT, side by side in one run, on the Qwen2.5-0.5B config.

    python experiments/benchmark.py                       # bf16, everything, prints ratios (ours / theirs)
    python experiments/benchmark.py --dtype fp32 --only train --json runs/bench_fp32.json

The weights are random (same checkpoint for both, written once to a temp folder), so it runs
offline. Each measurement alternates ours and theirs repetition by repetition, and reports the
median; absolute timings are noisy on shared machines, the ratios are what to read. Peak memory and
checkpoint loading are measured in fresh child processes, so one measurement's allocations never
hide another's. Needs the dev extra (transformers, peft).

Figures: LoRA training step (rank 4 on q, v; batch 4 x 512; loss over the full vocabulary) tokens/s
and peak memory; forward tokens/s; forecasting (32 series, 50-step prompts, 50 steps greedy, KV
cached) time steps per second; batched greedy generation (64 prompts x 128 new tokens); checkpoint
load time and peak memory; model FLOP utilisation of the training step against the matmul peak
measured here. Then where the time goes (torch.profiler, ours and theirs): a no-grad forward and
one decode step split into matmul, attention, norms/rotary, elementwise, output layer/loss,
allocation/copy and other, in ms and as fractions. The output (and --json) starts with where it
ran: CPU model and its bf16-relevant ISA flags, torch and oneDNN versions, the bf16 matmul kernel
oneDNN picks, threads, ONEDNN_MAX_CPU_ISA if set, the GPU on CUDA.

    python experiments/benchmark.py --device cuda         # on a GPU (bf16)
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python experiments/benchmark.py   # an AMX CPU without AMX
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, max_position_embeddings=32768)


# ---------------------------------------------------------------------------------------------
# Helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(fns: dict[str, Callable[[], None]], reps: int, device: torch.device,
              warmup: bool = True) -> dict[str, float]:
    """Median seconds of each function, repetitions interleaved (ours, theirs, ours, ...), after a
    warm-up call of each unless the calls are long enough for one-time costs not to matter."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values() if warmup else ():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def matmul_peak(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of large square matmuls (by the project's rule, 2n-1 per output per inner step ~ 2n^3)."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = 0.0
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        sync(device)
        best = max(best, 3 * n * n * (2 * n - 1) / (time.perf_counter() - t0))
    return best


def write_checkpoint(directory: Path, dtype: torch.dtype) -> Path:
    """The Qwen2.5-0.5B architecture with random weights (normal(0, 0.02), as transformers initialises)."""
    from qwen_min import Qwen2, QwenConfig, save_pretrained

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen2(QwenConfig(**QWEN25_05B))
    model = model.to(dtype).to_empty(device="cpu")
    model.lm_head.weight = model.embed_tokens.weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02) if p.dim() == 2 else p.zero_()
    return save_pretrained(model, directory)


# ---------------------------------------------------------------------------------------------
# Where it ran

ISA_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")  # the ones that decide which bf16 kernels run


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and its feature flags, from the first processor in /proc/cpuinfo
    (Linux; elsewhere the platform's processor name and no flags)."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), set()
    fields: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields.get("model name", platform.machine()), set(fields.get("flags", "").split())


def onednn_dispatch() -> dict[str, str | None]:
    """What oneDNN does with a bf16 matmul here: the ISA it says it uses and the kernel it runs, read
    from ONEDNN_VERBOSE output of a child process (it is printed by C code, and only at start-up).
    kernel None: torch did not hand the matmul to oneDNN (e.g. a CPU below AVX-512)."""
    import subprocess

    code = "import torch; a = torch.randn(64, 64).bfloat16(); torch.nn.functional.linear(a, a)"
    try:
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ONEDNN_VERBOSE": "1"},
                             capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    isa = kernel = None
    for line in out.splitlines():
        fields = line.split(",")  # onednn_verbose,v1,info,cpu,isa:... / ...,exec,cpu,matmul,<kernel>,...
        if "info" in fields and any(f.startswith("isa:") for f in fields):
            isa = line.split("isa:", 1)[1]
        if "exec" in fields and "matmul" in fields and kernel is None:
            kernel = fields[fields.index("matmul") + 1]
    return {"isa": isa, "bf16_matmul_kernel": kernel}


def environment(device: torch.device) -> dict:
    """Where the figures were measured: CPU and its ISA flags, torch and oneDNN, threads, the
    ONEDNN_MAX_CPU_ISA cap if set, and the GPU when running on CUDA."""
    import re

    name, flags = cpu_info()
    onednn = re.search(r"(?:MKL-DNN|oneDNN) v([\w.]+)", torch.__config__.show())
    env = {"cpu": name, "isa_flags": {f: f in flags for f in ISA_FLAGS}, "torch": torch.__version__,
           "onednn": onednn.group(1) if onednn else None, "threads": torch.get_num_threads(),
           "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"), "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    if torch.backends.mkldnn.is_available():
        env["onednn_dispatch"] = onednn_dispatch()
    return env


def print_environment(env: dict) -> None:
    flags = " ".join(f"{f}{'+' if on else '-'}" for f, on in env["isa_flags"].items())
    dispatch = env.get("onednn_dispatch") or {}
    print(f"cpu    {env['cpu']} [{flags}], {env['threads']} threads"
          + (f"; gpu {env['gpu']}" if env["gpu"] else ""))
    print(f"torch  {env['torch']}, oneDNN {env['onednn']}, ONEDNN_MAX_CPU_ISA={env['ONEDNN_MAX_CPU_ISA'] or 'unset'}, "
          f"bf16 matmul kernel {dispatch.get('bf16_matmul_kernel')} ({dispatch.get('isa')})", flush=True)


# ---------------------------------------------------------------------------------------------
# Where the time goes: torch.profiler's operators grouped into phases

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


# ---------------------------------------------------------------------------------------------
# Models under test


def load_ours(ckpt: Path, dtype: torch.dtype, device: torch.device, lora_rank: int | None = None):
    import lora
    import qwen_min

    model = qwen_min.from_pretrained(ckpt, dtype=dtype, device=device)
    if lora_rank:
        lora.apply_lora(model, rank=lora_rank, targets=("q_proj", "v_proj"))
    return model


def load_theirs(ckpt: Path, dtype: torch.dtype, device: torch.device, lora_rank: int | None = None):
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(device)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
        for n, p in model.named_parameters():  # fp32 adapters on a bf16 base, as ours
            if "lora_" in n:
                p.data = p.data.float()
    return model


def forward_fns(ours, theirs, ids: torch.Tensor):
    def fwd_ours():
        with torch.no_grad():
            ours(ids)

    def fwd_theirs():
        with torch.no_grad():
            theirs(input_ids=ids)

    return fwd_ours, fwd_theirs


def generate_fns(ours, theirs, prompts: torch.Tensor, mask: torch.Tensor, new: int):
    """Greedy generation of exactly ``new`` tokens per prompt (left-padded where mask is 0)."""
    import qwen_min

    def g_ours():
        qwen_min.generate(ours, prompts, new, attention_mask=mask)

    def g_theirs():
        theirs.generate(prompts, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                        pad_token_id=151643)

    return g_ours, g_theirs


def train_step_fns(ours, theirs, ids: torch.Tensor):
    import qwen_min

    labels = ids.clone()
    shifted = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)
    opt_t = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-5)

    def step_ours():
        loss = qwen_min.chunked_cross_entropy(ours.hidden(ids), ours.lm_head, shifted)
        loss.backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)

    def step_theirs():
        loss = theirs(input_ids=ids, labels=labels).loss
        loss.backward()
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)

    return step_ours, step_theirs


# ---------------------------------------------------------------------------------------------
# Child-process measurements (peak memory)


def _child(task: str, ckpt: str, dtype_name: str, device_name: str, batch: int, seq: int, q) -> None:
    torch.manual_seed(0)
    dtype, device = DTYPES[dtype_name], torch.device(device_name)
    who, what = task.split(":")
    load = load_ours if who == "ours" else load_theirs
    before = current_rss_bytes()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = load(Path(ckpt), dtype, device, lora_rank=4 if what == "train" else None)
    load_s = time.perf_counter() - t0
    if what == "load":
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes() - before
        q.put({"seconds": load_s, "peak_bytes": peak})
        return
    ids = torch.randint(0, 151643, (batch, seq), device=device)
    import qwen_min

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    shifted = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    # The whole process's peak during two training steps (weights included), loading excluded.
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        if who == "ours":
            loss = qwen_min.chunked_cross_entropy(model.hidden(ids), model.lm_head, shifted)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    q.put({"peak_bytes": peak})


def in_child(task: str, ckpt: Path, dtype: str, device: torch.device, batch: int = 4, seq: int = 512) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(task, str(ckpt), dtype, str(device), batch, seq, q))
    p.start()
    result = q.get()
    p.join()
    return result


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions per measurement")
    parts = ["train", "memory", "forward", "forecast", "generate", "load", "phases"]
    p.add_argument("--only", nargs="+", default=parts, choices=parts)
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    p.add_argument("--checkpoint", default=None, help="use this Qwen2 checkpoint folder instead of random weights")
    args = p.parse_args(argv)

    import flops
    import qwen_min
    from experiments.lib.runs import pick_device

    device = pick_device(args.device)
    dtype = DTYPES[args.dtype]
    tmp = tempfile.TemporaryDirectory()
    ckpt = Path(args.checkpoint) if args.checkpoint else write_checkpoint(Path(tmp.name) / "qwen05", dtype)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    env = environment(device)
    print_environment(env)
    res: dict = {"environment": env, "dtype": args.dtype, "ours": {}, "theirs": {}, "ratios": {}, "phases": {}}

    def record(key: str, ours: float, theirs: float, unit: str) -> None:
        res["ours"][key], res["theirs"][key], res["ratios"][key] = ours, theirs, ours / theirs
        print(f"{key:28s} ours {ours:12.4g}  transformers {theirs:12.4g} {unit:10s} ratio {ours / theirs:6.2f}x",
              flush=True)

    B, T = 4, 512
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151643, (B, T), generator=gen).to(device)
    n, new = 64, 128  # batched greedy generation: 64 prompts of up to 64 tokens, 128 new tokens each
    prompts = torch.randint(0, 151643, (n, 64), generator=gen).to(device)
    mask = torch.ones_like(prompts)
    mask[::2, :16] = 0  # half the prompts shorter, left-padded

    if "load" in args.only:
        o, t = in_child("ours:load", ckpt, args.dtype, device), in_child("theirs:load", ckpt, args.dtype, device)
        record("load_seconds", o["seconds"], t["seconds"], "s")
        record("load_peak_memory", o["peak_bytes"], t["peak_bytes"], "bytes")
        res["ours"]["load_peak_over_checkpoint_size"] = o["peak_bytes"] / size
        print(f"{'':28s} ours' peak while loading / checkpoint on disk = {o['peak_bytes'] / size:.2f}")

    if "train" in args.only or "forward" in args.only:
        ours = load_ours(ckpt, dtype, device, lora_rank=4)
        theirs = load_theirs(ckpt, dtype, device, lora_rank=4)
        if "forward" in args.only:
            fwd_ours, fwd_theirs = forward_fns(ours, theirs, ids)
            s = alternate({"ours": fwd_ours, "theirs": fwd_theirs}, args.reps, device)
            record("forward_tokens_per_s", B * T / s["ours"], B * T / s["theirs"], "tok/s")
        if "train" in args.only:
            step_ours, step_theirs = train_step_fns(ours, theirs, ids)
            s = alternate({"ours": step_ours, "theirs": step_theirs}, args.reps, device)
            record("train_tokens_per_s", B * T / s["ours"], B * T / s["theirs"], "tok/s")
            report = flops.count(ours, batch=B, seq_len=T, mode="train")
            actual = report.train_actual  # forward + the real frozen-base LoRA backward
            peak = matmul_peak(dtype, device)
            res["mfu"] = actual / s["ours"] / peak
            res["matmul_peak_flops_per_s"] = peak
            res["theirs"]["mfu"] = actual / s["theirs"] / peak
            print(f"{'mfu':28s} ours {res['mfu']:.1%}  transformers {res['theirs']['mfu']:.1%}  "
                  f"(counter: {actual:.3e} FLOPs/step; matmul peak {peak / 1e9:.0f} GFLOP/s)", flush=True)
        del ours, theirs

    if "memory" in args.only:
        o, t = in_child("ours:train", ckpt, args.dtype, device), in_child("theirs:train", ckpt, args.dtype, device)
        record("train_peak_memory", o["peak_bytes"], t["peak_bytes"], "bytes")

    if "forecast" in args.only or "generate" in args.only:
        from experiments.lib.forecasting import ALPHABET

        ours = load_ours(ckpt, dtype, device)
        theirs = load_theirs(ckpt, dtype, device)
        tok = qwen_min.load_tokenizer(ckpt) if (ckpt / "tokenizer.json").is_file() else None
        allowed = [15 + d for d in range(10)] + [11, 13, 26]  # Qwen ids of 0-9 , . ;
        if tok is not None:
            assert allowed == [tok.encode(c)[0] for c in ALPHABET]
        if "forecast" in args.only:
            # 32 series, prompts of 50 steps "d.dd,d.dd;" (~500 tokens), 50 steps ~ 500 new tokens.
            n_series, prompt_len, fc_new = 32, 500, 500
            fc_prompts = torch.tensor(allowed)[torch.randint(0, 13, (n_series, prompt_len), generator=gen)].to(device)

            def fc_ours():
                qwen_min.generate(ours, fc_prompts, fc_new, allowed_token_ids=allowed)

            def fc_theirs():
                theirs.generate(fc_prompts, max_new_tokens=fc_new, min_new_tokens=fc_new, do_sample=False,
                                pad_token_id=151643)

            s = alternate({"ours": fc_ours, "theirs": fc_theirs}, 1, device, warmup=False)
            record("forecast_steps_per_s", n_series * 50 / s["ours"], n_series * 50 / s["theirs"], "steps/s")
        if "generate" in args.only:
            g_ours, g_theirs = generate_fns(ours, theirs, prompts, mask, new)
            s = alternate({"ours": g_ours, "theirs": g_theirs}, 1, device, warmup=False)
            record("generate_tokens_per_s", n * new / s["ours"], n * new / s["theirs"], "tok/s")
        del ours, theirs

    if "phases" in args.only:
        # Where the time goes, under torch.profiler: the no-grad forward above (LoRA models, 4 x 512)
        # and one decode step of the 64-prompt generation above (plain models; 8 new tokens).
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]

        def breakdown(key: str, fns: tuple, models: tuple, per_decode_step: bool = False) -> None:
            res["phases"][key] = {who: profile_phases(fn, model, device, vocab, per_decode_step)
                                  for who, fn, model in zip(("ours", "theirs"), fns, models, strict=True)}
            print_phases(f"{key} (ms per {'step' if per_decode_step else 'call'})", **res["phases"][key])

        ours, theirs = load_ours(ckpt, dtype, device, lora_rank=4), load_theirs(ckpt, dtype, device, lora_rank=4)
        breakdown("forward", forward_fns(ours, theirs, ids), (ours, theirs))
        ours, theirs = load_ours(ckpt, dtype, device), load_theirs(ckpt, dtype, device)
        breakdown("decode_step", generate_fns(ours, theirs, prompts, mask, 8), (ours, theirs), per_decode_step=True)
        del ours, theirs

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    tmp.cleanup()
    return res


if __name__ == "__main__":
    from experiments.lib import cli

    sys.exit(cli.run_as_script(main))

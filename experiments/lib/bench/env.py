"""Where a measurement ran, and the measuring helpers every benchmark shares: the device's sync,
peak and current memory (RSS on a CPU), the matmul peak, the CPU and its bf16-relevant ISA flags,
torch and oneDNN versions, the bf16 kernel oneDNN picks, threads, the GPU on CUDA."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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

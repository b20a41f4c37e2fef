"""Where a script runs: the device (--device auto) and the base weights' dtype on it (--dtype auto).
"""

from __future__ import annotations

import os

import torch

from qwen_min import Qwen2, fastpath

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}   # (config.DTYPE_NAMES, but auto)


def pick_device(name: str) -> torch.device:
    """--device: a name torch knows, or auto: CUDA (under torchrun, this rank's GPU), then MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def weight_dtype(name: str, device: torch.device) -> torch.dtype:
    """The base model's weights' dtype for --dtype ``name`` on ``device``. ``auto``: bf16 where its
    matmuls run at speed (CUDA with bf16; a CPU whose oneDNN has native bf16 kernels, AVX-512 BF16 or
    AMX), else fp32. Why: on an AVX2-only CPU a bf16 matmul falls back to a slow path (measured on an
    AMD EPYC Zen 2, 2 cores: 0.3 GFLOP/s in bf16, 135 in fp32, 2048 x 2048)."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if fastpath.cpu_has_bf16_kernels() else torch.float32
    return torch.float32


def dtype_of(model: Qwen2) -> str:
    """The base model's weights' dtype, as results record it ("bfloat16", "float32")."""
    return str(model.embed_tokens.weight.dtype).removeprefix("torch.")

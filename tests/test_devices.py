"""Where a script runs: --device auto and --dtype auto, resolved as the machine allows."""

from __future__ import annotations

import torch

from experiments.lib.run import cli, config, devices
from qwen_min import fastpath


def test_dtype_auto_is_bf16_only_where_its_matmuls_run_at_speed(monkeypatch):
    cpu = torch.device("cpu")
    assert [devices.weight_dtype(n, cpu) for n in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16,
                                                                           torch.float32]
    for has, want in ((True, torch.bfloat16), (False, torch.float32)):   # AVX-512 BF16 / AMX, or AVX2 alone
        monkeypatch.setattr(fastpath, "cpu_has_bf16_kernels", lambda has=has: has)
        assert devices.weight_dtype("auto", cpu) == want
    for has, want in ((True, torch.bfloat16), (False, torch.float32)):   # CUDA with and without bf16
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda has=has: has)
        assert devices.weight_dtype("auto", torch.device("cuda")) == want
    assert devices.weight_dtype("auto", torch.device("mps")) == torch.float32
    assert config.TrainConfig().dtype == "auto" and cli.parse(config.ForecastConfig, []).dtype == "auto"


def test_device_auto_is_cuda_then_mps_then_the_cpu(monkeypatch):
    assert devices.pick_device("cpu") == torch.device("cpu")
    assert devices.pick_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert devices.pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")   # (torchrun: this rank's GPU)
    assert devices.pick_device("auto") == torch.device("cuda", 1)

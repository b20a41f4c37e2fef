"""The benchmark's account of where it ran and where the time goes (experiments/benchmark.py and its
pieces in experiments/lib/bench/), on the tiny checkpoint: the figures themselves are the
benchmark's business, not a unit test's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import flops
import lora
import qwen_min
from experiments.lib.bench import cases as bench_cases
from experiments.lib.bench import env as bench_env
from experiments.lib.bench import phases as bench_phases

CPU = torch.device("cpu")


def proc_cpuinfo() -> tuple[str, set[str]]:
    """Model name and flags of the first processor, read the plain way."""
    text = Path("/proc/cpuinfo").read_text()
    model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
    return model, set(flags)


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's /proc/cpuinfo")
def test_environment_reports_this_machine(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    env = bench_env.environment(CPU)
    model, flags = proc_cpuinfo()
    assert env["cpu"] == model
    assert set(env["isa_flags"]) == {"amx_bf16", "avx512_bf16", "avx512f", "avx2"}
    assert env["isa_flags"] == {f: f in flags for f in env["isa_flags"]}
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["ONEDNN_MAX_CPU_ISA"] is None and env["device"] == "cpu" and env["gpu"] is None
    if torch.backends.mkldnn.is_available():
        assert env["onednn"] is not None and env["onednn"][0].isdigit()
        kernel = env["onednn_dispatch"]["bf16_matmul_kernel"]
        if "avx512_bf16" in flags and "amx_bf16" not in flags:
            assert "avx512_core_bf16" in kernel
        if "amx_bf16" in flags:
            assert "amx" in kernel


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN's dispatch")
def test_onednn_isa_cap_is_recorded_and_obeyed(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX512_CORE (below AVX-512 BF16) must show in the record and keep oneDNN
    off the bf16 and AMX kernels in the measured child."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    env = bench_env.environment(CPU)
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"
    kernel = env["onednn_dispatch"]["bf16_matmul_kernel"] or ""
    assert "avx512_core_bf16" not in kernel and "amx" not in kernel


@pytest.mark.parametrize("name, shapes, phase", [
    ("aten::mm", [[4, 64], [64, 128]], "matmul"),
    ("aten::addmm", [[128], [4, 64], [64, 128], [], []], "matmul"),
    ("aten::linear", [[4, 64], [128, 64]], "matmul"),
    ("mkldnn::_linear_pointwise", [[4, 64], [128, 64], [], [], [], []], "matmul"),
    ("aten::linear", [[4, 64], [151936, 64]], "output layer/loss"),    # the vocabulary-sized output layer
    ("aten::mm", [[4, 64], [64, 151936], [4, 151936]], "output layer/loss"),
    ("aten::scaled_dot_product_attention", [], "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", [], "attention"),
    ("aten::_scaled_dot_product_efficient_attention", [], "attention"),
    ("aten::rms_norm", [], "norms/rotary"),
    ("phase:norms/rotary", [], "norms/rotary"),
    ("aten::mul", [], "elementwise"),
    ("aten::silu_", [], "elementwise"),
    ("aten::rsqrt", [], "elementwise"),
    ("aten::cross_entropy_loss", [], "output layer/loss"),
    ("aten::log_softmax", [], "output layer/loss"),
    ("aten::copy_", [], "allocation/copy"),
    ("aten::empty", [], "allocation/copy"),
    ("aten::_to_copy", [], "allocation/copy"),
    ("aten::view", [], None),
    ("aten::something_new", [], None),
])
def test_phase_of_known_operators(name, shapes, phase):
    assert bench_phases.phase_of(name, shapes, vocab=151936) == phase


def check_breakdown(b: dict) -> None:
    assert set(b["ms"]) == set(b["fraction"]) == set(bench_phases.PHASES)
    assert math.isclose(sum(b["fraction"].values()), 1.0, rel_tol=1e-9)
    assert math.isclose(sum(b["ms"].values()), b["total_ms"], rel_tol=1e-9)
    assert all(v >= 0 for v in b["ms"].values())


def test_forward_breakdown_ours(tiny_ckpt):
    import qwen_min.model

    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32, device=CPU)
    ids = torch.randint(0, 1000, (2, 16))
    rotary = qwen_min.model.apply_rotary

    def fwd() -> None:
        with torch.no_grad():
            model(ids)

    b = bench_phases.profile_phases(fwd, model, CPU, model.config.vocab_size)
    check_breakdown(b)
    assert b["steps"] == 1
    for phase in ("matmul", "attention", "norms/rotary", "output layer/loss"):
        assert b["ms"][phase] > 0, phase
    # The profiling scopes are gone afterwards: no hooks left, the rotary function restored.
    assert qwen_min.model.apply_rotary is rotary
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_forward_breakdown_transformers(hf_tiny):
    ids = torch.randint(0, 1000, (2, 16))

    def fwd() -> None:
        with torch.no_grad():
            hf_tiny(input_ids=ids)

    b = bench_phases.profile_phases(fwd, hf_tiny, CPU, hf_tiny.config.vocab_size)
    check_breakdown(b)
    for phase in ("matmul", "attention", "norms/rotary", "output layer/loss"):
        assert b["ms"][phase] > 0, phase


def test_decode_step_breakdown(tiny_ckpt, hf_tiny):
    """5 new tokens: the prompt's model call, then 4 decode steps, the figures per step."""
    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32, device=CPU)
    prompts = torch.randint(0, 1000, (3, 8))
    mask = torch.ones_like(prompts)
    mask[0, :3] = 0
    fns = bench_cases.generate_fns(model, hf_tiny, prompts, mask, 5)
    for fn, m in zip(fns, (model, hf_tiny), strict=True):
        b = bench_phases.profile_phases(fn, m, CPU, model.config.vocab_size, per_decode_step=True)
        check_breakdown(b)
        assert b["steps"] == 4
        assert b["ms"]["matmul"] > 0 and b["ms"]["output layer/loss"] > 0


def test_decode_step_needs_a_generation(tiny_ckpt):
    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32, device=CPU)

    def fwd() -> None:
        with torch.no_grad():
            model(torch.zeros(1, 4, dtype=torch.long))

    with pytest.raises(ValueError, match="1 model call"):
        bench_phases.profile_phases(fwd, model, CPU, model.config.vocab_size, per_decode_step=True)



def test_benchmark_script_is_assembled_from_the_pieces():
    from experiments import benchmark

    assert benchmark.profile_phases is bench_phases.profile_phases
    assert benchmark.environment is bench_env.environment and benchmark.time_train_step is bench_cases.time_train_step


def test_the_benchmarks_token_ids_are_read_from_qwens_own_tokenizer():
    # Qwen2.5's byte-level vocabulary: "0".."9" are ids 15..24, "," 11, "." 13, ";" 26; <|endoftext|> 151643
    assert bench_cases.allowed_ids() == [*range(15, 25), 11, 13, 26]
    assert bench_cases.pad_id() == 151643


def test_write_checkpoint_is_the_tied_random_qwen(tmp_path):
    """bench_cases.write_checkpoint at a small shape: qwen_min.init_weights' values, read back, with the
    tokenizer files when asked."""
    shape = dict(qwen_min.QWEN25_05B, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2)
    ckpt = bench_cases.write_checkpoint(tmp_path / "c", torch.float32, shape, tokenizer=True)
    assert (ckpt / "tokenizer.json").is_file()
    model = qwen_min.from_pretrained(ckpt, dtype=torch.float32)
    assert model.lm_head.weight is model.embed_tokens.weight
    w = model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.02) < 0.002 and torch.equal(model.norm.weight, torch.ones(32))


def test_the_shapes_part_times_both_windows_and_compares_them(tiny_ckpt, monkeypatch):
    """--only shapes: the training step at each window shape, ours and transformers', each tokens/s the
    window's tokens over its measured seconds, the long-over-short ratios those figures' own, and the
    counter's FLOPs per token growing with the window (attention's share)."""
    from experiments import benchmark

    monkeypatch.setattr(benchmark, "SHAPES", ((4, 16), (1, 64)))
    monkeypatch.setattr(benchmark, "matmul_peak", lambda dtype, device: 1e9)   # (no 2048² timing here)
    b = benchmark.Bench(tiny_ckpt, "fp32", CPU, 1, {"ours": {}, "theirs": {}, "ratios": {}})
    benchmark.bench_shapes(b, ["shapes"])
    res, rows = b.res["shapes"], b.res["shapes"]["rows"]
    assert set(rows) == {"4x16", "1x64"}
    for key, tokens in (("4x16", 64), ("1x64", 64)):
        for who in ("ours", "theirs"):
            assert rows[key][f"tokens_per_s_{who}"] == pytest.approx(tokens / rows[key][f"seconds_{who}"])
        assert b.res["ours"][f"train_{key}_tokens_per_s"] == rows[key]["tokens_per_s_ours"]
    for who in ("ours", "theirs"):
        assert res[f"long_over_short_{who}"] == pytest.approx(rows["1x64"][f"tokens_per_s_{who}"]
                                                              / rows["4x16"][f"tokens_per_s_{who}"])
    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)
    lora.apply_lora(model, rank=4)
    per_token = [flops.count(model, batch=B, seq_len=T, mode="train").train_actual / (B * T)
                 for B, T in ((4, 16), (1, 64))]
    assert res["flops_per_token_long_over_short"] == pytest.approx(per_token[1] / per_token[0])
    assert per_token[1] > per_token[0]    # the same tokens, longer attention spans

"""experiments/gpu_check.py, the prepared device check, run on the CPU with the tiny checkpoint and
the smallest sizes: every part reports, the checks against transformers + PEFT pass, and a part
that fails leaves the others reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import flops
import lora
from experiments import gpu_check, study
from experiments.lib.budget import planning
from experiments.lib.science import forecasting
from qwen_min import QwenConfig

SMALL = ["--device", "cpu", "--dtype", "fp32", "--train-sizes", "1x16,2x16", "--forecast-series", "1,2",
         "--forecast-steps", "2", "--prompt-steps", "2", "--greedy", "2x8x6", "--logits", "1x12", "--reps", "1"]


@pytest.fixture(scope="module")
def result(tiny_ckpt, lv_data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    res = gpu_check.main([*SMALL, "--model", str(tiny_ckpt), "--study-preset", "tiny", "--data", str(lv_data_file),
                          "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))  # what --json wrote is what it returned
    return res


def test_every_part_reports_and_passes(result):
    parts = result["parts"]
    assert set(parts) == set(gpu_check.PARTS)
    for name, part in parts.items():
        assert part["ok"] is True and part["error"] is None, (name, part.get("error"), part.get("traceback"))
        assert part["seconds"] >= 0
    assert result["ok"] and result["environment"]["device"] == "cpu"
    assert result["fastpath_devices"]["folded_decode"] and not result["fastpath_devices"]["prepack"]


def test_ours_equals_transformers_and_peft(result):
    logits = result["parts"]["logits"]
    assert logits["max_abs_logit_diff"] <= logits["tolerance"] == 1e-4
    # the adapters move the logits by far more than the tolerance: a LoRA path that differed from PEFT's
    # (or ignored the adapters) could not pass the comparison
    assert logits["max_abs_lora_effect"] > 100 * logits["tolerance"]
    assert logits["greedy_identical"] and logits["greedy_match_fraction"] == 1.0
    assert logits["logits_shape"] == [1, 12] and logits["greedy_shape"] == [2, 8, 6]   # what SMALL asked for


def _shape(ckpt: Path, lora_rank: int | None = None):
    """The checkpoint's model on the meta device (shapes for the FLOP counter), LoRA on q and v."""
    shape = planning.meta_model(QwenConfig.from_json(ckpt / "config.json"))
    if lora_rank:
        lora.apply_lora(shape, rank=lora_rank)
    return shape


def test_speeds_are_the_work_over_the_time_measured(result, tiny_ckpt):
    train, fc = result["parts"]["train"], result["parts"]["forecast"]
    assert set(train["sizes"]) == {"1x16", "2x16"} and train["matmul_dtype"] == "float32"
    shape = _shape(tiny_ckpt, lora_rank=4)
    for size, row in train["sizes"].items():
        B, T = map(int, size.split("x"))
        # tokens/s is the step's B x T tokens over its measured seconds; the ratio theirs' time over ours
        assert row["tokens_per_s_ours"] == pytest.approx(B * T / row["seconds_ours"], rel=1e-12)
        assert row["tokens_per_s_theirs"] == pytest.approx(B * T / row["seconds_theirs"], rel=1e-12)
        assert row["ratio"] == pytest.approx(row["seconds_theirs"] / row["seconds_ours"], rel=1e-12)
        # the step's FLOPs are the counter's for a LoRA-rank-4 step of B x T; MFU is them over time x peak
        report = flops.count(shape, batch=B, seq_len=T, mode="train")
        assert (row["flops_per_step_planned"], row["flops_per_step_actual"]) == (report.total, report.train_actual)
        peak = train["matmul_peak_flops_per_s"]
        assert row["mfu_ours"] == pytest.approx(report.train_actual / row["seconds_ours"] / peak, rel=1e-12)
        assert row["mfu_theirs"] == pytest.approx(report.train_actual / row["seconds_theirs"] / peak, rel=1e-12)
    # forecasting: 2 prompt steps and 2 forecast steps of 10 tokens ("d.dd,d.dd;") each
    assert (fc["steps"], fc["prompt_tokens"], fc["new_tokens"]) == (2, 20, 20) and set(fc["series"]) == {"1", "2"}
    base = _shape(tiny_ckpt)
    for n, row in fc["series"].items():
        n = int(n)
        assert row["steps_per_s_ours"] == pytest.approx(n * 2 / row["seconds_ours"], rel=1e-12)
        assert row["steps_per_s_theirs"] == pytest.approx(n * 2 / row["seconds_theirs"], rel=1e-12)
        total, _ = forecasting.generation_flops(base, batch=n, prompt_len=20, steps=20, num_samples=1, vocab=13,
                                                sampled=False, padded=False)
        assert row["flops_ours"] == total
        assert row["flops_per_s_ours"] == pytest.approx(total / row["seconds_ours"], rel=1e-12)


def test_peak_memory_holds_at_least_the_weights(result, tiny_ckpt):
    # the peak resident set of two training steps, weights included: at least the checkpoint's weights, in
    # the fp32 both load them in, counted from the safetensors file's own tensors (the tied output layer once)
    mem = result["parts"]["memory"]
    assert mem["what"].startswith("peak RSS") and mem["size"] == "1x16"
    weights = sum(t.numel() * 4 for t in load_file(tiny_ckpt / "model.safetensors").values())
    assert weights > 30e6   # (151936 x 64 embeddings alone: 39 MB)
    assert mem["peak_bytes_ours"] >= weights and mem["peak_bytes_theirs"] >= weights
    assert mem["ratio"] == pytest.approx(mem["peak_bytes_ours"] / mem["peak_bytes_theirs"], rel=1e-12)


def test_the_plan_is_study_pys_own_and_its_time_the_measured_speeds(result, tiny_ckpt, lv_data_file, tmp_path):
    plan = result["parts"]["plan"]
    assert plan["preset"] == "tiny"
    # the same dry run, in this process: the same runs at the same prices
    dry = json.loads(study.main(["--preset", "tiny", "--dry-run", "--model", str(tiny_ckpt), "--data",
                                 str(lv_data_file), "--out", str(tmp_path / "s"), "--device", "cpu", "--dtype",
                                 "fp32"]).read_text())
    assert [(r["name"], r["flops"], r["bound"]) for r in plan["runs"]] == [
        (i["name"], i["flops"], i["bound"]) for i in dry["items"]]
    assert plan["planned_flops"] == dry["planned_flops"] == pytest.approx(sum(r["flops"] for r in plan["runs"]))
    assert {r["name"] for r in plan["runs"]} >= {"zeroshot_val", "final", "final_test"}
    # each run's time, by hand from its config and the speeds measured (the nearest size measured)
    train = result["parts"]["train"]["sizes"]
    fc = result["parts"]["forecast"]["series"]

    def tok_s(tokens: int) -> float:
        return train[min(train, key=lambda k: abs(np.prod([int(x) for x in k.split("x")]) - tokens))][
            "tokens_per_s_ours"]

    def steps_s(rows: int) -> float:
        return fc[min(fc, key=lambda k: abs(int(k) - rows))]["steps_per_s_ours"]

    for run, item in zip(plan["runs"], dry["items"], strict=True):
        c = item["config"]
        if item["script"] == "forecast":
            rows = min(c["max_systems"], c["forecast_batch"])
            want = c["max_systems"] * c["horizon"] / steps_s(rows)
            if c["samples"]:
                want += c["max_systems"] * c["samples"] * c["horizon"] / steps_s(rows * c["samples"])
        else:
            tokens = c["batch_size"] * c["context_length"]
            evals = c["max_steps"] // c["eval_every"] + c["eval_at_start"]
            want = (c["max_steps"] * tokens / tok_s(tokens) + evals * c["eval_windows"] * c["context_length"]
                    / (3 * tok_s(tokens)) + evals * c["val_forecast_systems"] * c["horizon"]
                    / steps_s(c["val_forecast_systems"]))
        assert run["estimated_s"] == pytest.approx(want, rel=1e-12), run["name"]
    assert plan["wall_time_s"] == pytest.approx(sum(r["estimated_s"] for r in plan["runs"]), rel=1e-12)


def test_a_failing_part_leaves_the_others_reported(tiny_ckpt, tmp_path):
    """A preset study.py does not know makes the plan fail; the logits part still reports, and so does
    the plan, with its error."""
    out = tmp_path / "check.json"
    res = gpu_check.main([*SMALL, "--model", str(tiny_ckpt), "--parts", "logits", "plan", "--study-preset",
                          "no-such-preset", "--json", str(out)])
    parts = json.loads(out.read_text())["parts"]
    assert set(parts) == {"logits", "plan"} and not res["ok"]
    assert parts["logits"]["ok"] and parts["logits"]["greedy_identical"]
    assert parts["plan"]["ok"] is False and "exited with status 2" in parts["plan"]["error"]


def test_a_plan_over_its_time_is_reported(tiny_ckpt, tmp_path):
    res = gpu_check.main(["--device", "cpu", "--model", str(tiny_ckpt), "--parts", "plan", "--study-preset", "tiny",
                          "--plan-timeout", "0.5"])
    assert res["parts"]["plan"]["ok"] is False and "TimeoutExpired" in res["parts"]["plan"]["error"]


def test_sizes_are_checked():
    assert gpu_check.sizes("4x512,16x512", 2) == [(4, 512), (16, 512)]
    for bad in ("4x", "0x512", "4x5x6"):
        with pytest.raises(ValueError):
            gpu_check.sizes(bad, 2)

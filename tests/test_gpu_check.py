"""experiments/gpu_check.py, the prepared device check, run on the CPU with the tiny checkpoint and
the smallest sizes: every part reports, the checks against transformers + PEFT pass, and a part
that fails leaves the others reported."""

from __future__ import annotations

import json

import pytest

from experiments import gpu_check

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
    assert logits["max_abs_lora_effect"] > 0  # the adapters change the logits: the comparison covers them
    assert logits["greedy_identical"] and logits["greedy_match_fraction"] == 1.0


def test_speeds_memory_and_plan_figures(result):
    train, fc = result["parts"]["train"], result["parts"]["forecast"]
    assert set(train["sizes"]) == {"1x16", "2x16"} and train["matmul_dtype"] == "float32"
    for row in train["sizes"].values():
        assert row["tokens_per_s_ours"] > 0 and row["tokens_per_s_theirs"] > 0 and 0 < row["mfu_ours"]
    assert set(fc["series"]) == {"1", "2"} and all(r["steps_per_s_ours"] > 0 for r in fc["series"].values())
    mem = result["parts"]["memory"]
    assert mem["peak_bytes_ours"] > 0 and mem["peak_bytes_theirs"] > 0 and mem["what"].startswith("peak RSS")
    plan = result["parts"]["plan"]
    assert plan["preset"] == "tiny" and plan["planned_flops"] > 0 and plan["wall_time_s"] > 0
    assert all(r["estimated_s"] > 0 for r in plan["runs"])
    assert {r["name"] for r in plan["runs"]} >= {"zeroshot_val", "final", "final_test"}


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

"""Planning reads the model's config.json alone: from a folder, or from the Hub without the weights;
a training plan counts every step and evaluation still to run."""

from __future__ import annotations

import huggingface_hub
import pytest

import flops
import lora
import qwen_min
from experiments.lib import planning, runs
from qwen_min import QwenConfig


def test_model_config_of_a_folder_needs_no_weights(tmp_path, tiny_ckpt):
    (tmp_path / "config.json").write_bytes((tiny_ckpt / "config.json").read_bytes())
    config = qwen_min.load_config(tmp_path)
    assert config == QwenConfig.from_json(tiny_ckpt / "config.json")
    assert planning.meta_model(config).lm_head.weight.is_meta


def test_model_config_from_the_hub_fetches_config_json_only(monkeypatch, tiny_ckpt):
    fetched = []

    def hf_hub_download(repo_id, filename, *, revision=None):
        fetched.append((repo_id, filename, revision))
        return str(tiny_ckpt / filename)

    def snapshot_download(*args, **kwargs):
        raise AssertionError("planning downloaded a snapshot (the weights)")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    config = qwen_min.load_config("Qwen/Qwen2.5-0.5B-Instruct", revision="abc123")
    assert fetched == [("Qwen/Qwen2.5-0.5B-Instruct", "config.json", "abc123")]
    assert config.hidden_size == 64



def _rank2_run(ckpt, max_steps: int, eval_every: int):
    """train.py's arguments (rank 2, 2 x 16 tokens, a 3-window validation subset) and the structure they price."""
    args = runs.train_parser().parse_args(["--model", str(ckpt), "--rank", "2", "--context-length", "16",
                                           "--batch-size", "2", "--max-steps", str(max_steps), "--eval-every",
                                           str(eval_every), "--eval-windows", "3"])
    shape = planning.meta_model(QwenConfig.from_json(ckpt / "config.json"))
    lora.apply_lora(shape, rank=2)
    return args, shape


def test_train_plan_counts_what_is_left_from_a_resumed_step(tiny_ckpt):
    args, shape = _rank2_run(tiny_ckpt, max_steps=10, eval_every=4)
    step = flops.count(shape, batch=2, seq_len=16, mode="train").total
    subset = flops.count(shape, batch=3, seq_len=16, mode="forward").total   # 3 of the 5 validation windows
    full = flops.count(shape, batch=5, seq_len=16, mode="forward").total
    fresh, _ = planning.train_plan(args, n_val_windows=5, world=2)
    assert (fresh.steps, fresh.evals) == (10, 3)   # evaluations at step 0 (the untrained model), 4 and 8
    assert fresh.total == pytest.approx(10 * step + 2 * (3 * subset + full), rel=1e-12)
    for at, steps, evals in [(4, 6, 1), (5, 5, 1), (8, 2, 0), (10, 0, 0)]:
        plan, _ = planning.train_plan(args, n_val_windows=5, world=1, from_step=at)
        assert (plan.steps, plan.evals) == (steps, evals)
        assert plan.total == pytest.approx(steps * step + evals * subset + full, rel=1e-12)


def test_train_plan_prices_the_validation_forecasts_of_every_evaluation(tiny_ckpt):
    args, shape = _rank2_run(tiny_ckpt, max_steps=6, eval_every=3)
    without, _ = planning.train_plan(args, n_val_windows=5)
    plan, _ = planning.train_plan(args, n_val_windows=5, forecast=(4, 20, 6))
    # one greedy generate call per evaluation: a prefill of 4 x 20 tokens, then 5 single-token steps
    # over the 13 allowed tokens, the t-th attending to 20 + t - 1 cached positions (padded prompts)
    one = flops.count(shape, batch=4, seq_len=20, mode="prefill", vocab=13, padded=True).total + sum(
        flops.count(shape, batch=4, seq_len=1, past_len=20 + t - 1, mode="decode", vocab=13, padded=True).total
        for t in range(1, 6))
    assert plan.evals == 3 and plan.total - without.total == pytest.approx(3 * one, rel=1e-12)

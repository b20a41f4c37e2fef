"""Planning reads the model's config.json alone: from a folder, or from the Hub without the weights;
a training plan counts every step and evaluation still to run."""

from __future__ import annotations

import huggingface_hub
import pytest

import flops
import lora
import qwen_min
from experiments.lib.budget import planning
from experiments.lib.run import cli, config
from experiments.lib.science import data
from experiments.lib.training import schedule
from qwen_min import QwenConfig


def test_model_config_of_a_folder_needs_no_weights(tmp_path, tiny_ckpt):
    (tmp_path / "config.json").write_bytes((tiny_ckpt / "config.json").read_bytes())
    config = qwen_min.load_config(tmp_path)
    assert config == QwenConfig.from_json(tiny_ckpt / "config.json")
    assert planning.meta_model(config).lm_head.weight.is_meta


def test_model_config_from_the_hub_fetches_config_json_only(monkeypatch, tiny_ckpt):
    fetched = []

    def hf_hub_download(repo_id, filename, *, revision=None, **kwargs):   # (offline: local_files_only=True)
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
    args = cli.parse(config.TrainConfig, ["--model", str(ckpt), "--rank", "2", "--context-length", "16",
                                           "--batch-size", "2", "--max-steps", str(max_steps), "--eval-every",
                                           str(eval_every), "--eval-windows", "3"])
    shape = planning.meta_model(QwenConfig.from_json(ckpt / "config.json"))
    lora.apply_lora(shape, rank=2)
    return args, shape


# Token windows of 16 with known padding: 3 training windows scoring 15, 15 and 6 tokens (a 7-token
# series), 5 validation windows scoring 15, 15, 15, 15 and 3.
TRAIN = data.training_windows([list(range(1, 31)), list(range(1, 8))], context_length=16, stride=15, pad_id=0)
VAL = data.training_windows([list(range(1, 62)), list(range(1, 5))], context_length=16, stride=15, pad_id=0)


def test_the_windows_score_what_the_plan_tests_assume():
    assert (TRAIN.labels != -100).sum(1).tolist() == [15, 15, 6]
    assert (VAL.labels != -100).sum(1).tolist() == [15, 15, 15, 15, 3]


def _drawn(seed: int, steps: int) -> list[list[int]]:
    """The windows of each step, by hand: each epoch a seeded permutation of the 3 windows, whose first
    2 make a step; the third is left over (too few for a batch) and the next epoch begins."""
    return [schedule.batch_order(3, seed, epoch)[:2].tolist() for epoch in range(steps)]


def test_train_plan_prices_the_batches_the_run_will_draw_from_a_resumed_step(tiny_ckpt):
    args, shape = _rank2_run(tiny_ckpt, max_steps=10, eval_every=4)
    scored = [15, 15, 6]
    step = [flops.count(shape, batch=2, seq_len=16, mode="train", scored_tokens=sum(scored[i] for i in b)).total
            for b in _drawn(args.seed, 10)]
    assert len(set(step)) == 2   # batches with and without the short window cost differently
    subset = flops.count(shape, batch=3, seq_len=16, mode="forward", scored_tokens=45).total  # 3 of 5 windows
    full = (flops.count(shape, batch=2, seq_len=16, mode="forward", scored_tokens=30).total * 2
            + flops.count(shape, batch=1, seq_len=16, mode="forward", scored_tokens=3).total)  # batches of 2
    fresh, _ = planning.train_plan(args, TRAIN, VAL, world=2)
    assert (fresh.steps, fresh.evals) == (10, 3)   # evaluations at step 0 (the untrained model), 4 and 8
    assert fresh.total == pytest.approx(sum(step) + 2 * (3 * subset + full), rel=1e-12)
    for at, steps, evals in [(4, 6, 1), (5, 5, 1), (8, 2, 0), (10, 0, 0)]:
        plan, _ = planning.train_plan(args, TRAIN, VAL, world=1, from_step=at)
        assert (plan.steps, plan.evals) == (steps, evals)
        assert plan.total == pytest.approx(sum(step[at:]) + evals * subset + full, rel=1e-12)


def test_train_plan_prices_the_validation_forecasts_of_every_evaluation(tiny_ckpt):
    args, shape = _rank2_run(tiny_ckpt, max_steps=6, eval_every=3)
    without, _ = planning.train_plan(args, TRAIN, VAL)
    call = {"batch": 4, "prompt_len": 20, "steps": 6, "num_samples": 1, "vocab": 13, "sampled": False, "padded": True}
    plan, _ = planning.train_plan(args, TRAIN, VAL, forecast_calls=[call])
    # one greedy generate call per evaluation: a prefill of 4 x 20 tokens, then 5 single-token steps
    # over the 13 allowed tokens, the t-th attending to 20 + t - 1 cached positions (padded prompts)
    one = flops.count(shape, batch=4, seq_len=20, mode="prefill", vocab=13, padded=True).total + sum(
        flops.count(shape, batch=4, seq_len=1, past_len=20 + t - 1, mode="decode", vocab=13, padded=True).total
        for t in range(1, 6))
    assert plan.evals == 3 and plan.total - without.total == pytest.approx(3 * one, rel=1e-12)

"""What an evaluation forecasts and how it scores it: forecast.py's prompts of the first validation
systems, and the filled-in scores (a model that writes no valid number scores exactly persistence)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qwen_min
from experiments.lib import errors
from experiments.lib.run import cli, config, rundata, windows
from experiments.lib.science import data, forecasting
from experiments.lib.science.lotka_volterra import load_h5
from experiments.lib.training import evaluation


def _args(ckpt, data_file, *extra) -> object:
    return cli.parse(config.TrainConfig, ["--model", str(ckpt), "--data", str(data_file), *map(str, extra)])


def test_the_forecast_set_is_forecast_pys_prompts_of_the_first_validation_systems(tiny_ckpt, lv_data_file):
    args = _args(tiny_ckpt, lv_data_file, "--val-forecast-systems", 3, "--context-steps", 10, "--horizon", 4)
    run_data, tok = rundata.prepare_data(args), qwen_min.load_tokenizer(tiny_ckpt)
    fs = windows.forecast_set_of(args, run_data, tok)
    systems = run_data.splits["val"][:3]
    examples = data.forecast_examples(run_data.trajectories, systems, run_data.encoding, context_steps=10, horizon=4)
    assert fs.prompts == [e.prompt for e in examples]
    traj, _ = load_h5(lv_data_file)
    assert np.array_equal(fs.truth, traj[systems, 10:14]) and np.array_equal(fs.last, traj[systems, 9])
    # one greedy call for the 3 prompts, left-padded to the longest, running to the token limit
    lengths = [len(tok.encode(p)) for p in fs.prompts]
    assert fs.calls == [{"batch": 3, "prompt_len": max(lengths), "steps": forecasting.max_new_tokens(fs.prompts, 4),
                         "num_samples": 1, "vocab": 13, "sampled": False, "padded": min(lengths) != max(lengths)}]
    assert not fs.to_limit and windows.forecast_set_of(_args(tiny_ckpt, lv_data_file, "--run-to-limit"),
                                                          run_data, tok).to_limit

    none = windows.forecast_set_of(_args(tiny_ckpt, lv_data_file, "--val-forecast-systems", 0, "--select-by",
                                            "loss"), run_data, tok)
    assert none is None
    with pytest.raises(errors.UsageError, match="--val-forecast-systems: -1: must be 0 or more"):   # (when parsed)
        windows.forecast_set_of(_args(tiny_ckpt, lv_data_file, "--val-forecast-systems", -1), run_data, tok)
    with pytest.raises(errors.UsageError, match="--context-steps/--horizon"):
        too_long = _args(tiny_ckpt, lv_data_file, "--context-steps", 90, "--horizon", 20)
        windows.forecast_set_of(too_long, run_data, tok)


def test_a_model_that_writes_no_valid_number_scores_exactly_persistence(tiny_ckpt, lv_data_file):
    # the tiny random model's digits never form a step of the encoding: every step is filled with the
    # last prompt value, which is last-value persistence
    args = _args(tiny_ckpt, lv_data_file, "--val-forecast-systems", 3, "--context-steps", 10, "--horizon", 3)
    tok = qwen_min.load_tokenizer(tiny_ckpt)
    fs = windows.forecast_set_of(args, rundata.prepare_data(args), tok)
    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)
    calls = []
    got = evaluation.score_forecasts(model, fs, torch.device("cpu"), on_call=lambda c, f: calls.append(f))
    persistence = np.abs(fs.last[:, None] - fs.truth).mean()
    assert got["coverage"] == 0.0 and got["relative_score"] == pytest.approx(1.0)
    assert got["mae"] == pytest.approx(persistence)
    assert len(calls) == 1 and calls[0] > 0   # one generate call, charged through on_call

"""The scripts' configs: one definition per flag, a command line and its config the same thing both
ways, and what no single flag can check refused when a config is made."""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields, replace

import pytest

from experiments.lib import errors
from experiments.lib.run import cli, config
from experiments.lib.run.config import EvalConfig, ForecastConfig, RunConfig, TrainConfig

CONFIGS = (RunConfig, EvalConfig, ForecastConfig, TrainConfig)


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_is_one_flag_with_the_fields_default(cls):
    p = cli.parser(cls)
    actions = {a.dest: a for a in p._actions if a.dest not in ("help", "debug")}
    assert set(actions) == {f.name for f in fields(cls)}
    for f in fields(cls):
        a = actions[f.name]
        assert a.default == f.default and a.help == f.metadata["help"], f.name
        assert a.option_strings[0] == "--" + f.name.replace("_", "-")
    assert cli.parse(cls, []) == cls()   # (no flag: every default)


def test_a_command_line_and_its_config_are_the_same_both_ways():
    argv = ["--model", "m", "--data", "d.h5", "--lr", "0.0003", "--targets", "q_proj", "k_proj", "--no-eval-at-start",
            "--splits", "0.5", "0.25", "0.25", "--stride", "100", "--train-lm-head-bias", "--lora-alpha", "8",
            "--budget", "3e16", "--schedule", "linear"]
    cfg = cli.parse(TrainConfig, argv)
    assert (cfg.lr, cfg.targets, cfg.eval_at_start, cfg.splits, cfg.stride) == (3e-4, ("q_proj", "k_proj"), False,
                                                                                (0.5, 0.25, 0.25), 100)
    assert cfg.train_lm_head_bias and cfg.lora_alpha == 8.0 and cfg.budget == 3e16 and cfg.schedule == "linear"
    back = config.to_argv(cfg)
    assert cli.parse(TrainConfig, back) == cfg
    assert "--no-eval-at-start" in back and "--max-steps" not in back   # (defaults are not written)
    # floats that print long come back as the same float; a switch's default written nowhere
    odd = ForecastConfig(temperature=0.1 + 0.2, top_p=1 / 3, samples=5, no_baselines=True, adapter="a", split="val")
    assert cli.parse(ForecastConfig, config.to_argv(odd)) == odd
    assert config.to_argv(EvalConfig()) == []
    # the config as JSON is what <script>_args.json holds: the same keys as the fields
    assert set(asdict(cfg)) == {f.name for f in fields(TrainConfig)}


def test_a_config_without_a_command_line_is_refused_by_to_argv():
    with pytest.raises(ValueError, match=r"TrainConfig.dtype: None has no command line"):
        config.to_argv(replace(TrainConfig(), dtype=None))


@pytest.mark.parametrize(("make", "message"), [
    (lambda: RunConfig(splits=(0.5, 0.5, 0.5)), "--splits: 0.5 0.5 0.5: must be three non-negative fractions"),
    (lambda: EvalConfig(splits=(1.2, 0.0, 0.0)), "must be three non-negative fractions summing to 1"),
    (lambda: TrainConfig(rank=0), "nothing to train: --rank 0 without --train-lm-head-bias"),
    (lambda: TrainConfig(val_forecast_systems=0), "--select-by mae needs --val-forecast-systems > 0"),
    (lambda: TrainConfig(context_length=64, stride=65), "--stride 65: must be between 1 and --context-length 64"),
    (lambda: TrainConfig(eval_windows=0), "argument --eval-windows: 0: must be at least 1"),
    (lambda: TrainConfig(val_forecast_systems=-1), "argument --val-forecast-systems: -1: must be 0 or more"),
    (lambda: TrainConfig(lr=float("inf")), "argument --lr: inf: must be a finite number"),
    (lambda: TrainConfig(max_steps=0), "argument --max-steps: 0: must be at least 1"),
    (lambda: ForecastConfig(top_p=1.5), "argument --top-p: 1.5: must be above 0 and at most 1"),
    (lambda: EvalConfig(split="training"), "argument --split: invalid choice: 'training'"),
    (lambda: RunConfig(splits=(0.5, -0.25, 0.75)), "argument --splits: -0.25: must be a finite number, 0 or more"),
])
def test_a_config_made_directly_is_refused_as_its_command_line_would_be(make, message):
    with pytest.raises(errors.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_made_from_a_command_line_the_same_refusals_are_usage_errors():
    with pytest.raises(errors.UsageError, match="--splits: 0.6 0.3 0.3"):
        cli.parse(TrainConfig, ["--splits", "0.6", "0.3", "0.3"])
    with pytest.raises(errors.UsageError, match="--lr: -1: must be a finite number above 0"):
        cli.parse(TrainConfig, ["--lr", "-1"])
    assert TrainConfig(rank=0, train_lm_head_bias=True).rank == 0
    assert TrainConfig(val_forecast_systems=0, select_by="loss").val_forecast_systems == 0


def test_configs_are_frozen_values_and_name_their_run():
    cfg = TrainConfig(out="runs/my-run")
    with pytest.raises(AttributeError):
        cfg.lr = 1.0   # type: ignore[misc]
    assert cfg.run_name == "my-run" and replace(cfg, name="other").run_name == "other"
    assert hash(cfg) == hash(TrainConfig(out="runs/my-run"))   # (study.py prices each once)
    assert isinstance(cli.parser(TrainConfig), argparse.ArgumentParser)

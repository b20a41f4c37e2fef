"""What each experiment script is told: typed, frozen configs, one definition per flag.

Every field of a config is a flag (``context_length`` is ``--context-length``) whose type, default
and help are written once, here: ``cli.parser`` builds a script's argparse parser from the fields,
``cli.parse`` turns a command line into the config, and ``to_argv`` writes the command line that
gives a config back (study.py starts each run's script with it). So ``--help``, the config the library
takes and the ``<script>_args.json`` a run saves cannot drift apart. What no single flag's type can
check (the splits' sum, a stride longer than the window, nothing to train) is checked when a config
is made, from a command line or directly.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import flops
from experiments.lib import errors
from experiments.lib.run.flagtypes import (
    SERIES,
    finite_positive_float,
    fraction,
    non_negative_float,
    non_negative_int,
    percentile,
    positive_int,
    probability,
    window_length,
)
from experiments.lib.training.schedule import SCHEDULES  # the learning rate after the warm-up

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")    # (devices.weight_dtype maps them to torch dtypes)
# What picks the best adapter: the validation forecasts' filled-in MAE (the headline metric), their
# relative score, or the validation-subset cross-entropy.
SELECT_BY = ("mae", "relative", "loss")

MODEL_AND_DATA, BUDGET, TRAINING = "model and data", "FLOP budget", "training"
LORA, OPTIMIZER = "LoRA", "optimizer and learning rate schedule"
SELECTION = "evaluation and model selection (each evaluation: step 0, then every --eval-every steps)"
FORECASTING = "forecasting"


def flag(default: Any, help: str, *, type: Any = None, choices: tuple | None = None, nargs: str | int | None = None,
         metavar: tuple[str, ...] | None = None, group: str | None = None) -> Any:
    """A config field that is a flag: its default, its --help line, and how argparse reads it (a bool
    default is a switch: False ``--x``, True ``--x/--no-x``)."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "nargs": nargs,
                                            "metavar": metavar, "group": group})


def same_as(cls: type, name: str, *, default: Any = MISSING, help: str | None = None) -> Any:
    """Field ``name`` of config ``cls`` as a flag of another config (study.py's of RunConfig's), so a
    flag of one meaning is defined once: the same type, choices and group, and the same default and
    help unless ``default`` or ``help`` says what differs."""
    f = next(f for f in fields(cls) if f.name == name)
    m = f.metadata
    return flag(f.default if default is MISSING else default, m["help"] if help is None else help, type=m["type"],
                choices=m["choices"], nargs=m["nargs"], metavar=m["metavar"], group=m["group"])


def _out(default: str) -> Any:
    """--out, whose default each script names for itself."""
    return flag(default, "run folder for every file this run writes", group=MODEL_AND_DATA)


RUN_TO_LIMIT = ("generate every forecast to its token limit instead of stopping once every row has its horizon: "
                "about a fifth more decoding, the same forecasts, and (decoding constrained, the default) FLOPs "
                "known before it runs, so the plan equals the ledger")


@dataclass(frozen=True)
class RunConfig:
    """What every script shares: the model, the data and its encoding, the run folder, the ledger."""

    model: str = flag(DEFAULT_MODEL, "Hub repo id or local checkpoint folder", group=MODEL_AND_DATA)
    revision: str | None = flag(None, "Hub revision (branch, tag or commit) to pin", group=MODEL_AND_DATA)
    data: str | None = flag(None, "HDF5 data file (trajectories (N,T,2), time (T,)); default: the generated data set",
                            group=MODEL_AND_DATA)
    out: str = _out("runs/run")
    overwrite: bool = flag(False, "write into an --out that holds a finished or interrupted run (refused without it)",
                           group=MODEL_AND_DATA)
    seed: int = flag(0, "seed for splits, sampling and initialisation", type=non_negative_int, group=MODEL_AND_DATA)
    device: str = flag("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps", group=MODEL_AND_DATA)
    dtype: str = flag("auto", "base-model weight dtype (LoRA weights and optimizer stay fp32); auto: bf16 on CUDA "
                      "and on a CPU with bf16 matmul kernels (AVX-512 BF16 or AMX), fp32 elsewhere (an AVX2-only "
                      "CPU runs bf16 matmuls hundreds of times slower than fp32)", choices=DTYPE_NAMES,
                      group=MODEL_AND_DATA)
    context_length: int | str = flag(256, "tokens per training/evaluation window (at least one time step of text), "
                                     "or 'series': each window one series from its start, as much of it as a "
                                     "forecast reads and writes (train.py: --context-steps + --horizon steps; "
                                     "evaluate.py: all of it), as long as the longest of them",
                                     type=window_length, group=MODEL_AND_DATA)
    batch_size: int = flag(4, "sequences per step (global, over all ranks)", type=positive_int, group=MODEL_AND_DATA)
    decimals: int = flag(2, "LLMTIME decimals", type=non_negative_int, group=MODEL_AND_DATA)
    percentile: float = flag(90.0, "the training-value percentile (in (0, 100]) that LLMTIME scaling maps to 10",
                             type=percentile, group=MODEL_AND_DATA)
    splits: tuple[float, float, float] = flag((0.7, 0.15, 0.15), "fractions of systems in train/validation/test "
                                              "(summing to 1)", type=non_negative_float, nargs=3,
                                              metavar=("TRAIN", "VAL", "TEST"), group=MODEL_AND_DATA)
    budget: float = flag(flops.DEFAULT_BUDGET, "total FLOP budget of the ledger", type=finite_positive_float,
                         group=BUDGET)
    ledger: str = flag(flops.DEFAULT_LEDGER, "FLOP ledger file shared by all experiments", group=BUDGET)
    name: str | None = flag(None, "experiment name in the ledger (default: the run folder's name)", group=BUDGET)
    reservation: str | None = flag(None, "charge an open ledger reservation made by another process (study.py "
                                   "passes its own) instead of reserving anew", group=BUDGET)

    def __post_init__(self) -> None:
        check_fields(self)
        check_splits(self.splits)

    @property
    def run_name(self) -> str:
        """The run's name in the ledger (and W&B): --name, or the run folder's name."""
        return self.name or Path(self.out).name


@dataclass(frozen=True)
class AdapterConfig(RunConfig):
    """A script that scores the untrained model or a saved adapter on one split's systems."""

    adapter: str | None = flag(None, "a saved LoRA adapter folder (PEFT layout); none: the untrained model")
    split: str = flag("test", "which systems to use", choices=("train", "val", "test"))
    max_systems: int | None = flag(None, "use only the first N systems of the split", type=positive_int)
    allow_other_data: bool = flag(False, "score an adapter on a data file other than the one it was trained on (its "
                                  "SHA-256 differs); refused without this flag, recorded as a warning in the "
                                  "results with it")
    allow_other_base: bool = flag(False, "load an adapter into a base model other than the one it was trained on "
                                  "(its config or checkpoint SHA-256, recorded in the adapter's base_model.json, "
                                  "differs); refused without this flag, recorded as a warning in the results with it")


@dataclass(frozen=True)
class EvalConfig(AdapterConfig):
    """evaluate.py: the cross-entropy of one split's windows."""

    script: ClassVar[str] = "evaluate"

    out: str = _out("runs/eval")


@dataclass(frozen=True)
class ForecastConfig(AdapterConfig):
    """forecast.py: greedy (and sampled) forecasts of one split's systems, with the baselines."""

    script: ClassVar[str] = "forecast"

    out: str = _out("runs/forecast")
    context_steps: int = flag(50, "time steps in the prompt (C)", type=positive_int, group=FORECASTING)
    horizon: int = flag(50, "time steps to forecast (H)", type=positive_int, group=FORECASTING)
    samples: int = flag(0, "sampled forecasts per system (0: greedy only)", type=non_negative_int, group=FORECASTING)
    temperature: float = flag(0.7, "sampling temperature", type=finite_positive_float, group=FORECASTING)
    top_p: float = flag(1.0, "nucleus sampling: the smallest set of tokens holding this share of the probability, "
                        "in (0, 1]", type=probability, group=FORECASTING)
    forecast_batch: int = flag(16, "prompts per generate call", type=positive_int, group=FORECASTING)
    unconstrained: bool = flag(False, "let the model emit any token (default: only digits , . ;)", group=FORECASTING)
    run_to_limit: bool = flag(False, RUN_TO_LIMIT, group=FORECASTING)
    no_untrained: bool = flag(False, "with --adapter, skip the untrained model", group=FORECASTING)
    no_baselines: bool = flag(False, "skip persistence, linear AR and the ODE fit", group=FORECASTING)


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """train.py: LoRA on the training windows, evaluated on the validation systems as it goes.

    The defaults are a recipe that leaves the early dip (forecasts first get worse, then better
    than the untrained model's): rank 4 on q/v, lr 1e-3 with 20 warm-up steps and a cosine decay to
    1e-4 at step 600, 4 windows of 256 tokens a step."""

    script: ClassVar[str] = "train"

    out: str = _out("runs/train")
    rank: int = flag(4, "LoRA rank on q_proj and v_proj (0: no adapters)", type=non_negative_int, group=LORA)
    lora_alpha: float | None = flag(None, "LoRA alpha (none: = rank, scaling 1)", type=finite_positive_float,
                                    group=LORA)
    lora_dropout: float = flag(0.0, "dropout on the LoRA input, in [0, 1]", type=fraction, group=LORA)
    targets: tuple[str, ...] = flag(("q_proj", "v_proj"), "linear layers to wrap", nargs="+", group=LORA)
    train_lm_head_bias: bool = flag(False, "also train a bias on the output layer", group=LORA)
    lr: float = flag(1e-3, "AdamW peak learning rate (LoRA wants ~10x full fine-tuning's: at 1e-5 the validation CE "
                     "falls while the forecasts get worse)", type=finite_positive_float, group=OPTIMIZER)
    weight_decay: float = flag(0.0, "AdamW weight decay", type=non_negative_float, group=OPTIMIZER)
    warmup_steps: int = flag(20, "linear warm-up steps", type=non_negative_int, group=OPTIMIZER)
    schedule: str = flag("cosine", "after the warm-up: decay to --min-lr-ratio x lr at --max-steps (cosine, linear), "
                         "or constant", choices=SCHEDULES, group=OPTIMIZER)
    min_lr_ratio: float = flag(0.1, "the learning rate at the end of the decay, as a fraction of --lr (in [0, 1])",
                               type=fraction, group=OPTIMIZER)
    max_steps: int = flag(600, "optimizer steps; the decay ends here (the default: past the early dip, where "
                          "forecasts first get worse, then better than the untrained model's)", type=positive_int,
                          group=OPTIMIZER)
    stride: int | None = flag(None, "window stride in tokens (none: context/2)", type=positive_int, group=TRAINING)
    eval_every: int = flag(50, "evaluate (validation CE and forecasts) every N steps, and at step 0 (0: never)",
                           type=non_negative_int, group=SELECTION)
    eval_windows: int = flag(64, "windows in the fixed validation subset", type=positive_int, group=SELECTION)
    patience: int = flag(0, "stop after N evaluations without improvement (0: never; forecasts get worse before "
                         "they get better, so early stopping would end a run inside the dip)", type=non_negative_int,
                         group=SELECTION)
    checkpoint_every: int = flag(50, "write a resumable checkpoint every N steps", type=positive_int, group=TRAINING)
    charge_every: int = flag(1, "charge the FLOP ledger every N optimizer steps (1: a SIGKILL loses at most the step "
                             "in flight from the ledger; more: fewer ledger lines, up to N steps lost)",
                             type=positive_int, group=TRAINING)
    resume: bool = flag(False, "continue from --out/checkpoint exactly", group=TRAINING)
    max_systems: int | None = flag(None, "use only the first N training systems", type=positive_int, group=TRAINING)
    val_systems: int | None = flag(None, "use only the first N validation systems", type=positive_int, group=TRAINING)
    wandb: bool = flag(False, "log to Weights & Biases (WANDB_MODE=offline works)", group=TRAINING)
    compile: bool = flag(False, "torch.compile the model's forward for the training steps: the elementwise chains "
                         "fuse into fewer kernels, paid for by a one-time compilation at the first steps; fused "
                         "kernels round differently, so losses are close to the eager run's, not bit for bit equal",
                         group=TRAINING)
    select_by: str = flag("mae", "keep the adapter whose validation forecasts have the lowest filled-in MAE (mae), "
                          "the lowest relative score (relative), or the lowest validation-subset cross-entropy "
                          "(loss); step 0, the untrained model, is a candidate", choices=SELECT_BY, group=SELECTION)
    val_forecast_systems: int = flag(32, "validation systems forecast (greedy) at every evaluation (0: none; needs "
                                     "--select-by loss)", type=non_negative_int, group=SELECTION)
    eval_at_start: bool = flag(True, "evaluate the untrained model at step 0 too, so it is a candidate",
                               group=SELECTION)
    context_steps: int = flag(50, "time steps in a validation forecast's prompt", type=positive_int, group=SELECTION)
    horizon: int = flag(50, "time steps a validation forecast predicts", type=positive_int, group=SELECTION)
    run_to_limit: bool = flag(False, RUN_TO_LIMIT, group=SELECTION)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rank and not self.train_lm_head_bias:
            raise errors.UsageError("nothing to train: --rank 0 without --train-lm-head-bias")
        if self.select_by != "loss" and not self.val_forecast_systems:
            raise errors.UsageError(f"--select-by {self.select_by} needs --val-forecast-systems > 0 "
                                    f"(or --select-by loss)")
        if self.stride is not None and self.context_length == SERIES:
            raise errors.UsageError(f"--stride {self.stride}: a --context-length {SERIES} window holds a whole "
                                    f"series, so there is nothing to stride over (drop --stride)")
        if self.stride is not None and not 1 <= self.stride <= self.context_length:
            raise errors.UsageError(f"--stride {self.stride}: must be between 1 and --context-length "
                                    f"{self.context_length}, so no token is skipped")


# ---------------------------------------------------------------------------------------------
# Configs and command lines

def flag_name(f: Field) -> str:
    """The field's flag: ``context_length`` is ``--context-length``."""
    return "--" + f.name.replace("_", "-")


def is_switch(f: Field) -> bool:
    """A bool field: a switch (False ``--x``, True ``--x/--no-x``)."""
    return isinstance(f.default, bool)


def check_splits(splits: tuple[float, ...]) -> None:
    """--splits: three fractions summing to 1 (each one >= 0: check_fields), or errors.UsageError."""
    if len(splits) != 3 or abs(sum(splits) - 1) > 1e-6:
        raise errors.UsageError(f"argument --splits: {' '.join(f'{f:g}' for f in splits)}: must be three "
                                f"non-negative fractions summing to 1")


def check_fields(config: Any) -> None:
    """Every field's value as its flag allows it (its choices, its type's rule), so a config made
    directly (study.py's) is refused as a command line would be: errors.UsageError naming the flag."""
    for f in fields(config):
        m, v = f.metadata, getattr(config, f.name)
        if v is None or is_switch(f):
            continue
        for x in v if m["nargs"] else (v,):
            if m["choices"] is not None and x not in m["choices"]:
                raise errors.UsageError(f"argument {flag_name(f)}: invalid choice: {x!r} (choose from "
                                        f"{', '.join(map(repr, m['choices']))})")
            if m["type"] is not None:
                try:
                    m["type"](_text(x))
                except argparse.ArgumentTypeError as e:
                    raise errors.UsageError(f"argument {flag_name(f)}: {e}") from None


def to_argv(config: RunConfig) -> list[str]:
    """The command line that ``parse`` turns back into ``config``: every field that is not its default."""
    argv: list[str] = []
    for f in fields(config):
        v = getattr(config, f.name)
        if f.default is not MISSING and v == f.default:
            continue
        if is_switch(f):
            argv.append(flag_name(f) if v else "--no-" + flag_name(f)[2:])
        elif v is None:
            raise ValueError(f"{type(config).__name__}.{f.name}: None has no command line (its default is "
                             f"{f.default!r})")
        else:
            argv += [flag_name(f), *map(_text, v if isinstance(v, tuple) else (v,))]
    return argv


def _text(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)   # (repr: a float read back is the same float)

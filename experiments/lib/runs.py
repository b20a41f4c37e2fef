"""What every experiment script shares: the command-line vocabulary, the run folder, the run's data
(load, split by system, fit the encoding on train) and the model.

A run folder holds everything the run wrote: ``<script>_args.json`` (the exact command line),
splits.json and encoding.json (so a later script sees the same systems and the same scaling), and
the script's own results. A saved adapter folder holds its own copies, and data.json (the data
file's path and SHA-256), so it decodes its forecasts again wherever it is moved.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import flops
import lora
import qwen_min
from experiments.lib import cli, data, errors, files, llmtime, lotka_volterra
from experiments.lib.training import SCHEDULES
from qwen_min import Qwen2, Tokenizer

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Command line: argparse types that say what is allowed (a value outside is refused when parsed)


def _number(text: str, kind: type) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def _int_at_least(low: int, allowed: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``; ``allowed`` says so in the refusal."""
    def parse(text: str) -> int:
        v = _number(text, int)
        if v < low:
            raise argparse.ArgumentTypeError(f"{text}: must be {allowed}")
        return v
    return parse


positive_int = _int_at_least(1, "at least 1")
non_negative_int = _int_at_least(0, "0 or more")
at_least_two = _int_at_least(2, "at least 2 (a window of tokens: one to read, one to predict)")


def finite_float(text: str) -> float:
    """A finite number."""
    v = _number(text, float)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
    return v


def _float_where(ok: Callable[[float], bool], allowed: str) -> Callable[[str], float]:
    """An argparse type: a finite number for which ``ok`` holds; ``allowed`` says which in the refusal."""
    def parse(text: str) -> float:
        v = finite_float(text)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{text}: must be {allowed}")
        return v
    return parse


finite_positive_float = _float_where(lambda v: v > 0, "a finite number above 0")
non_negative_float = _float_where(lambda v: v >= 0, "a finite number, 0 or more")
probability = _float_where(lambda v: 0 < v <= 1, "above 0 and at most 1")          # (0, 1]
fraction = _float_where(lambda v: 0 <= v <= 1, "between 0 and 1")                 # [0, 1]
percentile = _float_where(lambda v: 0 < v <= 100, "above 0 and at most 100")      # (0, 100]


def check_splits(splits: tuple[float, ...] | list[float]) -> None:
    """--splits: three fractions, each 0 or more, summing to 1 (UsageError otherwise)."""
    if any(f < 0 for f in splits) or abs(sum(splits) - 1) > 1e-6:
        raise errors.UsageError(f"argument --splits: {' '.join(f'{f:g}' for f in splits)}: must be three "
                                f"non-negative fractions summing to 1")


class CheckedParser(cli.ArgumentParser):
    """The scripts' parser: what no single flag's type can check (--splits' sum) is checked once parsed."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        if getattr(parsed, "splits", None) is not None:
            check_splits(parsed.splits)
        return parsed


def script_parser(description: str | None = None) -> CheckedParser:
    """An experiment script's parser: one-line usage errors, defaults in --help, and --debug."""
    p = CheckedParser(description=description)
    cli.add_debug(p)
    return p


# ---------------------------------------------------------------------------------------------
# Command line: one vocabulary for every script


def add_common_args(p: argparse.ArgumentParser, *, out_default: str) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hub repo id or local checkpoint folder")
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) to pin")
    g.add_argument("--data", default=None,
                   help="HDF5 data file (trajectories (N,T,2), time (T,)); default: the generated data set")
    g.add_argument("--out", default=out_default,
                   help="run folder for every file this run writes")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed for splits, sampling and initialisation")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="base-model weight dtype; LoRA weights and optimizer stay fp32")
    g.add_argument("--context-length", type=at_least_two, default=256,
                   help="tokens per training/evaluation window (at least one time step of text)")
    g.add_argument("--batch-size", type=positive_int, default=4, help="sequences per step (global, over all ranks)")
    g.add_argument("--decimals", type=non_negative_int, default=2, help="LLMTIME decimals")
    g.add_argument("--percentile", type=percentile, default=90.0,
                   help="the training-value percentile (in (0, 100]) that LLMTIME scaling maps to 10")
    g.add_argument("--splits", type=non_negative_float, nargs=3, default=(0.7, 0.15, 0.15),
                   metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of systems in train/validation/test (summing to 1)")
    b = p.add_argument_group("FLOP budget")
    b.add_argument("--budget", type=finite_positive_float, default=flops.DEFAULT_BUDGET,
                   help="total FLOP budget of the ledger")
    b.add_argument("--ledger", default=flops.DEFAULT_LEDGER, help="FLOP ledger file shared by all experiments")
    b.add_argument("--name", default=None, help="experiment name in the ledger (default: the run folder's name)")
    g.add_argument("--overwrite", action="store_true",
                   help="write into an --out that holds a finished or interrupted run (refused without it)")
    b.add_argument("--reservation", default=None,
                   help="charge an open ledger reservation made by another process (study.py passes its own) "
                        "instead of reserving anew")


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None,
                   help="a saved LoRA adapter folder (PEFT layout); none: the untrained model")
    p.add_argument("--split", choices=["train", "val", "test"], default="test", help="which systems to use")
    p.add_argument("--max-systems", type=positive_int, default=None, help="use only the first N systems of the split")
    p.add_argument("--allow-other-data", action="store_true",
                   help="score an adapter on a data file other than the one it was trained on (its SHA-256 "
                        "differs); refused without this flag, recorded as a warning in the results with it")
    p.add_argument("--allow-other-base", action="store_true",
                   help="load an adapter into a base model other than the one it was trained on (its config or "
                        "checkpoint SHA-256, recorded in the adapter's base_model.json, differs); refused without "
                        "this flag, recorded as a warning in the results with it")


def add_run_to_limit(g: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    g.add_argument("--run-to-limit", action="store_true",
                   help="generate every forecast to its token limit instead of stopping once every row has its "
                        "horizon: about a fifth more decoding, the same forecasts, and (decoding constrained, the "
                        "default) FLOPs known before it runs, so the plan equals the ledger (study.py uses it)")


# What picks the best adapter: the validation forecasts' filled-in MAE (the headline metric), their
# relative score, or the validation-subset cross-entropy.
SELECT_BY = ("mae", "relative", "loss")


def train_parser(description: str | None = None) -> argparse.ArgumentParser:
    """train.py's command line (study.py prices the runs it will start with it)."""
    p = script_parser(description)
    add_common_args(p, out_default="runs/train")
    t = p.add_argument_group("training")
    t.add_argument("--rank", type=non_negative_int, default=4, help="LoRA rank on q_proj and v_proj (0: no adapters)")
    t.add_argument("--lora-alpha", type=finite_positive_float, default=None,
                   help="LoRA alpha (none: = rank, scaling 1)")
    t.add_argument("--lora-dropout", type=fraction, default=0.0, help="dropout on the LoRA input, in [0, 1]")
    t.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="linear layers to wrap")
    t.add_argument("--train-lm-head-bias", action="store_true", help="also train a bias on the output layer")
    t.add_argument("--lr", type=finite_positive_float, default=1e-3,
                   help="AdamW peak learning rate (LoRA wants ~10x full fine-tuning's: at "
                        "1e-5 the validation CE falls while the forecasts get worse)")
    t.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay")
    t.add_argument("--warmup-steps", type=non_negative_int, default=20, help="linear warm-up steps")
    t.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="after the warm-up: decay to --min-lr-ratio x lr at --max-steps (cosine, linear), or "
                        "constant")
    t.add_argument("--min-lr-ratio", type=fraction, default=0.1,
                   help="the learning rate at the end of the decay, as a fraction of --lr (in [0, 1])")
    t.add_argument("--max-steps", type=positive_int, default=600,
                   help="optimizer steps; the decay ends here (the default: past the early dip, where "
                        "forecasts first get worse, then better than the untrained model's)")
    t.add_argument("--stride", type=positive_int, default=None, help="window stride in tokens (none: context/2)")
    t.add_argument("--eval-every", type=non_negative_int, default=50,
                   help="evaluate (validation CE and forecasts) every N steps, and at step 0 (0: never)")
    t.add_argument("--eval-windows", type=positive_int, default=64, help="windows in the fixed validation subset")
    t.add_argument("--patience", type=non_negative_int, default=0,
                   help="stop after N evaluations without improvement (0: never; forecasts get worse "
                        "before they get better, so early stopping would end a run inside the dip)")
    t.add_argument("--checkpoint-every", type=positive_int, default=50,
                   help="write a resumable checkpoint every N steps")
    v = p.add_argument_group("model selection (each evaluation: step 0, then every --eval-every steps)")
    v.add_argument("--select-by", choices=SELECT_BY, default="mae",
                   help="keep the adapter whose validation forecasts have the lowest filled-in MAE (mae), the "
                        "lowest relative score (relative), or the lowest validation-subset cross-entropy (loss); "
                        "step 0, the untrained model, is a candidate")
    v.add_argument("--val-forecast-systems", type=non_negative_int, default=32,
                   help="validation systems forecast (greedy) at every evaluation (0: none; needs --select-by loss)")
    v.add_argument("--eval-at-start", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the untrained model at step 0 too, so it is a candidate")
    v.add_argument("--context-steps", type=positive_int, default=50,
                   help="time steps in a validation forecast's prompt")
    v.add_argument("--horizon", type=positive_int, default=50, help="time steps a validation forecast predicts")
    add_run_to_limit(v)
    t.add_argument("--charge-every", type=positive_int, default=1,
                   help="charge the FLOP ledger every N optimizer steps (1: a SIGKILL loses at most the "
                        "step in flight from the ledger; more: fewer ledger lines, up to N steps lost)")
    t.add_argument("--resume", action="store_true", help="continue from --out/checkpoint exactly")
    t.add_argument("--max-systems", type=positive_int, default=None, help="use only the first N training systems")
    t.add_argument("--val-systems", type=positive_int, default=None, help="use only the first N validation systems")
    t.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward for the training steps: the elementwise chains "
                        "fuse into fewer kernels, paid for by a one-time compilation at the first steps; fused "
                        "kernels round differently, so losses are close to the eager run's, not bit for bit "
                        "equal")
    return p


def forecast_parser(description: str | None = None) -> argparse.ArgumentParser:
    """forecast.py's command line (study.py prices the forecasts it will start with it)."""
    p = script_parser(description)
    add_common_args(p, out_default="runs/forecast")
    add_adapter_args(p)
    f = p.add_argument_group("forecasting")
    f.add_argument("--context-steps", type=positive_int, default=50, help="time steps in the prompt (C)")
    f.add_argument("--horizon", type=positive_int, default=50, help="time steps to forecast (H)")
    f.add_argument("--samples", type=non_negative_int, default=0, help="sampled forecasts per system (0: greedy only)")
    f.add_argument("--temperature", type=finite_positive_float, default=0.7, help="sampling temperature")
    f.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling: the smallest set of tokens "
                   "holding this share of the probability, in (0, 1]")
    f.add_argument("--forecast-batch", type=positive_int, default=16, help="prompts per generate call")
    f.add_argument("--unconstrained", action="store_true",
                   help="let the model emit any token (default: only digits , . ;)")
    add_run_to_limit(f)
    f.add_argument("--no-untrained", action="store_true", help="with --adapter, skip the untrained model")
    f.add_argument("--no-baselines", action="store_true", help="skip persistence, linear AR and the ODE fit")
    return p


# ---------------------------------------------------------------------------------------------
# The run folder, seeds and devices


# What a resumed training run may not change: each alters the run (its data, its model, its schedule
# or what picks the kept adapter), so the checkpoint would continue another run than the one asked for.
RESUME_FIXED = ("model", "revision", "data", "seed", "splits", "decimals", "percentile", "context_length", "stride",
                "batch_size", "rank", "lora_alpha", "lora_dropout", "targets", "train_lm_head_bias", "lr",
                "weight_decay", "schedule", "warmup_steps", "min_lr_ratio", "max_steps", "select_by", "eval_every",
                "eval_windows", "val_forecast_systems", "context_steps", "horizon", "max_systems", "val_systems",
                "eval_at_start", "run_to_limit")

_LOCKS: dict[str, int] = {}   # run folders this process holds (resolved path -> the open .lock file)


def lock_run(out: Path) -> None:
    """Hold ``out``/.lock (fcntl.flock, this pid written in it) while this process lives: a second
    process on the same folder is refused (RunFolderError naming the holder's pid)."""
    import fcntl

    key = str(out.resolve())
    if key in _LOCKS:
        return
    # (only the lock file is created before the folder is judged; the pid is written once it is taken)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise errors.RunFolderError(f"--out {out} is in use by another run (pid {holder}, holding {out / '.lock'}); "
                                    f"wait for it to end, or choose another --out") from None
    _LOCKS[key] = fd


def _write_pid(out: Path) -> None:
    fd = _LOCKS[str(out.resolve())]
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def claim_run(out: Path) -> None:
    """Lock ``out`` (as ``lock_run``) and write this process's pid in its lock file."""
    lock_run(out)
    _write_pid(out)


def unlock_run(out: Path) -> None:
    """Let go of ``out``'s lock (closing the file releases the flock)."""
    fd = _LOCKS.pop(str(Path(out).resolve()), None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def holding_run(out: Path) -> Iterator[Path]:
    """``out`` locked (as ``claim_run``: refused while another process holds it) for the block only,
    then let go of, unless this process held it before (report.py, which writes there and is done)."""
    held = str(out.resolve()) in _LOCKS
    claim_run(out)
    try:
        yield out
    finally:
        if not held:
            unlock_run(out)


def check_run_folder(args: argparse.Namespace, script: str) -> None:
    """Refuse, before anything is written, an --out holding a finished or interrupted run of ``script``
    (its <script>_args.json) unless --overwrite, or (train.py) --resume with the same run's arguments."""
    out = Path(args.out)
    previous = out / f"{script}_args.json"
    resume = getattr(args, "resume", False)
    if resume:
        if not previous.is_file() or not any((out / c / "state.json").is_file()
                                              for c in ("checkpoint", "checkpoint.old")):
            raise errors.NoCheckpointError(f"--resume: no checkpoint in {out / 'checkpoint'} to continue from")
        try:
            before = json.loads(previous.read_text())
        except (OSError, ValueError) as e:
            raise errors.RunFolderError(f"{previous}: not readable JSON ({e})") from None
        now = json.loads(json.dumps(vars(args)))   # (tuples as the lists they were saved as)
        for key in RESUME_FIXED:
            if key in before and before.get(key) != now.get(key):
                raise errors.UsageError(f"--resume: --{key.replace('_', '-')} was {before[key]!r} in {previous}, "
                                        f"now {now.get(key)!r}: a resumed run continues the same run (pass the "
                                        f"same value, or start a new --out)")
    elif previous.is_file() and not getattr(args, "overwrite", False) and holds_work(out, script):
        also = " or --resume to continue it" if script == "train" else ""
        raise errors.RunFolderError(f"--out {out} already holds a {script} run ({previous.name}): pass --overwrite "
                                    f"to replace it{also}, or choose another --out")


# What each script writes in a run folder beyond its setup (<script>_args.json, splits.json and
# encoding.json, written before any work, so a run refused then leaves nothing else): its work.
WORK_FILES = {
    "train": ("metrics.jsonl", "metrics.csv", "summary.json", "checkpoint", "checkpoint.old", "checkpoint.tmp",
              "adapter"),
    "evaluate": ("eval_metrics.json",),
    "forecast": ("forecast_metrics.json", "forecasts.h5", "examples.png", "error_vs_horizon.png"),
}


def holds_work(out: Path, script: str) -> bool:
    """Whether ``out`` holds anything ``script`` produced beyond its setup (a run refused before any
    work holds only that: running it again, fixed, needs no --overwrite)."""
    return any((out / name).exists() for name in WORK_FILES.get(script, ()))


def clear_run(out: Path, script: str) -> None:
    """Remove what an earlier run of ``script`` wrote in ``out`` (its own files only, nothing else), so
    none of it is read again: its splits and encoding would otherwise be reused, its checkpoint resumed.
    The splits and encoding stay if another script's run shares the folder."""
    others = [f"{s}_args.json" for s in WORK_FILES if s != script]
    shared = () if any((out / f).exists() for f in others) else ("splits.json", "encoding.json")
    for name in (f"{script}_args.json", *shared, *WORK_FILES.get(script, ())):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def start_run(args: argparse.Namespace, script: str) -> Path:
    """Take the run folder: refuse it (nothing written) if another process holds it, if it holds a run
    and neither --overwrite nor a matching --resume was given; then lock it and save the exact command
    line and arguments in it."""
    out = Path(args.out)
    held = str(out.resolve()) in _LOCKS
    lock_run(out)
    try:
        check_run_folder(args, script)
    except errors.ExperimentError:
        if not held:
            unlock_run(out)
        raise
    if not getattr(args, "resume", False) and (out / f"{script}_args.json").is_file():
        clear_run(out, script)   # (--overwrite, or an earlier run that was refused before any work)
    _write_pid(out)
    files.write_json(out / f"{script}_args.json", {"argv": sys.argv, **vars(args)})
    if getattr(args, "name", None) is None:
        args.name = out.name
    return out


def reserve(args: argparse.Namespace, planned: float, *, kind: str, config: dict[str, Any]) -> flops.Reservation:
    """Hold the run's planned FLOPs in the ledger, or refuse it (flops.LedgerError) before any model work.

    With --reservation the FLOPs were reserved by the process that started this run (a study, for all
    its runs at once): this run charges that reservation under its own name and leaves it open."""
    ledger = flops.Ledger(args.ledger, budget=args.budget)
    try:
        if args.reservation:
            reservation = ledger.attach(args.reservation)
            reservation.name, reservation.kind = args.name, kind
            return reservation
        return ledger.reserve(planned, name=args.name, kind=kind, config=config)
    except (flops.BudgetExceeded, flops.LedgerDamaged) as e:
        raise type(e)(f"refused before any model work: {e}") from None
    except (KeyError, ValueError) as e:  # no such reservation, or it is closed
        raise errors.UsageError(f"--reservation {args.reservation}: {cli.one_line(e)}") from None


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# The run's data: load, split by system, fit the encoding on the training systems only


@dataclass
class AdapterInfo:
    """A saved adapter folder and its data.json: where its splits, encoding and data file are recorded."""

    folder: Path               # the adapter folder (it holds splits.json and encoding.json too)
    data: dict                 # its data.json {"path", "sha256", "systems"}


@dataclass
class RunData:
    trajectories: np.ndarray          # (N, T, 2) in original units
    time: np.ndarray                  # (T,)
    splits: dict[str, np.ndarray]     # "train"/"val"/"test" -> system indices
    encoding: llmtime.EncodingConfig  # alpha, decimals, percentile
    data_path: str
    sha256: str = ""                  # of the data file
    warnings: list[str] = field(default_factory=list)  # for the run's results file (also printed)
    adapter_info: AdapterInfo | None = None            # with --adapter: where its provenance came from

    def systems(self, split: str, max_systems: int | None = None) -> np.ndarray:
        idx = self.splits[split]
        return idx if max_systems is None else idx[:max_systems]

    def texts(self, split: str, max_systems: int | None = None) -> list[str]:
        return [llmtime.encode(self.trajectories[i], alpha=self.encoding.alpha, decimals=self.encoding.decimals)
                for i in self.systems(split, max_systems)]


def prepare_data(args: argparse.Namespace, out: Path | None = None, *, reuse: Path | None = None) -> RunData:
    """Load (or generate) the data, split it by system, fit alpha on train; save splits and encoding in ``out``.

    When ``reuse`` (default: ``out``) already holds splits.json and encoding.json (a resumed run)
    they are used again, so the same systems and the same scaling are used again.

    With ``args.adapter`` (evaluate.py, forecast.py) the adapter folder itself decides, wherever it
    was moved: its splits.json and encoding.json are used, --data defaults to the file in its
    data.json, and a file whose SHA-256 differs from the recorded one is refused (DataError naming
    both files and checksums) unless ``args.allow_other_data``, which turns the refusal into a
    warning in ``.warnings``. Scoring the adapter's own training split (``args.split`` "train") is
    refused.
    """
    warnings: list[str] = []
    info = adapter_info(args.adapter) if getattr(args, "adapter", None) else None
    if info:
        if getattr(args, "split", None) == "train":
            raise errors.UsageError(f"--split train: adapter {info.folder} was trained on these systems; score val or "
                             f"test")
        reuse = info.folder
    path = args.data or (info.data["path"] if info else None)
    if path is None:
        path = str(lotka_volterra.default_dataset())
    elif not Path(path).is_file():
        where = "" if args.data else f" (recorded in {info.folder / 'data.json'}; pass --data)"
        raise errors.DataError(f"data file {path} not found{where}")
    digest = file_sha256(path)
    if info and digest != info.data["sha256"]:
        msg = (f"data file {path} (sha256 {digest}) is not the one adapter {info.folder} was trained on: "
               f"{info.data['path']} (sha256 {info.data['sha256']})")
        if not getattr(args, "allow_other_data", False):
            raise errors.DataError(f"{msg}; pass --allow-other-data to score it anyway")
        _warn(warnings, msg)
    trajectories, time = lotka_volterra.load_h5(path)
    reuse = reuse or out
    if reuse and (reuse / "splits.json").is_file():
        splits = _read(data.load_splits, reuse / "splits.json", n_systems=len(trajectories))
    else:
        splits = data.split_systems(len(trajectories), fractions=tuple(args.splits), seed=args.seed)
    if reuse and (reuse / "encoding.json").is_file():
        encoding = _read(llmtime.EncodingConfig.load, reuse / "encoding.json")
    else:
        encoding = llmtime.EncodingConfig(
            alpha=llmtime.fit_alpha(trajectories[splits["train"]], percentile=args.percentile),
            decimals=args.decimals, percentile=args.percentile)
    if out:
        data.save_splits(out / "splits.json", splits)
        encoding.save(out / "encoding.json")
    return RunData(trajectories, time, splits, encoding, path, digest, warnings, info)


def _read(load: Any, path: Path, **kwargs: Any) -> Any:
    """A run's or adapter's splits.json / encoding.json, read by ``load``; damaged: a DataError naming it."""
    try:
        return load(path, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise errors.DataError(f"{path}: damaged or not this data's ({cli.one_line(e)})") from None


def _warn(warnings: list[str], msg: str) -> None:
    print(f"warning: {msg}", flush=True)
    warnings.append(msg)


ADAPTER_FILES = ("encoding.json", "splits.json", "data.json")


def save_adapter_files(folder: Path, run_data: RunData) -> None:
    """Beside a saved adapter's weights, what decodes its forecasts again: encoding.json, splits.json
    and data.json (the data file's absolute path, its SHA-256 and its number of systems)."""
    run_data.encoding.save(folder / "encoding.json")
    data.save_splits(folder / "splits.json", run_data.splits)
    files.write_json(folder / "data.json", {"path": str(Path(run_data.data_path).resolve()),
                                            "sha256": run_data.sha256, "systems": len(run_data.trajectories)})


def adapter_info(adapter: str | os.PathLike) -> AdapterInfo:
    """Read an adapter folder's provenance (see ``prepare_data``), refusing a folder that lacks any of it."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise errors.AdapterFolderError(f"--adapter {folder}: not an adapter folder (no adapter_config.json)")
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise errors.AdapterFolderError(f"--adapter {folder}: has no {', '.join(missing)} (train.py saves them beside "
                                        f"the weights); without them its forecasts cannot be decoded as it was trained")
    try:
        recorded = json.loads((folder / "data.json").read_text())
    except (OSError, ValueError) as e:
        raise errors.AdapterFolderError(f"{folder / 'data.json'}: not readable JSON ({e})") from None
    if not isinstance(recorded, dict):
        raise errors.AdapterFolderError(f"{folder / 'data.json'}: expected a JSON object")
    for key, kind in (("path", str), ("sha256", str), ("systems", int)):
        if not isinstance(recorded.get(key), kind):
            raise errors.AdapterFolderError(f"{folder / 'data.json'}: field {key!r} must be a {kind.__name__}, "
                             f"found {recorded.get(key)!r}")
    return AdapterInfo(folder, recorded)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[Qwen2, Tokenizer]:
    model = qwen_min.from_pretrained(args.model, revision=args.revision, dtype=DTYPES[args.dtype], device=device)
    return model, qwen_min.load_tokenizer(args.model, revision=args.revision)


def load_adapter(model: Qwen2, args: argparse.Namespace, run_data: RunData | None = None) -> None:
    """lora.load_adapter with --allow-other-base; its warning goes to ``run_data.warnings`` (None: the
    meta-device shape planned first, whose notes the real load records again). A refusal is lora.AdapterError,
    prefixed with the flag."""
    notes: list[str] = []
    try:
        lora.load_adapter(model, args.adapter, allow_other_base=getattr(args, "allow_other_base", False), warn=notes)
    except lora.AdapterError as e:
        raise lora.AdapterError(f"--adapter: {e}") from None
    for note in notes if run_data else []:
        _warn(run_data.warnings, note)

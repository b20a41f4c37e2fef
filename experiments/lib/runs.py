"""What every experiment script shares: the command-line vocabulary, the run folder, the run's data
(load, split by system, fit the encoding on train) and the model.

A run folder holds everything the run wrote: ``<script>_args.json`` (the exact command line),
splits.json and encoding.json (so a later script sees the same systems and the same scaling), and
the script's own results. A saved adapter folder holds its own copies, and data.json (the data
file's path and SHA-256), so it decodes its forecasts again wherever it is moved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import flops
import lora
import qwen_min
from experiments.lib import data, files, llmtime, lotka_volterra
from qwen_min import Qwen2, Tokenizer

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Command line: one vocabulary for every script


def add_common_args(p: argparse.ArgumentParser, *, out_default: str) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hub repo id or local checkpoint folder (default: %(default)s)")
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) to pin")
    g.add_argument("--data", default=None,
                   help="HDF5 data file (trajectories (N,T,2), time (T,)); default: the generated data set")
    g.add_argument("--out", default=out_default,
                   help="run folder for every file this run writes (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed for splits, sampling and initialisation")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="base-model weight dtype; LoRA weights and optimizer stay fp32 (default: %(default)s)")
    g.add_argument("--context-length", type=int, default=256,
                   help="tokens per training/evaluation window (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per step (global, over all ranks)")
    g.add_argument("--decimals", type=int, default=2, help="LLMTIME decimals")
    g.add_argument("--percentile", type=float, default=90.0,
                   help="the training-value percentile that LLMTIME scaling maps to 10")
    g.add_argument("--splits", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of systems in train/validation/test")
    b = p.add_argument_group("FLOP budget")
    b.add_argument("--budget", type=float, default=flops.DEFAULT_BUDGET,
                   help="total FLOP budget of the ledger (default: %(default)g)")
    b.add_argument("--ledger", default=flops.DEFAULT_LEDGER, help="FLOP ledger file shared by all experiments")
    b.add_argument("--name", default=None, help="experiment name in the ledger (default: the run folder's name)")
    b.add_argument("--reservation", default=None,
                   help="charge an open ledger reservation made by another process (study.py passes its own) "
                        "instead of reserving anew")


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None,
                   help="a saved LoRA adapter folder (PEFT layout); none: the untrained model")
    p.add_argument("--split", choices=["train", "val", "test"], default="test", help="which systems to use")
    p.add_argument("--max-systems", type=int, default=None, help="use only the first N systems of the split")
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
SCHEDULES = ("cosine", "linear", "constant")  # the learning rate after the warm-up (training.lr_at)


def train_parser(description: str | None = None) -> argparse.ArgumentParser:
    """train.py's command line (study.py prices the runs it will start with it)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out_default="runs/train")
    t = p.add_argument_group("training")
    t.add_argument("--rank", type=int, default=4, help="LoRA rank on q_proj and v_proj (0: no adapters)")
    t.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: = rank, scaling 1)")
    t.add_argument("--lora-dropout", type=float, default=0.0)
    t.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="linear layers to wrap")
    t.add_argument("--train-lm-head-bias", action="store_true", help="also train a bias on the output layer")
    t.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW peak learning rate (default: %(default)g; LoRA wants ~10x full fine-tuning's: at "
                        "1e-5 the validation CE falls while the forecasts get worse)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-steps", type=int, default=20, help="linear warm-up steps (default: %(default)s)")
    t.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="after the warm-up: decay to --min-lr-ratio x lr at --max-steps (cosine, linear), or "
                        "constant (default: %(default)s)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="the learning rate at the end of the decay, as a fraction of --lr (default: %(default)s)")
    t.add_argument("--max-steps", type=int, default=600,
                   help="optimizer steps; the decay ends here (default: %(default)s: past the early dip, where "
                        "forecasts first get worse, then better than the untrained model's)")
    t.add_argument("--stride", type=int, default=None, help="window stride in tokens (default: context/2)")
    t.add_argument("--eval-every", type=int, default=50,
                   help="evaluate (validation CE and forecasts) every N steps, and at step 0 (0: never)")
    t.add_argument("--eval-windows", type=int, default=64, help="windows in the fixed validation subset")
    t.add_argument("--patience", type=int, default=0,
                   help="stop after N evaluations without improvement (default 0: never; forecasts get worse "
                        "before they get better, so early stopping would end a run inside the dip)")
    t.add_argument("--checkpoint-every", type=int, default=50, help="write a resumable checkpoint every N steps")
    v = p.add_argument_group("model selection (each evaluation: step 0, then every --eval-every steps)")
    v.add_argument("--select-by", choices=SELECT_BY, default="mae",
                   help="keep the adapter whose validation forecasts have the lowest filled-in MAE (mae), the "
                        "lowest relative score (relative), or the lowest validation-subset cross-entropy (loss); "
                        "step 0, the untrained model, is a candidate (default: %(default)s)")
    v.add_argument("--val-forecast-systems", type=int, default=32,
                   help="validation systems forecast (greedy) at every evaluation (0: none; needs --select-by loss)")
    v.add_argument("--eval-at-start", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the untrained model at step 0 too, so it is a candidate (default: yes)")
    v.add_argument("--context-steps", type=int, default=50, help="time steps in a validation forecast's prompt")
    v.add_argument("--horizon", type=int, default=50, help="time steps a validation forecast predicts")
    add_run_to_limit(v)
    t.add_argument("--charge-every", type=int, default=1,
                   help="charge the FLOP ledger every N optimizer steps (default 1: a SIGKILL loses at most the "
                        "step in flight from the ledger; more: fewer ledger lines, up to N steps lost)")
    t.add_argument("--resume", action="store_true", help="continue from --out/checkpoint exactly")
    t.add_argument("--max-systems", type=int, default=None, help="use only the first N training systems")
    t.add_argument("--val-systems", type=int, default=None, help="use only the first N validation systems")
    t.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward for the training steps: the elementwise chains "
                        "fuse into fewer kernels, paid for by a one-time compilation at the first steps; fused "
                        "kernels round differently, so losses are close to the eager run's, not bit for bit "
                        "equal")
    return p


def forecast_parser(description: str | None = None) -> argparse.ArgumentParser:
    """forecast.py's command line (study.py prices the forecasts it will start with it)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out_default="runs/forecast")
    add_adapter_args(p)
    f = p.add_argument_group("forecasting")
    f.add_argument("--context-steps", type=int, default=50, help="time steps in the prompt (C)")
    f.add_argument("--horizon", type=int, default=50, help="time steps to forecast (H)")
    f.add_argument("--samples", type=int, default=0, help="sampled forecasts per system (0: greedy only)")
    f.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    f.add_argument("--top-p", type=float, default=1.0)
    f.add_argument("--forecast-batch", type=int, default=16, help="prompts per generate call")
    f.add_argument("--unconstrained", action="store_true",
                   help="let the model emit any token (default: only digits , . ;)")
    add_run_to_limit(f)
    f.add_argument("--no-untrained", action="store_true", help="with --adapter, skip the untrained model")
    f.add_argument("--no-baselines", action="store_true")
    return p


# ---------------------------------------------------------------------------------------------
# The run folder, seeds and devices


def start_run(args: argparse.Namespace, script: str) -> Path:
    """Create the run folder and save the exact command line and arguments in it."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(out / f"{script}_args.json", {"argv": sys.argv, **vars(args)})
    if getattr(args, "name", None) is None:
        args.name = out.name
    return out


def reserve(args: argparse.Namespace, planned: float, *, kind: str, config: dict[str, Any]) -> flops.Reservation:
    """Hold the run's planned FLOPs in the ledger, or refuse it (SystemExit) before any model work.

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
        raise SystemExit(f"refused before any model work: {e}") from None
    except (KeyError, ValueError) as e:  # no such reservation, or it is closed
        raise SystemExit(f"--reservation {args.reservation}: {e}") from None


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
    data.json, and a file whose SHA-256 differs from the recorded one is refused (SystemExit naming
    both files and checksums) unless ``args.allow_other_data``, which turns the refusal into a
    warning in ``.warnings``. Scoring the adapter's own training split (``args.split`` "train") is
    refused.
    """
    warnings: list[str] = []
    info = adapter_info(args.adapter) if getattr(args, "adapter", None) else None
    if info:
        if getattr(args, "split", None) == "train":
            raise SystemExit(f"--split train: adapter {info.folder} was trained on these systems; score val or "
                             f"test")
        reuse = info.folder
    path = args.data or (info.data["path"] if info else None)
    if path is None:
        path = str(lotka_volterra.default_dataset())
    elif not Path(path).is_file():
        where = "" if args.data else f" (recorded in {info.folder / 'data.json'}; pass --data)"
        raise SystemExit(f"data file {path} not found{where}")
    digest = file_sha256(path)
    if info and digest != info.data["sha256"]:
        msg = (f"data file {path} (sha256 {digest}) is not the one adapter {info.folder} was trained on: "
               f"{info.data['path']} (sha256 {info.data['sha256']})")
        if not getattr(args, "allow_other_data", False):
            raise SystemExit(f"{msg}; pass --allow-other-data to score it anyway")
        _warn(warnings, msg)
    trajectories, time = lotka_volterra.load_h5(path)
    reuse = reuse or out
    if reuse and (reuse / "splits.json").is_file():
        splits = data.load_splits(reuse / "splits.json", n_systems=len(trajectories))
    else:
        splits = data.split_systems(len(trajectories), fractions=tuple(args.splits), seed=args.seed)
    if reuse and (reuse / "encoding.json").is_file():
        encoding = llmtime.EncodingConfig.load(reuse / "encoding.json")
    else:
        encoding = llmtime.EncodingConfig(
            alpha=llmtime.fit_alpha(trajectories[splits["train"]], percentile=args.percentile),
            decimals=args.decimals, percentile=args.percentile)
    if out:
        data.save_splits(out / "splits.json", splits)
        encoding.save(out / "encoding.json")
    return RunData(trajectories, time, splits, encoding, path, digest, warnings, info)


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
        raise SystemExit(f"--adapter {folder}: not an adapter folder (no adapter_config.json)")
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise SystemExit(f"--adapter {folder}: has no {', '.join(missing)} (train.py saves them beside the weights); "
                         f"without them its forecasts cannot be decoded as it was trained")
    recorded = json.loads((folder / "data.json").read_text())
    for key, kind in (("path", str), ("sha256", str), ("systems", int)):
        if not isinstance(recorded.get(key), kind):
            raise SystemExit(f"{folder / 'data.json'}: field {key!r} must be a {kind.__name__}, "
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
    meta-device shape planned first, whose notes the real load records again). A refusal is a SystemExit."""
    notes: list[str] = []
    try:
        lora.load_adapter(model, args.adapter, allow_other_base=getattr(args, "allow_other_base", False), warn=notes)
    except lora.AdapterError as e:
        raise SystemExit(f"--adapter: {e}") from None
    for note in notes if run_data else []:
        _warn(run_data.warnings, note)

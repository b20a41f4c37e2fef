"""What every experiment script shares: the command-line vocabulary, the run folder, the run's data
(load, split by system, fit the encoding on train) and the model.

A run folder holds everything the run wrote: ``<script>_args.json`` (the exact command line),
splits.json and encoding.json (so a later script sees the same systems and the same scaling), and
the script's own results.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import qwen_min
from experiments.lib import data, files, llmtime, lotka_volterra
from qwen_min import Qwen2, Tokenizer

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
DEFAULT_LEDGER = "runs/ledger.jsonl"
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
    g.add_argument("--context-length", type=int, default=512, help="tokens per training/evaluation window")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per step (global, over all ranks)")
    g.add_argument("--decimals", type=int, default=2, help="LLMTIME decimals")
    g.add_argument("--percentile", type=float, default=90.0,
                   help="the training-value percentile that LLMTIME scaling maps to 10")
    g.add_argument("--splits", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of systems in train/validation/test")
    b = p.add_argument_group("FLOP budget")
    b.add_argument("--budget", type=float, default=1e17, help="total FLOP budget of the ledger (default: %(default)g)")
    b.add_argument("--ledger", default=DEFAULT_LEDGER, help="FLOP ledger file shared by all experiments")
    b.add_argument("--name", default=None, help="experiment name in the ledger (default: the run folder's name)")


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None,
                   help="a saved LoRA adapter folder (PEFT layout); none: the untrained model")
    p.add_argument("--split", choices=["train", "val", "test"], default="test", help="which systems to use")
    p.add_argument("--max-systems", type=int, default=None, help="use only the first N systems of the split")


def train_parser(description: str | None = None) -> argparse.ArgumentParser:
    """train.py's command line (also what sweep.py passes on to every run it starts)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out_default="runs/train")
    t = p.add_argument_group("training")
    t.add_argument("--rank", type=int, default=4, help="LoRA rank on q_proj and v_proj (0: no adapters)")
    t.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: = rank, scaling 1)")
    t.add_argument("--lora-dropout", type=float, default=0.0)
    t.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="linear layers to wrap")
    t.add_argument("--train-lm-head-bias", action="store_true", help="also train a bias on the output layer")
    t.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps, then constant")
    t.add_argument("--max-steps", type=int, default=10_000, help="optimizer steps at most")
    t.add_argument("--stride", type=int, default=None, help="window stride in tokens (default: context/2)")
    t.add_argument("--eval-every", type=int, default=100, help="score the validation subset every N steps")
    t.add_argument("--eval-windows", type=int, default=64, help="windows in the fixed validation subset")
    t.add_argument("--patience", type=int, default=10, help="stop after N evaluations without improvement (0: never)")
    t.add_argument("--checkpoint-every", type=int, default=100, help="write a resumable checkpoint every N steps")
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
class RunData:
    trajectories: np.ndarray          # (N, T, 2) in original units
    time: np.ndarray                  # (T,)
    splits: dict[str, np.ndarray]     # "train"/"val"/"test" -> system indices
    encoding: llmtime.EncodingConfig  # alpha, decimals, percentile
    data_path: str

    def systems(self, split: str, max_systems: int | None = None) -> np.ndarray:
        idx = self.splits[split]
        return idx if max_systems is None else idx[:max_systems]

    def texts(self, split: str, max_systems: int | None = None) -> list[str]:
        return [llmtime.encode(self.trajectories[i], alpha=self.encoding.alpha, decimals=self.encoding.decimals)
                for i in self.systems(split, max_systems)]


def prepare_data(args: argparse.Namespace, out: Path | None = None, *, reuse: Path | None = None) -> RunData:
    """Load (or generate) the data, split it by system, fit alpha on train; save splits and encoding in ``out``.

    When ``reuse`` (default: ``out``) already holds splits.json and encoding.json (a resumed run,
    or the folder of the trained run whose adapter is evaluated) they are used again, so the same
    systems and the same scaling are used again.
    """
    path = args.data or str(lotka_volterra.default_dataset())
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
    return RunData(trajectories, time, splits, encoding, path)


def adapter_run_dir(adapter: str | None) -> Path | None:
    """The training run folder an adapter was saved in (it holds splits.json and encoding.json)."""
    if adapter and (Path(adapter).parent / "splits.json").is_file():
        return Path(adapter).parent
    return None


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[Qwen2, Tokenizer]:
    model = qwen_min.from_pretrained(args.model, revision=args.revision, dtype=DTYPES[args.dtype], device=device)
    return model, qwen_min.load_tokenizer(args.model, revision=args.revision)

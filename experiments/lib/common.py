"""What every experiment script shares: the command-line vocabulary, the run folder, the data
preparation (load, split, fit the encoding), the model, and the FLOP plan checked against the ledger.

The scripts themselves (train.py, evaluate.py, forecast.py, ...) stay plain top-to-bottom loops.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qwen_min
from experiments.lib import data as data_lib
from experiments.lib import llmtime, lotka_volterra
from qwen_min import Qwen2, QwenConfig, Tokenizer

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


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file, then rename): a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def start_run(args: argparse.Namespace, script: str) -> Path:
    """Create the run folder and save the exact command line and arguments in it."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{script}_args.json", {"argv": sys.argv, **vars(args)})
    if getattr(args, "name", None) is None:
        args.name = out.name
    return out


# ---------------------------------------------------------------------------------------------
# Data: load, split, fit the encoding on the training systems only


@dataclass
class Prepared:
    trajectories: np.ndarray          # (N, T, 2) in original units
    time: np.ndarray                  # (T,)
    splits: dict[str, np.ndarray]     # "train"/"val"/"test" -> system indices
    encoding: llmtime.EncodingConfig  # alpha, decimals, percentile
    data_path: str

    def texts(self, split: str, max_systems: int | None = None) -> list[str]:
        idx = self.systems(split, max_systems)
        return [llmtime.encode(self.trajectories[i], alpha=self.encoding.alpha, decimals=self.encoding.decimals)
                for i in idx]

    def systems(self, split: str, max_systems: int | None = None) -> np.ndarray:
        idx = self.splits[split]
        return idx if max_systems is None else idx[:max_systems]


def prepare_data(args: argparse.Namespace, out: Path | None = None, *, reuse: Path | None = None) -> Prepared:
    """Load (or generate) the data, split it by system, fit alpha on train; save all three in ``out``.

    When ``reuse`` (default: ``out``) already holds splits.json and encoding.json — a resumed run,
    or the folder of the trained run whose adapter is evaluated — they are used again, so the same
    systems and the same scaling are used again.
    """
    path = args.data or str(lotka_volterra.default_dataset())
    trajectories, time = lotka_volterra.load_h5(path)
    reuse = reuse or out
    saved_splits = reuse / "splits.json" if reuse else None
    if saved_splits and saved_splits.is_file():
        splits = {k: np.asarray(v, dtype=np.int64) for k, v in json.loads(saved_splits.read_text()).items()}
        if max(int(v.max()) for v in splits.values() if len(v)) >= len(trajectories):
            raise ValueError(f"{saved_splits} indexes systems beyond the {len(trajectories)} in {path}")
    else:
        splits = data_lib.split_systems(len(trajectories), fractions=tuple(args.splits), seed=args.seed)
    saved_enc = reuse / "encoding.json" if reuse else None
    if saved_enc and saved_enc.is_file():
        encoding = llmtime.EncodingConfig(**json.loads(saved_enc.read_text()))
    else:
        encoding = llmtime.EncodingConfig(
            alpha=llmtime.fit_alpha(trajectories[splits["train"]], percentile=args.percentile),
            decimals=args.decimals, percentile=args.percentile)
    if out:
        write_json(out / "splits.json", {k: v.tolist() for k, v in splits.items()})
        write_json(out / "encoding.json", asdict(encoding))
    return Prepared(trajectories, time, splits, encoding, path)


def adapter_run_dir(adapter: str | None) -> Path | None:
    """The training run folder an adapter was saved in (it holds splits.json and encoding.json)."""
    if adapter and (Path(adapter).parent / "splits.json").is_file():
        return Path(adapter).parent
    return None


# ---------------------------------------------------------------------------------------------
# Model


def model_config(args: argparse.Namespace) -> QwenConfig:
    """The checkpoint's config alone (no weights): enough to plan FLOPs before loading anything."""
    directory = qwen_min.load.resolve(args.model, revision=args.revision)
    return QwenConfig.from_json(directory / "config.json")


def meta_model(config: QwenConfig) -> Qwen2:
    """The model's structure without memory, for the FLOP counter."""
    with torch.device("meta"):
        return Qwen2(config)


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[Qwen2, Tokenizer]:
    model = qwen_min.from_pretrained(args.model, revision=args.revision, dtype=DTYPES[args.dtype], device=device)
    return model, qwen_min.load_tokenizer(args.model, revision=args.revision)


# ---------------------------------------------------------------------------------------------
# Cross-entropy over windows


@torch.no_grad()
def windows_loss(model: Qwen2, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 device: torch.device) -> tuple[float, int]:
    """Mean next-token cross-entropy over every scored label (padding excluded), and their count."""
    total, count = 0.0, 0
    for i in range(0, len(input_ids), batch_size):
        ids, y = input_ids[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        h = model.hidden(ids)  # right padding: causal attention already keeps real tokens off the pads
        total += qwen_min.chunked_cross_entropy(h, model.lm_head, y, reduction="sum").item()
        count += int((y != -100).sum())
    return total / max(count, 1), count

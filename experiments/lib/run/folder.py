"""The run folder: owned by one process at a time (its .lock), refused when it holds another run
unless --overwrite (or, for train.py, a --resume that continues the same run), and the exact command
line and config saved in it before any work; the run's seeds.

A run folder holds everything the run wrote: ``<script>_args.json`` (the exact command line and the
config it gave), splits.json, encoding.json and data.json (so a later script sees the same systems and
the same scaling, and a resumed run the same data file, see rundata.py) and the script's own results.
Each file is written whole (``files``); the temporary files a kill left behind are removed when the
folder is next taken.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from experiments.lib import errors, files
from experiments.lib.run import checkpoint
from experiments.lib.run.config import RunConfig

# What a resumed training run may not change: each alters the run (its data, its model and precision,
# its schedule or what picks the kept adapter), so the checkpoint would continue another run than the one asked for.
RESUME_FIXED = ("model", "revision", "data", "dtype", "seed", "splits", "decimals", "percentile", "context_length",
                "stride", "batch_size", "rank", "lora_alpha", "lora_dropout", "targets", "train_lm_head_bias", "lr",
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
    with files.named(out / ".lock"):
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


def check_run_folder(cfg: RunConfig, script: str, *, resume: bool = False) -> None:
    """Refuse, before anything is written, an --out holding a finished or interrupted run of ``script``
    (its <script>_args.json) unless --overwrite, or ``resume`` (train.py's --resume) with the same run's
    arguments."""
    out = Path(cfg.out)
    previous = out / f"{script}_args.json"
    if resume:
        if not previous.is_file() or not checkpoint.exists(checkpoint.folder(out)):
            raise errors.NoCheckpointError(f"--resume: no checkpoint in {checkpoint.folder(out)} to continue from")
        try:
            before = json.loads(previous.read_text())
        except (OSError, ValueError) as e:
            raise errors.RunFolderError(f"{previous}: not readable JSON ({e})") from None
        now = json.loads(json.dumps(asdict(cfg)))   # (tuples as the lists they were saved as)
        for key in RESUME_FIXED:
            if key in before and before.get(key) != now.get(key):
                raise errors.UsageError(f"--resume: --{key.replace('_', '-')} was {before[key]!r} in {previous}, "
                                        f"now {now.get(key)!r}: a resumed run continues the same run (pass the "
                                        f"same value, or start a new --out)")
    elif previous.is_file() and not cfg.overwrite and holds_work(out, script):
        also = " or --resume to continue it" if script == "train" else ""
        raise errors.RunFolderError(f"--out {out} already holds a {script} run ({previous.name}): pass --overwrite "
                                    f"to replace it{also}, or choose another --out")


# What each script writes in a run folder beyond its setup (<script>_args.json, splits.json,
# encoding.json and data.json, written before any work, so a run refused then leaves nothing else): its work.
WORK_FILES = {
    "train": ("metrics.jsonl", "metrics.csv", "summary.json", *checkpoint.NAMES, "adapter"),
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
    shared = () if any((out / f).exists() for f in others) else ("splits.json", "encoding.json", "data.json")
    for name in (f"{script}_args.json", *shared, *WORK_FILES.get(script, ())):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def start_run(cfg: RunConfig, script: str, *, resume: bool = False) -> Path:
    """Take the run folder: refuse it (nothing written) if another process holds it, if it holds a run
    and neither --overwrite nor a matching ``resume`` (train.py's --resume) was given; then lock it and
    save the exact command line and arguments in it."""
    out = Path(cfg.out)
    held = str(out.resolve()) in _LOCKS
    lock_run(out)
    try:
        check_run_folder(cfg, script, resume=resume)
    except errors.ExperimentError:
        if not held:
            unlock_run(out)
        raise
    if not resume and (out / f"{script}_args.json").is_file():
        clear_run(out, script)   # (--overwrite, or an earlier run that was refused before any work)
    for stale in files.leftovers(out):   # (what a write killed midway left under a temporary name; never read)
        stale.unlink(missing_ok=True)
    _write_pid(out)
    files.write_json(out / f"{script}_args.json", {"argv": sys.argv, **asdict(cfg)})
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

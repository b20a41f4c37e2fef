"""What every experiment script shares: the run folder, the run's data (load, split by system, fit
the encoding on train) and the model, each from the script's config (experiments/lib/config.py).

A run folder holds everything the run wrote: ``<script>_args.json`` (the exact command line and
the config it gave),
splits.json and encoding.json (so a later script sees the same systems and the same scaling), and
the script's own results. A saved adapter folder holds its own copies, and data.json (the data
file's path and SHA-256), so it decodes its forecasts again wherever it is moved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import flops
import lora
import qwen_min
from experiments.lib import cli, data, devices, errors, files, llmtime, lotka_volterra
from experiments.lib.config import AdapterConfig, RunConfig, TrainConfig
from qwen_min import Qwen2, Tokenizer

# ---------------------------------------------------------------------------------------------
# The run folder and seeds


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


def check_run_folder(cfg: RunConfig, script: str) -> None:
    """Refuse, before anything is written, an --out holding a finished or interrupted run of ``script``
    (its <script>_args.json) unless --overwrite, or (train.py) --resume with the same run's arguments."""
    out = Path(cfg.out)
    previous = out / f"{script}_args.json"
    if isinstance(cfg, TrainConfig) and cfg.resume:
        if not previous.is_file() or not any((out / c / "state.json").is_file()
                                              for c in ("checkpoint", "checkpoint.old")):
            raise errors.NoCheckpointError(f"--resume: no checkpoint in {out / 'checkpoint'} to continue from")
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


def start_run(cfg: RunConfig, script: str) -> Path:
    """Take the run folder: refuse it (nothing written) if another process holds it, if it holds a run
    and neither --overwrite nor a matching --resume was given; then lock it and save the exact command
    line and arguments in it."""
    out = Path(cfg.out)
    held = str(out.resolve()) in _LOCKS
    lock_run(out)
    try:
        check_run_folder(cfg, script)
    except errors.ExperimentError:
        if not held:
            unlock_run(out)
        raise
    if not (isinstance(cfg, TrainConfig) and cfg.resume) and (out / f"{script}_args.json").is_file():
        clear_run(out, script)   # (--overwrite, or an earlier run that was refused before any work)
    _write_pid(out)
    files.write_json(out / f"{script}_args.json", {"argv": sys.argv, **asdict(cfg)})
    return out


def reserve(cfg: RunConfig, planned: float, *, kind: str, config: dict[str, Any]) -> flops.Reservation:
    """Hold the run's planned FLOPs in the ledger, or refuse it (flops.LedgerError) before any model work.

    With --reservation the FLOPs were reserved by the process that started this run (a study, for all
    its runs at once): this run charges that reservation under its own name and leaves it open."""
    ledger = flops.Ledger(cfg.ledger, budget=cfg.budget)
    try:
        if cfg.reservation:
            reservation = ledger.attach(cfg.reservation)
            reservation.name, reservation.kind = cfg.run_name, kind
            return reservation
        return ledger.reserve(planned, name=cfg.run_name, kind=kind, config=config)
    except (flops.BudgetExceeded, flops.LedgerDamaged) as e:
        raise type(e)(f"refused before any model work: {e}") from None
    except (KeyError, ValueError) as e:  # no such reservation, or it is closed
        raise errors.UsageError(f"--reservation {cfg.reservation}: {cli.one_line(e)}") from None


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


def prepare_data(cfg: RunConfig, out: Path | None = None, *, reuse: Path | None = None) -> RunData:
    """Load (or generate) the data, split it by system, fit alpha on train; save splits and encoding in ``out``.

    When ``reuse`` (default: ``out``) already holds splits.json and encoding.json (a resumed run)
    they are used again, so the same systems and the same scaling are used again.

    With an adapter (``cfg.adapter``: evaluate.py, forecast.py) the adapter folder itself decides, wherever it
    was moved: its splits.json and encoding.json are used, --data defaults to the file in its
    data.json, and a file whose SHA-256 differs from the recorded one is refused (DataError naming
    both files and checksums) unless ``cfg.allow_other_data``, which turns the refusal into a
    warning in ``.warnings``. Scoring the adapter's own training split (``cfg.split`` "train") is
    refused.
    """
    warnings: list[str] = []
    scoring = cfg if isinstance(cfg, AdapterConfig) else None
    info = adapter_info(scoring.adapter) if scoring and scoring.adapter else None
    if info:
        if scoring.split == "train":
            raise errors.UsageError(f"--split train: adapter {info.folder} was trained on these systems; score val or "
                             f"test")
        reuse = info.folder
    path = cfg.data or (info.data["path"] if info else None)
    if path is None:
        path = str(lotka_volterra.default_dataset())
    elif not Path(path).is_file():
        where = "" if cfg.data else f" (recorded in {info.folder / 'data.json'}; pass --data)"
        raise errors.DataError(f"data file {path} not found{where}")
    digest = file_sha256(path)
    if info and digest != info.data["sha256"]:
        msg = (f"data file {path} (sha256 {digest}) is not the one adapter {info.folder} was trained on: "
               f"{info.data['path']} (sha256 {info.data['sha256']})")
        if not scoring.allow_other_data:
            raise errors.DataError(f"{msg}; pass --allow-other-data to score it anyway")
        _warn(warnings, msg)
    trajectories, time = lotka_volterra.load_h5(path)
    reuse = reuse or out
    if reuse and (reuse / "splits.json").is_file():
        splits = _read(data.load_splits, reuse / "splits.json", n_systems=len(trajectories))
    else:
        splits = data.split_systems(len(trajectories), fractions=cfg.splits, seed=cfg.seed)
    if reuse and (reuse / "encoding.json").is_file():
        encoding = _read(llmtime.EncodingConfig.load, reuse / "encoding.json")
    else:
        encoding = llmtime.EncodingConfig(
            alpha=llmtime.fit_alpha(trajectories[splits["train"]], percentile=cfg.percentile),
            decimals=cfg.decimals, percentile=cfg.percentile)
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


def load_model(cfg: RunConfig, device: torch.device) -> tuple[Qwen2, Tokenizer]:
    """The base model, in ``devices.weight_dtype(cfg.dtype, device)``, and its tokenizer."""
    model = qwen_min.from_pretrained(cfg.model, revision=cfg.revision, dtype=devices.weight_dtype(cfg.dtype, device),
                                     device=device)
    return model, qwen_min.load_tokenizer(cfg.model, revision=cfg.revision)


def load_adapter(model: Qwen2, cfg: AdapterConfig, run_data: RunData | None = None) -> None:
    """lora.load_adapter with --allow-other-base; its warning goes to ``run_data.warnings`` (None: the
    meta-device shape planned first, whose notes the real load records again). A refusal is lora.AdapterError,
    prefixed with the flag."""
    notes: list[str] = []
    try:
        lora.load_adapter(model, cfg.adapter, allow_other_base=cfg.allow_other_base, warn=notes)
    except lora.AdapterError as e:
        raise lora.AdapterError(f"--adapter: {e}") from None
    for note in notes if run_data else []:
        _warn(run_data.warnings, note)

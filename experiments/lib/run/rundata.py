"""The run's data, from its config: the data file loaded (or generated), split by system, the
encoding fitted on the training systems only, all saved in the run folder with the data file's path
and SHA-256 (data.json), so a run that reuses the folder (train.py --resume) is refused on other data;
and an adapter's provenance, saved beside its weights (encoding.json, splits.json, data.json), so it
decodes its forecasts again wherever it is moved. A split left without systems (a data file too small
for its --splits) is refused in one line naming the file, its systems and the splits.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import lora
from experiments.lib import errors, files
from experiments.lib.run.config import RunConfig
from experiments.lib.science import data, llmtime, lotka_volterra


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
    splits_from: str = ""                              # what cut the splits, in words (--splits, a splits.json)

    def systems(self, split: str, max_systems: int | None = None) -> np.ndarray:
        """The system indices of ``split`` (the first ``max_systems``); a split without any is refused
        (DataError naming the data file, its number of systems and the splits), as nothing can be
        trained, scored or forecast on it."""
        idx = self.splits[split]
        if not len(idx):
            sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
            raise errors.DataError(f"data file {self.data_path} holds {len(self.trajectories)} system(s), and "
                                   f"{self.splits_from or 'the splits'} give the {split} split none ({sizes}); "
                                   f"use a data file with more systems, or other --splits")
        return idx if max_systems is None else idx[:max_systems]

    def texts(self, split: str, max_systems: int | None = None, steps: int | None = None) -> list[str]:
        """The LLMTIME text of each system of ``split`` (its first ``steps`` time steps; None: all)."""
        return [llmtime.encode(self.trajectories[i, :steps], alpha=self.encoding.alpha,
                               decimals=self.encoding.decimals) for i in self.systems(split, max_systems)]


def prepare_data(cfg: RunConfig, out: Path | None = None, *, reuse: Path | None = None, adapter: str | None = None,
                 split: str | None = None, allow_other_data: bool = False) -> RunData:
    """Load (or generate) the data, split it by system, fit alpha on train; save splits and encoding in ``out``.

    When ``reuse`` (default: ``out``) already holds splits.json and encoding.json (a resumed run)
    they are used again, so the same systems and the same scaling are used again.

    With an ``adapter`` folder (evaluate.py's and forecast.py's --adapter) the adapter folder itself
    decides, wherever it was moved: its splits.json and encoding.json are used, --data defaults to the
    file in its data.json, and a file whose SHA-256 differs from the recorded one is refused (DataError
    naming both files and checksums) unless ``allow_other_data``, which turns the refusal into a
    warning in ``.warnings``. Scoring the adapter's own training ``split`` ("train") is refused.

    ``out`` records the data file's path and SHA-256 in its data.json. A ``reuse`` folder (without an
    adapter) whose data.json names another checksum is refused (DataError naming both), since its
    splits and encoding were made on other data: train.py --resume after the file was replaced, say.
    """
    warnings: list[str] = []
    info = adapter_info(adapter) if adapter else None
    if info:
        if split == "train":
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
        if not allow_other_data:
            raise errors.DataError(f"{msg}; pass --allow-other-data to score it anyway")
        warn(warnings, msg)
    reuse = reuse or out
    if reuse and not info:
        check_same_data(reuse, path, digest)
    trajectories, time = lotka_volterra.load_h5(path)
    if reuse and (reuse / "splits.json").is_file():
        splits = _read(data.load_splits, reuse / "splits.json", n_systems=len(trajectories))
        splits_from = f"the splits in {reuse / 'splits.json'}"
    else:
        splits = data.split_systems(len(trajectories), fractions=cfg.splits, seed=cfg.seed)
        splits_from = f"--splits {' '.join(f'{f:g}' for f in cfg.splits)}"
    if reuse and (reuse / "encoding.json").is_file():
        encoding = _read(llmtime.EncodingConfig.load, reuse / "encoding.json")
    else:
        encoding = llmtime.EncodingConfig(
            alpha=llmtime.fit_alpha(trajectories[splits["train"]], percentile=cfg.percentile),
            decimals=cfg.decimals, percentile=cfg.percentile)
    run_data = RunData(trajectories, time, splits, encoding, path, digest, warnings, info, splits_from)
    if out:
        data.save_splits(out / "splits.json", splits)
        encoding.save(out / "encoding.json")
        files.write_json(out / "data.json", data_record(run_data))
    return run_data


def data_record(run_data: RunData) -> dict[str, Any]:
    """data.json: the data file's absolute path, its SHA-256 and its number of systems."""
    return {"path": str(Path(run_data.data_path).resolve()), "sha256": run_data.sha256,
            "systems": len(run_data.trajectories)}


def check_same_data(folder: Path, path: str | os.PathLike, digest: str) -> None:
    """Refuse data file ``path`` (SHA-256 ``digest``) for a run folder whose data.json records another
    file's checksum: its splits and encoding, and a checkpoint, belong to that data (DataError naming both)."""
    record = folder / "data.json"
    if not record.is_file():
        return
    try:
        recorded = json.loads(record.read_text())
        before, where = recorded["sha256"], recorded["path"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise errors.DataError(f"{record}: damaged or not a data record ({errors.one_line(e)})") from None
    if before != digest:
        raise errors.DataError(f"data file {path} (sha256 {digest}) is not the data of the run in {folder}: "
                               f"{where} (sha256 {before}, recorded in {record}); a run continues on the data it "
                               f"began with: restore that file, or start afresh in another --out")


def _read(load: Any, path: Path, **kwargs: Any) -> Any:
    """A run's or adapter's splits.json / encoding.json, read by ``load``; damaged: a DataError naming it."""
    try:
        return load(path, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise errors.DataError(f"{path}: damaged or not this data's ({errors.one_line(e)})") from None


def warn(warnings: list[str], msg: str) -> None:
    """A warning for the run's results file, printed as it is made."""
    print(f"warning: {msg}", flush=True)
    warnings.append(msg)


ADAPTER_FILES = ("encoding.json", "splits.json", "data.json")


def save_adapter_files(folder: Path, run_data: RunData) -> None:
    """Beside a saved adapter's weights, what decodes its forecasts again: encoding.json, splits.json
    and data.json (the data file's absolute path, its SHA-256 and its number of systems)."""
    run_data.encoding.save(folder / "encoding.json")
    data.save_splits(folder / "splits.json", run_data.splits)
    files.write_json(folder / "data.json", data_record(run_data))


def adapter_info(adapter: str | os.PathLike) -> AdapterInfo:
    """Read an adapter folder's provenance (see ``prepare_data``), refusing a folder that lacks any of it."""
    folder = Path(adapter)
    interrupted = lora.interrupted_save(folder)   # (a save cut short says what it left, and where)
    if interrupted:
        raise errors.AdapterFolderError(f"--adapter {folder}: {interrupted}")
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

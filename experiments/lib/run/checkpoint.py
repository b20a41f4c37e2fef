"""The resumable training checkpoint: safetensors for tensors, JSON for the run's state, swapped in
atomically so a kill at any moment leaves a complete checkpoint behind. Its layout in a run folder
is known here alone:

    checkpoint/state.safetensors  trainable weights, AdamW moments, the torch RNG state
    checkpoint/best.safetensors   the best adapter so far (early stopping)
    checkpoint/untrained.safetensors  the untrained model's validation forecasts (the paired reference)
    checkpoint/state.json         RunState: step, data position, early stopping, FLOPs
    checkpoint.tmp/               a checkpoint being written
    checkpoint.old/               the previous one, while the new one is swapped in (read if the swap was cut short)

A checkpoint is written only when every FLOP it holds has been charged to the ledger (train.py
flushes its charges first), so a run resumed from it owes nothing for what came before. Every file of
the new checkpoint and its folder are synced before the swap, and the run folder after it, so the
swap survives a power cut; a save that fails (the disk full) removes checkpoint.tmp, keeps the
previous checkpoint and raises ``errors.WriteError`` naming the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as serialize

from experiments.lib import errors, files
from experiments.lib.training.state import RunState

FOLDER = "checkpoint"                                   # in a run folder
NAMES = (FOLDER, FOLDER + ".old", FOLDER + ".tmp")      # everything a checkpoint may leave there


def folder(out: Path) -> Path:
    """The checkpoint folder of run folder ``out``."""
    return out / FOLDER


def exists(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint to resume from (itself, or its .old if a save was cut short)."""
    return any((f / "state.json").is_file() for f in (folder, folder.with_name(folder.name + ".old")))


def save(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: RunState,
         best: dict[str, torch.Tensor], untrained: np.ndarray | None = None) -> None:
    """Written to ``folder``.tmp, then swapped in; the previous checkpoint is ``folder``.old until the swap is done."""
    tmp = folder.with_name(folder.name + ".tmp")
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    for p, s in opt.state.items():
        for k, v in s.items():
            tensors[f"optimizer.{names[id(p)]}.{k}"] = torch.as_tensor(v).cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    # (serialized here and written by plain writes, so a full disk is an OSError like any other)
    contents = {"state.safetensors": serialize(tensors),
                "best.safetensors": serialize({n: t.detach().cpu() for n, t in best.items()})}
    if untrained is not None:
        contents["untrained.safetensors"] = serialize({"forecasts": torch.from_numpy(np.ascontiguousarray(untrained))})
    contents["state.json"] = json.dumps(asdict(state), indent=1).encode()
    with files.named(folder):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for name, data in contents.items():
                with open(tmp / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            files.fsync_path(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)   # (the previous checkpoint stays; the space is freed)
            raise
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            os.replace(folder, old)   # a crash from here on leaves .old, which load() also reads
        os.replace(tmp, folder)
        files.fsync_path(folder.parent)
        shutil.rmtree(old, ignore_errors=True)


def _current(folder: Path) -> Path:
    """The checkpoint folder to read: ``folder``, or ``folder``.old when a save was cut short between its renames."""
    old = folder.with_name(folder.name + ".old")
    if not (folder / "state.json").is_file() and (old / "state.json").is_file():
        return old
    if not (folder / "state.json").is_file():
        raise errors.NoCheckpointError(f"--resume: no checkpoint in {folder}")
    return folder


def read_state(folder: Path) -> RunState:
    """The saved run state alone (no tensors): what a resumed run plans its remaining FLOPs from."""
    path = _current(folder) / "state.json"
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise errors.CheckpointError(f"{path}: damaged checkpoint state ({e})") from None
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(RunState)}) if isinstance(fields, dict) else []
    if not isinstance(fields, dict) or unknown:
        raise errors.CheckpointError(f"{path}: fields {unknown} are not a checkpoint of this train.py; run without "
                                     f"--resume (or with --overwrite) to start afresh")
    return RunState(**fields)


def load(folder: Path, model: torch.nn.Module,
         opt: torch.optim.Optimizer) -> tuple[RunState, dict[str, torch.Tensor]]:
    """Restore the trainable weights, AdamW's moments and the RNG state in place; the run's state and
    the best adapter so far are returned."""
    folder = _current(folder)
    tensors = _tensors(folder / "state.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            if p.requires_grad:
                p.copy_(tensors[n])
    for n, p in params.items():
        if p.requires_grad:
            opt.state[p] = {k.rsplit(".", 1)[1]: v.to(p.device) if v.dim() else v
                            for k, v in tensors.items() if k.startswith(f"optimizer.{n}.")}
    torch.set_rng_state(tensors["rng.torch"])
    return read_state(folder), _tensors(folder / "best.safetensors")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # (safetensors' own error, or OSError: a missing or damaged file)
        raise errors.CheckpointError(f"{path}: missing or damaged checkpoint file ({e})") from None


def load_untrained(folder: Path) -> np.ndarray | None:
    """The untrained model's validation forecasts saved with the checkpoint (None: none were made)."""
    path = _current(folder) / "untrained.safetensors"
    return load_file(str(path))["forecasts"].numpy() if path.is_file() else None

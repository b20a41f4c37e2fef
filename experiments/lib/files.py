"""Files a run writes whole: written to a temporary name beside the file, synced, then renamed over
it and the folder synced, so a reader (or a resumed run after a kill, or a power cut) finds the
previous file or the complete new one, never half a file. ``writing`` gives any writer (HDF5,
matplotlib, safetensors) that temporary name; ``write_bytes``, ``write_text`` and ``write_json`` are
built on it; ``append`` adds whole lines to a log or none. A write that fails (the disk full,
an I/O error, no permission, a read-only file system) leaves nothing under the temporary name and
raises ``errors.WriteError`` naming the file. Every JSON it writes, whole files and JSON lines alike,
is strict (``dumps``): a non-finite float is null."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from experiments.lib import errors

TMP_MARK = ".tmp-"   # in the (hidden) temporary name of a file being written: ``.<stem>.tmp-<id><suffix>``


def temp_name(path: Path) -> Path:
    """A hidden name beside ``path`` for its next version, unique to this call; the suffix is kept (a
    writer such as matplotlib picks the format by it)."""
    return path.with_name(f".{path.stem}{TMP_MARK}{uuid.uuid4().hex[:8]}{path.suffix}")


def leftovers(folder: Path) -> list[Path]:
    """Temporary files in ``folder`` that writes killed midway left behind (never read as results)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(".*") if TMP_MARK in p.name and not p.is_dir())


@contextlib.contextmanager
def named(path: str | os.PathLike) -> Iterator[None]:
    """An OSError inside the block raised as ``errors.WriteError`` naming ``path`` (one line for the person
    at the command line, whichever file under it the system call was about: a folder written whole is
    named, not the file in its hidden temporary copy that the disk filled on)."""
    try:
        yield
    except errors.WriteError as e:
        raise errors.WriteError(path, e.error) from e.error
    except OSError as e:
        raise errors.WriteError(path, e) from e


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder by its path (a rename is durable only once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """The temporary name to write ``path``'s new contents to; when the block ends normally the file is
    synced, renamed over ``path`` and the folder synced. If the block (or the rename) fails, the
    temporary file is removed and ``path`` holds what it held before; an OSError is raised as
    ``errors.WriteError`` naming ``path``.

        with files.writing(out / "forecasts.h5") as tmp:
            with h5py.File(tmp, "w") as f: ...
    """
    path = Path(path)
    with named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(path)
        try:
            yield tmp
            fsync_path(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        fsync_path(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with writing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def append(path: str | os.PathLike, text: str, *, sync: bool = True) -> None:
    """Append ``text`` (whole lines) to ``path`` whole, or nothing: a write that fails midway (the disk
    full) is cut back to the file's length before it, so no torn line is left, and raised as
    ``errors.WriteError``. ``sync``: fsync it (a log whose lines must survive a power cut)."""
    data = memoryview(text.encode())
    with named(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                while data:
                    n = os.write(fd, data)
                    if n == 0:   # (no progress and no error: treat it as the disk full rather than loop)
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                    data = data[n:]
                if sync:
                    os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        if sync and not start:   # (a new file: its name in the folder must survive a power cut too)
            fsync_path(Path(path).parent)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON, indented: numpy scalars and arrays and paths written as plain values, and every
    non-finite float (NaN, inf; numpy's too) written as null, so any JSON reader reads the file."""
    return write_text(path, dumps(obj, indent=2))


def dumps(obj: Any, *, indent: int | None = None) -> str:
    """``obj`` as strict JSON text (see ``strict``): what write_json writes, and one line of a .jsonl
    file with no indent (metrics.jsonl)."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def strict(x: Any) -> Any:
    """``x`` with numpy values and paths made plain and non-finite floats made None, recursively."""
    if isinstance(x, dict):
        return {(k.item() if isinstance(k, np.generic) else k): strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict(v) for v in x]
    if isinstance(x, np.ndarray):
        return strict(x.tolist())
    if isinstance(x, np.generic):
        return strict(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    if x is None or isinstance(x, (str, int)):  # bool is an int
        return x
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")

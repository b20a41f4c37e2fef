"""A folder written whole or not at all: the new contents go into a hidden sibling, are synced, and
are then swapped in for the old folder in one step, so a crash at any moment leaves the complete old
folder or the complete new one at the path, never a mixture of the two.

    write_folder(Path("run/adapter"), {"adapter_config.json": b"...", ...}, fill=None)

The steps, each a point where a process may die:

  1. mkdir ``.adapter.saving-<id>`` beside the folder; write every file into it (``fill`` may add more);
     fsync each file and the new folder. A crash here leaves the old folder untouched and a stray
     sibling, which the next save removes.
  2. Swap. Where the kernel and file system offer it (Linux ``renameat2(RENAME_EXCHANGE)``: ext4, xfs,
     btrfs, tmpfs), the two folders trade names atomically, so the path always holds a complete folder.
     Elsewhere two renames do it: the old folder to ``.adapter.replaced-<id>``, then the new one to the
     path; a crash between them leaves no folder at the path but both complete siblings, which
     ``interrupted_save`` describes (the loader says which to rename back). A first save is one rename.
  3. fsync the parent, so the swap survives a power cut; remove the old folder and any siblings left by
     earlier interrupted saves (a crash here only leaves a stray sibling).

One writer per folder at a time (a run folder is locked by its run): a save removes the hidden siblings
of the path it writes, whoever left them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

SAVING = ".saving-"      # a new folder being written (complete once it is swapped in)
REPLACED = ".replaced-"  # the old folder moved aside by the two-rename swap

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # (linux/fs.h)


def sibling(directory: Path, kind: str) -> Path:
    """A hidden name beside ``directory`` for a folder of ``kind`` (SAVING or REPLACED), unique to this call."""
    return directory.with_name(f".{directory.name}{kind}{uuid.uuid4().hex[:12]}")


def leftovers(directory: Path, kind: str) -> list[Path]:
    """The hidden siblings of ``kind`` that earlier saves into ``directory`` left behind, newest last."""
    prefix = f".{directory.name}{kind}"
    if not directory.parent.is_dir():
        return []
    found = [p for p in directory.parent.iterdir() if p.name.startswith(prefix)]
    return sorted(found, key=lambda p: (p.lstat().st_mtime_ns, p.name))


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it (os.write may write less than asked: loop)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by its path (a folder's entries are durable only once it is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Trade the names of two existing paths in one atomic step; False (nothing done) where the kernel, the C
    library or the file system cannot, OSError if it failed otherwise."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def swap_in(new: Path, directory: Path) -> Path | None:
    """Put the complete folder ``new`` at ``directory``; returns where the old folder now is (None: there was
    none). On an error the path holds what it held before and ``new`` is removed; only if putting the old
    folder back fails too do both stay, complete, beside the path (``interrupted_save`` names them)."""
    try:
        if not os.path.lexists(directory):
            os.rename(new, directory)
            return None
        if exchange(new, directory):
            return new  # (the names were traded: ``new`` now holds the old folder)
        aside = sibling(directory, REPLACED)
        os.rename(directory, aside)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    try:
        os.rename(new, directory)
    except BaseException:
        os.rename(aside, directory)  # (raises past the removal below if it fails: then both are kept)
        shutil.rmtree(new, ignore_errors=True)
        raise
    return aside


def write_folder(directory: str | os.PathLike, files: Mapping[str, bytes],
                 fill: Callable[[Path], None] | None = None) -> Path:
    """Replace ``directory`` whole by a folder holding exactly ``files`` (name -> bytes) and whatever
    ``fill(folder)`` writes into the new folder before the swap (module docstring). On an error the path
    holds what it held before and the new folder is removed; the error is raised as it came."""
    directory = Path(directory)
    if directory.is_symlink():  # (swap the folder it points to, not the link)
        directory = directory.resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    new = sibling(directory, SAVING)
    os.mkdir(new)
    try:
        for name, data in files.items():
            write_file(new / name, data)
        if fill is not None:
            fill(new)
        for path in new.rglob("*"):  # (what fill wrote too, and any folder it made)
            if not path.is_symlink():
                fsync_path(path)
        fsync_path(new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    old = swap_in(new, directory)
    fsync_path(directory.parent)
    for stale in ([old] if old else []) + leftovers(directory, SAVING) + leftovers(directory, REPLACED):
        shutil.rmtree(stale, ignore_errors=True)
    return directory


def interrupted_save(directory: str | os.PathLike) -> str | None:
    """Why ``directory`` is missing, if a save into it was interrupted (None if nothing says so): the
    siblings it left and what to do with them."""
    directory = Path(directory)
    if os.path.lexists(directory):
        return None
    replaced, saving = leftovers(directory, REPLACED), leftovers(directory, SAVING)
    if replaced:
        return (f"{directory} is missing: a save into it was interrupted between moving the old folder aside and "
                f"moving the new one in; {replaced[-1]} holds the old one"
                + (f" and {saving[-1]} the new one" if saving else "")
                + f", each complete: rename the one you want to {directory.name}")
    if saving:
        return (f"{directory} is missing: its first save was interrupted before it finished ({saving[-1]} may be "
                "incomplete): save it again")
    return None

"""The command line a person meets: one parser class, the parser of every config-taking script built
from its config's fields (run/config.py), and one handler for every script.

``run_as_script(main)`` runs a script's ``main`` and is the one place its errors are caught: an
error of the experiments' own (``errors.ExperimentError``), of the ledger (``flops.LedgerError``),
of a checkpoint or config (``qwen_min.CheckpointError``/``ConfigError``), of an adapter
(``lora.AdapterError``) or of the data (``lotka_volterra.DataError``) is printed as one line,
``<script>: error: <message>``, and the exit status is 1 (2 for a usage error, as argparse gives).
So is an OSError of the machine rather than the code (the disk full, an I/O error, no permission, a
read-only file system): ``<script>: error: writing <path>: No space left on device`` (the library's
writers raise it as ``errors.WriteError`` naming the file; any other such OSError is named by its
own file name). Any other exception is a bug and keeps its traceback; ``--debug`` shows the
traceback of any error.
A run interrupted by SIGINT or SIGTERM (``errors.Interrupted``) closes its booking on the way out
and then dies of that same signal, after printing what it left for ``--resume``, if anything.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import inspect
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import flops
import lora
import qwen_min
from experiments.lib import errors
from experiments.lib.errors import one_line
from experiments.lib.run.config import flag_name, is_switch

# Everything a person can fix; any other exception is a bug.
EXPECTED: tuple[type[BaseException], ...] = (errors.ExperimentError, flops.LedgerError, qwen_min.CheckpointError,
                                             qwen_min.ConfigError, lora.AdapterError)

# OSErrors of the machine rather than the code: one line, exit 1 (any other OSError keeps its traceback).
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES,
                            errno.EPERM})
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})   # (only ever a write)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad command line raised as ``errors.UsageError`` (one line, exit 2, from the
    handler) instead of a usage block and an exit, and every option's default in --help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise errors.UsageError(f"{message} (--help lists the options)")


def add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the full traceback of any error")


def script_parser(description: str | None = None) -> ArgumentParser:
    """An experiment script's parser: one-line usage errors, defaults in --help, and --debug."""
    p = ArgumentParser(description=description)
    add_debug(p)
    return p


C = TypeVar("C")   # a config: a frozen dataclass whose every field is a flag (config.flag)


def parser(cls: type, description: str | None = None) -> ArgumentParser:
    """The command line of a script that takes ``cls``: one option per field, in the field's group,
    with its type, default and help; --debug besides (cli.run_as_script reads it)."""
    p = script_parser(description)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(cls):
        m = f.metadata
        where = p if m["group"] is None else groups.setdefault(m["group"], p.add_argument_group(m["group"]))
        if is_switch(f):
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            where.add_argument(flag_name(f), dest=f.name, action=action, default=f.default, help=m["help"])
        else:
            extra = {k: m[k] for k in ("type", "choices", "nargs", "metavar") if m[k] is not None}
            where.add_argument(flag_name(f), dest=f.name, default=f.default, help=m["help"], **extra)
    return p


def parse(cls: type[C], argv: list[str] | None = None, description: str | None = None) -> C:
    """``argv`` (default: the process's arguments) as a ``cls``: refused as errors.UsageError, one line."""
    ns = parser(cls, description).parse_args(argv)
    return cls(**{f.name: _value(getattr(ns, f.name)) for f in fields(cls)})


def _value(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v   # (nargs gives lists; configs hold tuples: frozen, hashable)


def run_as_script(main: Callable[[list[str]], object], argv: Sequence[str] | None = None, *,
                  name: str | None = None) -> int:
    """Run ``main(argv)`` (default: the process's arguments); its exit status (0: it ended normally).

    Errors a person can fix print ``<name>: error: <message>`` on stderr and give 1 (a usage error:
    2); with ``--debug`` in ``argv`` they raise, traceback and all. argparse's own exit (--help)
    passes through. Interrupted by a signal: the message of what to do next (if the run left one),
    then the process dies of that signal."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = name or Path(inspect.getfile(main)).name
    try:
        main(argv)
    except errors.Interrupted as e:
        # what to do next, and what failed on the way out (a note added on the way)
        for note in filter(None, [e.note, *getattr(e, "__notes__", ())]):
            print(f"{name}: {note}", file=sys.stderr, flush=True)
        signal.signal(e.signum, signal.SIG_DFL)
        os.kill(os.getpid(), e.signum)
        return 128 + e.signum   # (only if the signal was blocked)
    except EXPECTED as e:
        if "--debug" in argv:
            raise
        end_progress_bars()
        print(f"{name}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 1)
    except BrokenPipeError:   # (`| head` closed stdout: stop quietly, as a C tool killed by SIGPIPE would)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # (no second error at exit's flush)
        return 128 + signal.SIGPIPE
    except OSError as e:
        if "--debug" in argv or e.errno not in MACHINE_ERRNOS:
            raise
        end_progress_bars()
        print(f"{name}: error: {os_error_line(e)}", file=sys.stderr, flush=True)
        return 1
    return 0


def end_progress_bars() -> None:
    """Close the progress bars an error cut short, so the error gets a line of its own (a bar left open
    ends its line only when it is collected, after the error, and draws itself again there)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        with contextlib.suppress(Exception):   # (a bar that cannot be closed must not hide the error)
            bar.close()


def os_error_line(e: OSError) -> str:
    """An OSError that no writer of ours named (a library's own write): its file and reason on one line."""
    reason = e.strerror or one_line(e)
    if not e.filename:
        return f"{reason} (--debug shows where)"
    return f"{'writing ' if e.errno in WRITE_ERRNOS else ''}{e.filename}: {reason}"

"""The experiments' own error types: what a person can fix (a flag, a file, a run folder) rather
than a bug. Every script catches them in one place (``cli.run_as_script``) and prints one line,
``<script>: error: <message>``, exiting 2 for a usage error (as argparse does) and 1 otherwise.
Any other exception is a bug and keeps its traceback. ``Interrupted`` is no error: the signal that
stops a run, raised where the run can close its books on the way out.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


class ExperimentError(Exception):
    """The base of the experiments' errors: one line for the person at the command line."""

    exit_code = 1


class UsageError(ExperimentError):
    """Flags that cannot work together, or a value the parser could not judge alone (exit 2)."""

    exit_code = 2


class DataError(ExperimentError, ValueError):
    """A data file that is missing, unreadable or not in the study's format, or data that cannot be used."""


class RunFolderError(ExperimentError):
    """A run folder that is in use, holds another run, or does not hold what --resume needs."""


class CheckpointError(ExperimentError, ValueError):
    """A training checkpoint (--out/checkpoint) that is missing or damaged."""


class AdapterFolderError(ExperimentError, ValueError):
    """An --adapter folder that is not one, or whose provenance files are missing or malformed."""


class Diverged(ExperimentError):  # noqa: N818 (the name train.py has always used)
    """A loss that is not a finite number: the run stops (exit status 1, with the message), keeping the
    last good checkpoint and the best adapter so far."""


class NotFiniteError(ExperimentError):
    """A loss or score that is not a finite number where a result is reported (evaluate.py): the
    script ends with exit status 1 and writes no result from it."""


class StudyError(ExperimentError):
    """study.py cannot go on: a child run failed, or the plan does not fit the budget."""


class MissingDependencyError(ExperimentError):
    """An optional package a flag needs is not installed."""


class NoCheckpointError(RunFolderError, FileNotFoundError):
    """--resume, and the run folder holds no checkpoint."""


class WriteError(ExperimentError):
    """A file or folder could not be written: the disk is full, an I/O error, no permission, a
    read-only file system. Raised by the writers of ``files`` (and the checkpoint's), which leave
    nothing half-written under the name: what the path held before is still there, or nothing is."""

    def __init__(self, path: str | os.PathLike, error: OSError) -> None:
        reason = error.strerror or one_line(error)
        super().__init__(f"writing {path}: {reason}")
        self.path, self.error, self.errno = Path(path), error, error.errno


class UnrecordedChargeError(ExperimentError):
    """A charge to the FLOP ledger could not be written (flops.LedgerWriteError: the disk is full, an
    I/O error): the run stops, and its message names the FLOPs of finished work the ledger lacks."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, so no ``except Exception`` swallows it): the run
    charges what it spent and closes its reservation on the way out; ``cli.run_as_script`` then prints
    ``note`` (set on the way out, e.g. train.py's step and --resume command line) and ends the process
    by the same signal, with the exit status that signal always gives."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.note = ""
        self.step: int | None = None   # train.py: the optimizer steps taken when it arrived


def add_note(e: BaseException, note: str) -> None:
    """``e.add_note(note)`` (Python 3.11), by hand so that 3.10 keeps it too: ``one_line`` shows it."""
    e.__notes__ = [*getattr(e, "__notes__", ()), note]


def one_line(e: BaseException) -> str:
    """An exception's message on one line, with its notes (``add_note``: what failed on the way out)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = "; ".join([text, *getattr(e, "__notes__", ())])
    return " ".join(text.split()) or type(e).__name__

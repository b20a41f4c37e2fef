"""The experiments' own error types: what a person can fix (a flag, a file, a run folder) rather
than a bug. Every script catches them in one place (``cli.run_as_script``) and prints one line,
``<script>: error: <message>``, exiting 2 for a usage error (as argparse does) and 1 otherwise.
Any other exception is a bug and keeps its traceback. ``Interrupted`` is no error: the signal that
stops a run, raised where the run can close its books on the way out.
"""

from __future__ import annotations

import signal


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


class StudyError(ExperimentError):
    """study.py cannot go on: a child run failed, or the plan does not fit the budget."""


class MissingDependencyError(ExperimentError):
    """An optional package a flag needs is not installed."""


class NoCheckpointError(RunFolderError, FileNotFoundError):
    """--resume, and the run folder holds no checkpoint."""


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


def one_line(e: BaseException) -> str:
    """An exception's message on one line."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__

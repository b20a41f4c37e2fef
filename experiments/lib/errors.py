"""The experiments' own error types: what a person can fix (a flag, a file, a run folder) rather
than a bug. Every script catches them in one place (``cli.run_as_script``) and prints one line,
``<script>: error: <message>``, exiting 2 for a usage error (as argparse does) and 1 otherwise.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


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

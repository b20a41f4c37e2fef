"""train.py's metrics files: metrics.jsonl (the record) and metrics.csv (the same rows for
spreadsheets), cut back to the resumed step on --resume, optionally mirrored to Weights & Biases.

Each row is appended whole and synced, or not at all (``files.append``), so the rows a checkpoint
counts on survive a power cut. A resume rewrites both files through a temporary file and a rename: a
kill there leaves the old files or the new ones, never an empty record. A last line torn by a kill in
the middle of an append is dropped, with a warning, by every reader; damage anywhere else is a
``errors.RunFolderError`` naming the line.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.lib import errors, files
from experiments.lib.run.config import TrainConfig

if TYPE_CHECKING:   # (for the annotations alone: a row reads the state, the log needs nothing else of training)
    from experiments.lib.training.state import RunState


class MetricsLog:
    """metrics.jsonl (the record, one row per step and per evaluation) and metrics.csv (the same
    rows for spreadsheets), optionally mirrored to Weights & Biases.

    ``resume_step``: the run continues from the checkpoint of that step, so the rows logged after it
    are dropped (those steps run again), and so is the final evaluation's (a run killed after it but
    before its summary.json scores the adapter again); otherwise the run starts both files afresh.
    ``write`` False (data-parallel ranks other than 0): nothing is written.
    """

    CSV_FIELDS = ("step", "kind", "loss", "mae", "mae_h1_10", "mae_h11_25", "mae_h26_50", "vs_untrained_mae_diff",
                  "vs_untrained_se", "vs_untrained_better", "vs_untrained_median", "relative_score", "coverage", "lr",
                  "tokens", "flops", "tokens_per_s")

    def __init__(self, out: Path, *, resume_step: int | None = None, write: bool = True,
                 wandb_run: Any = None) -> None:
        self.jsonl, self.csv, self.write, self.wandb_run = out / "metrics.jsonl", out / "metrics.csv", write, wandb_run
        if not write:
            return
        if resume_step is None or not self.jsonl.is_file():
            self.jsonl.unlink(missing_ok=True)
            self.csv.unlink(missing_ok=True)
            return
        # the rows kept, each file replaced whole (the csv rebuilt from metrics.jsonl, in step order); the
        # final evaluation's row goes too: a resumed run always scores the kept adapter again
        rows = [r for r in read_rows(self.jsonl) if r["step"] <= resume_step and r["kind"] != "val_full"]
        files.write_text(self.jsonl, "".join(files.dumps(r) + "\n" for r in rows))
        files.write_text(self.csv, csv_text(rows, header=True))

    def __call__(self, state: RunState, kind: str, loss: float | None, lr: float, **extra: float | None) -> None:
        """One row: the step, the loss of this kind (train, val, val_full; None for val_forecast, whose
        figures are in ``extra``), and the run's totals so far."""
        if not self.write:
            return
        row = {"step": state.step, "kind": kind, "loss": loss, "lr": lr, "tokens": state.tokens,
               "flops": state.flops, **extra}
        files.append(self.jsonl, files.dumps(row) + "\n")  # (strict: a NaN loss is null)
        # (the csv is rebuilt from metrics.jsonl on --resume: it need not survive a power cut)
        files.append(self.csv, csv_text([row], header=not self.csv.exists()), sync=False)
        if self.wandb_run:
            figures = {"loss": loss, **{k: v for k, v in extra.items() if not isinstance(v, dict)}}
            self.wandb_run.log({f"{kind}/{k}": v for k, v in figures.items() if v is not None} | {"flops": state.flops},
                               step=state.step)


def csv_text(rows: list[dict], *, header: bool) -> str:
    """metrics.csv's lines for ``rows`` (its header first, if ``header``): the paired difference to the
    untrained model flattened into four columns (mean, SE, systems better, median)."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=MetricsLog.CSV_FIELDS, extrasaction="ignore")
    if header:
        w.writeheader()
    for row in rows:
        paired = row.get("vs_untrained") or {}
        w.writerow(row | {f"vs_untrained_{k}": paired.get(k) for k in ("mae_diff", "se", "better", "median")})
    return buf.getvalue()


def read_rows(path: Path, kind: str | None = None) -> list[dict]:
    """The rows of a metrics.jsonl (``path``: the file, or the run folder holding it), in file
    order; with ``kind`` ("train", "val", "val_forecast", "val_full") only the rows of that kind.

    A last line that is not a JSON object (torn by a kill in the middle of an append: what it held was
    not recorded) is dropped with a warning; any other such line is ``errors.RunFolderError`` naming it."""
    path = path / "metrics.jsonl" if path.is_dir() else path
    lines = [(i, line) for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    rows = []
    for i, line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif i == lines[-1][0]:
            warnings.warn(f"{path}: line {i} is torn (a kill in the middle of writing it) and is dropped: "
                          f"{line[:80]!r}", stacklevel=2)
        else:
            raise errors.RunFolderError(f"{path}: line {i} is not a metrics row ({line[:80]!r}); only the last line "
                                        f"can be torn by a kill, so the file was damaged otherwise: remove the line, "
                                        f"or start the run afresh with --overwrite")
    return rows if kind is None else [r for r in rows if r.get("kind") == kind]


def start_wandb(cfg: TrainConfig) -> Any:
    """A Weights & Biases run (wandb is an optional dependency, imported only when asked for)."""
    try:
        import wandb
    except ImportError:
        raise errors.MissingDependencyError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project="qwen-lora-ts", name=cfg.run_name, config=asdict(cfg), resume="allow")

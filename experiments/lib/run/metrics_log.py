"""train.py's metrics files: metrics.jsonl (the record) and metrics.csv (the same rows for
spreadsheets), cut back to the resumed step on --resume, optionally mirrored to Weights & Biases.
"""

from __future__ import annotations

import csv
import json
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
    are dropped (those steps run again); otherwise the run starts both files afresh.
    ``write`` False (data-parallel ranks other than 0): nothing is written.
    """

    CSV_FIELDS = ("step", "kind", "loss", "mae", "mae_h1_10", "mae_h11_25", "mae_h26_50", "vs_untrained_mae_diff",
                  "vs_untrained_se", "relative_score", "coverage", "lr", "tokens", "flops", "tokens_per_s")

    def __init__(self, out: Path, *, resume_step: int | None = None, write: bool = True,
                 wandb_run: Any = None) -> None:
        self.jsonl, self.csv, self.write, self.wandb_run = out / "metrics.jsonl", out / "metrics.csv", write, wandb_run
        if not write:
            return
        self.csv.unlink(missing_ok=True)  # rebuilt from metrics.jsonl below, in step order
        if resume_step is None or not self.jsonl.is_file():
            self.jsonl.unlink(missing_ok=True)
            return
        rows = [r for r in read_rows(self.jsonl) if r["step"] <= resume_step]
        self.jsonl.write_text("".join(files.dumps(r) + "\n" for r in rows))
        for row in rows:
            self._csv_row(row)

    def __call__(self, state: RunState, kind: str, loss: float | None, lr: float, **extra: float | None) -> None:
        """One row: the step, the loss of this kind (train, val, val_full; None for val_forecast, whose
        figures are in ``extra``), and the run's totals so far."""
        if not self.write:
            return
        row = {"step": state.step, "kind": kind, "loss": loss, "lr": lr, "tokens": state.tokens,
               "flops": state.flops, **extra}
        with open(self.jsonl, "a") as f:
            f.write(files.dumps(row) + "\n")  # (strict: a NaN loss is null)
        self._csv_row(row)
        if self.wandb_run:
            figures = {"loss": loss, **{k: v for k, v in extra.items() if not isinstance(v, dict)}}
            self.wandb_run.log({f"{kind}/{k}": v for k, v in figures.items() if v is not None} | {"flops": state.flops},
                               step=state.step)

    def _csv_row(self, row: dict) -> None:
        new = not self.csv.exists()
        paired = row.get("vs_untrained") or {}
        row = row | {"vs_untrained_mae_diff": paired.get("mae_diff"), "vs_untrained_se": paired.get("se")}
        with open(self.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.CSV_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def read_rows(path: Path, kind: str | None = None) -> list[dict]:
    """The rows of a metrics.jsonl (``path``: the file, or the run folder holding it), in file
    order; with ``kind`` ("train", "val", "val_forecast", "val_full") only the rows of that kind."""
    path = path / "metrics.jsonl" if path.is_dir() else path
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows if kind is None else [r for r in rows if r.get("kind") == kind]


def start_wandb(cfg: TrainConfig) -> Any:
    """A Weights & Biases run (wandb is an optional dependency, imported only when asked for)."""
    try:
        import wandb
    except ImportError:
        raise errors.MissingDependencyError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project="qwen-lora-ts", name=cfg.run_name, config=asdict(cfg), resume="allow")

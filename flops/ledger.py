"""The budget ledger: one JSON line per experiment entry, appended atomically, summed against the budget.

Appending (``Ledger.append``): the file is opened O_APPEND, locked with ``flock`` (exclusive), the
entry is written with a single ``os.write`` of one complete line, ``fsync``-ed, then unlocked. Two
processes appending at once therefore never interleave or lose a line. If a writer was killed
mid-write, the file ends without a newline; the next append first terminates that torn line, so its
own entry still starts on a line of its own.

Reading (``Ledger.entries``): every line that is not a complete JSON entry (a torn last line, or a
torn line terminated by a later append) is skipped and reported in ``Ledger.problems`` and by a
warning — the rest of the ledger stays readable.

Budget (``Ledger.check``): a run whose planned FLOPs exceed what is left is refused before it
starts with ``BudgetExceeded``, whose message gives the planned, spent, remaining and budget figures.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BUDGET = 1e17


class BudgetExceeded(RuntimeError):  # noqa: N818 (the name experiments/ use)
    """A planned run would spend more FLOPs than are left of the budget."""


@dataclass
class LedgerEntry:
    name: str
    kind: str                 # train, eval, forecast, ...
    flops: float
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0         # when it was written (Unix seconds)


class Ledger:
    def __init__(self, path: str | Path, *, budget: float = DEFAULT_BUDGET) -> None:
        if not budget > 0:
            raise ValueError(f"budget must be positive, got {budget!r}")
        self.path = Path(path)
        self.budget = float(budget)
        self.problems: list[str] = []

    # ---- writing ---------------------------------------------------------------------------------

    def append(self, *, name: str, kind: str, flops: float, tokens: int = 0, steps: int = 0,
               seconds: float = 0.0, config: dict[str, Any] | None = None) -> LedgerEntry:
        """Add one entry atomically (see the module docstring) and return it."""
        if not flops >= 0:
            raise ValueError(f"flops must be >= 0, got {flops!r}")
        entry = LedgerEntry(name=name, kind=kind, flops=float(flops), tokens=int(tokens), steps=int(steps),
                            seconds=float(seconds), config=dict(config or {}), time=time.time())
        line = (json.dumps(asdict(entry), sort_keys=True, default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a killed writer left a torn line
                    line = b"\n" + line
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
                os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        return entry

    # ---- reading ---------------------------------------------------------------------------------

    def entries(self) -> list[LedgerEntry]:
        """Every complete entry, in file order; damaged lines are skipped and listed in ``problems``."""
        self.problems = []
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        out = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            torn = i == len(lines)  # no newline after it: a write that never finished
            try:
                d = json.loads(line)
                out.append(LedgerEntry(**d))  # (complete JSON without its newline still counts)
            except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
                what = "torn last line" if torn else "damaged line"
                self.problems.append(f"{self.path}:{i}: {what} skipped ({len(line)} bytes: {e})")
        for p in self.problems:
            warnings.warn(p, stacklevel=2)
        return out

    def spent(self, *, name: str | None = None, kind: str | None = None, prefix: str | None = None) -> float:
        """FLOPs recorded so far, optionally only for one name, kind or name prefix."""
        return sum(e.flops for e in self.entries()
                   if (name is None or e.name == name) and (kind is None or e.kind == kind)
                   and (prefix is None or e.name.startswith(prefix)))

    def remaining(self) -> float:
        return self.budget - self.spent()

    def check(self, planned: float, *, name: str = "") -> float:
        """Refuse (BudgetExceeded) a run planning more FLOPs than are left; return what is left after it."""
        spent = self.spent()
        left = self.budget - spent
        if planned > left:
            raise BudgetExceeded(
                f"run {name!r} plans {planned:.4e} FLOPs but only {left:.4e} are left of the budget "
                f"{self.budget:.4e} ({spent:.4e} already spent, {spent / self.budget:.2%}; ledger {self.path})")
        return left - planned

    # ---- reports ---------------------------------------------------------------------------------

    _COLUMNS = ("name", "kind", "tokens", "steps", "seconds", "flops", "percent_of_budget")

    def _rows(self) -> list[dict[str, Any]]:
        return [{"name": e.name, "kind": e.kind, "tokens": e.tokens, "steps": e.steps, "seconds": e.seconds,
                 "flops": e.flops, "percent_of_budget": 100 * e.flops / self.budget} for e in self.entries()]

    def report_csv(self) -> str:
        """One row per entry, then a TOTAL row and a REMAINING row."""
        rows = self._rows()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self._COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        total = sum(r["flops"] for r in rows)
        w.writerow({"name": "TOTAL", "kind": "", "tokens": sum(r["tokens"] for r in rows),
                    "steps": sum(r["steps"] for r in rows), "seconds": sum(r["seconds"] for r in rows),
                    "flops": total, "percent_of_budget": 100 * total / self.budget})
        w.writerow({"name": "REMAINING", "kind": "", "tokens": "", "steps": "", "seconds": "",
                    "flops": self.budget - total, "percent_of_budget": 100 * (self.budget - total) / self.budget})
        return buf.getvalue()

    def report_markdown(self) -> str:
        """The per-experiment table with totals by kind, the grand total and the percent of budget."""
        rows = self._rows()
        lines = ["| experiment | kind | tokens | steps | seconds | FLOPs | % of budget |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['name']} | {r['kind']} | {r['tokens']} | {r['steps']} | {r['seconds']:.1f} | "
                         f"{r['flops']:.4e} | {r['percent_of_budget']:.4f}% |")
        by_kind: dict[str, float] = {}
        for r in rows:
            by_kind[r["kind"]] = by_kind.get(r["kind"], 0.0) + r["flops"]
        for kind, f in sorted(by_kind.items()):
            lines.append(f"| **all {kind}** | | | | | {f:.4e} | {100 * f / self.budget:.4f}% |")
        total = sum(r["flops"] for r in rows)
        lines.append(f"| **TOTAL** | | {sum(r['tokens'] for r in rows)} | {sum(r['steps'] for r in rows)} | "
                     f"{sum(r['seconds'] for r in rows):.1f} | {total:.4e} | {100 * total / self.budget:.4f}% |")
        lines.append(f"\nBudget {self.budget:.4e} FLOPs; spent {total:.4e} ({100 * total / self.budget:.4f}%); "
                     f"remaining {self.budget - total:.4e}.")
        for p in self.problems:
            lines.append(f"\nWarning: {p}")
        return "\n".join(lines) + "\n"


__all__ = ["DEFAULT_BUDGET", "BudgetExceeded", "Ledger", "LedgerEntry"]

"""What one line of the FLOP ledger holds, and when a line is damaged (``flops.ledger`` is the protocol).

Each line is one JSON object, written whole (``os.write`` until all of it is written, then ``fsync``;
cut off again if that fails) under an exclusive ``flock`` of the file. ``"type"`` tells the four kinds apart:

    reserve  {"type": "reserve", "id", "name", "kind", "flops": planned, "config", "process", "time"}
    attach   {"type": "attach", "reservation": id, "process", "time"}     (another process charges to it)
    charge   {"type": "charge", "reservation": id or null, "name", "kind", "flops", "tokens", "steps",
              "seconds", "config", "time"}
    close    {"type": "close", "reservation": id, "how": "closed" or "settled", "reason", "time"}

A line without ``"type"`` (the original format: name, kind, flops, tokens, ...) is a charge with no
reservation. ``"process"`` is what ``flops.liveness.this_process`` records. A line that is not JSON, not
an object, of an unknown type, or with a field of the wrong kind (the checks below raise ValueError) is
``Damage``: left out of every figure, and what ``Ledger.repair`` (``python -m flops ledger --repair``) moves aside.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from flops.liveness import all_alive, holders_status


def text_field(d: dict, key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise ValueError(f"field {key!r} must be a string, found {v!r}")
    return v


def amount_field(d: dict, key: str, default: float | None = None, *, integer: bool = False) -> Any:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"field {key!r} must be a finite number >= 0, found {v!r}")
    return v


def mapping_field(d: dict, key: str) -> dict:
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise ValueError(f"field {key!r} must be an object, found {v!r}")
    return v


def check_flops(value: float, what: str) -> float:
    """``value`` as a float, or ValueError unless it is a finite number >= 0 (what every amount must be)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number of FLOPs >= 0, got {value!r}")
    return float(value)


@dataclass
class LedgerEntry:
    """One charge: FLOPs spent by experiment ``name`` on work of ``kind`` (train, eval, forecast, ...)."""

    name: str
    kind: str
    flops: float
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0                 # when it was written (Unix seconds)
    reservation: str | None = None    # the reservation it was charged to; None outside any

    @classmethod
    def from_line(cls, d: dict) -> LedgerEntry:
        rid = d.get("reservation")
        if rid is not None and not isinstance(rid, str):
            raise ValueError(f"field 'reservation' must be a string or null, found {rid!r}")
        return cls(name=text_field(d, "name"), kind=text_field(d, "kind"), flops=float(amount_field(d, "flops")),
                   tokens=amount_field(d, "tokens", 0, integer=True), steps=amount_field(d, "steps", 0, integer=True),
                   seconds=float(amount_field(d, "seconds", 0.0)), config=mapping_field(d, "config"),
                   time=float(amount_field(d, "time", 0.0)), reservation=rid)

    def to_line(self) -> dict[str, Any]:
        return {"type": "charge", "reservation": self.reservation, "name": self.name, "kind": self.kind,
                "flops": self.flops, "tokens": self.tokens, "steps": self.steps, "seconds": self.seconds,
                "config": self.config, "time": self.time}


@dataclass
class ReservationRecord:
    """A reservation as the file tells it: planned FLOPs, what was charged to it, and whether it is open."""

    id: str
    name: str
    kind: str
    planned: float
    config: dict[str, Any]
    time: float
    processes: list[dict[str, Any]]   # the reserving process first, then those that attached
    line: int
    charged: float = 0.0
    status: str = "open"              # open, closed (by its run) or settled (its processes died)
    reason: str = ""

    @classmethod
    def from_line(cls, d: dict, line: int) -> ReservationRecord:
        return cls(id=text_field(d, "id"), name=text_field(d, "name"), kind=text_field(d, "kind"),
                   planned=float(amount_field(d, "flops")), config=mapping_field(d, "config"),
                   time=float(amount_field(d, "time", 0.0)), processes=[mapping_field(d, "process")], line=line)

    @property
    def unspent(self) -> float:
        """What it still holds of the budget: planned minus charged while open, nothing once closed."""
        return max(0.0, self.planned - self.charged) if self.status == "open" else 0.0

    def alive(self) -> bool | None:
        """True if any of its processes lives, False if all are dead, None if that cannot be told here."""
        return all_alive(self.processes)

    def detail(self, ledger: str | os.PathLike) -> str:
        """Its status in words: why it closed, or whether its processes run and what to do if not."""
        return holders_status(self.processes, ledger, self.id) if self.status == "open" else self.reason or self.status


@dataclass
class Damage:
    """A line that is not a valid ledger entry."""

    line: int
    reason: str
    raw: bytes


__all__ = ["Damage", "LedgerEntry", "ReservationRecord", "amount_field", "check_flops", "mapping_field", "text_field"]

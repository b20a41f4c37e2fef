"""The FLOP budget ledger: one JSON-lines file that every run reserves from, charges to and closes
(``flops.ledger_entries``: its lines and their repair; ``flops.ledger_report``: its reports).

``Ledger.reserve`` takes the file's lock, reads it, settles the reservations of dead processes, and
writes its reserve line only if the planned FLOPs fit in what is left, in one locked step, so two runs
started together cannot both take the same remaining budget. The run charges its work as it is spent
(``Reservation.charge``) and ends with ``Reservation.close``, releasing the unspent part:

    left = budget - every charge - the unspent part (planned - charged) of every open reservation

A reservation is a ceiling: a charge that would take what every process has charged to it (read under
the lock) past what it holds (plus 1e-9 of it, for rounding) is refused, ``ReservationExceeded``, and
nothing is written; ``Reservation.fits`` asks before the work. A killed run's reservation stays open
until all its processes are known dead (``flops.liveness``); the next ``reserve`` (or ``python -m flops
ledger --settle``) then settles it: what it charged stays spent, the rest is freed. Where that cannot
be told (another machine, pid namespace or boot) only a person settles it (``--settle-id``).

A damaged line (not a valid entry, e.g. torn by a writer killed mid-write; the next append ends it)
makes every budget figure untrustworthy: ``reserve``, ``spent`` and ``remaining`` raise ``LedgerDamaged``
naming the line and the repair (``Ledger.repair``, ``python -m flops ledger --repair``). Charging and
closing read only the reservation's own lines, so damage elsewhere never stops a run from booking what
it spent; ``snapshot``, ``entries``, ``reservations`` and the reports read what they can.

A line that cannot be written whole (the disk full, an I/O error, a short write that makes no progress)
is cut off again, back to the file's length before it, under the same lock, and ``LedgerWriteError``
says what was not recorded: no partial line is left to pass for (or hide) an entry, and no charge is
lost without the caller being told. A reservation keeps the charges it could not write in ``unrecorded``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flops.ledger_entries import Damage, LedgerEntry, ReservationRecord, check_flops, mapping_field, text_field
from flops.liveness import describe, this_process

DEFAULT_BUDGET = 1e17
DEFAULT_LEDGER = "runs/ledger.jsonl"
ROUNDING = 1e-9  # what a charge may exceed its reservation by, relative to it


class LedgerError(Exception):
    """The ledger refused: the base of its own exceptions."""


class BudgetExceeded(LedgerError):  # noqa: N818 (the name experiments/ use)
    """A planned run would spend more FLOPs than are left of the budget."""


class LedgerDamaged(LedgerError):  # noqa: N818 (reads as the state it reports)
    """The ledger holds lines that are not valid entries, so no budget figure can be trusted until repaired."""


class ReservationExceeded(LedgerError):  # noqa: N818 (reads like BudgetExceeded)
    """A charge would take a reservation past the FLOPs it holds; it was not written."""


class LedgerWriteError(LedgerError):
    """A line could not be written whole (disk full, I/O error); the ledger was cut back to what it held before,
    so the entry (``what``: reserve, attach, charge or close, of ``flops`` to ``reservation``) is not recorded."""

    def __init__(self, message: str, *, path: Path, what: str, reservation: str | None, flops: float | None) -> None:
        super().__init__(message)
        self.path, self.what, self.reservation, self.flops = path, what, reservation, flops


@dataclass
class Snapshot:
    """What the file held when read (under one lock): charges, reservations, damaged lines, the good lines."""

    charges: list[LedgerEntry] = field(default_factory=list)
    reservations: dict[str, ReservationRecord] = field(default_factory=dict)
    damage: list[Damage] = field(default_factory=list)
    good_lines: list[bytes] = field(default_factory=list)

    def spent(self) -> float:
        return sum(e.flops for e in self.charges)

    def reserved(self) -> float:
        return sum(r.unspent for r in self.reservations.values())

    def open(self) -> list[ReservationRecord]:
        return [r for r in self.reservations.values() if r.status == "open"]

    def in_order(self) -> list[ReservationRecord]:
        return sorted(self.reservations.values(), key=lambda r: r.line)


def _parse(raw: bytes) -> Snapshot:
    state = Snapshot()
    closes: list[tuple[str, str, str]] = []
    lines = raw.split(b"\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if not isinstance(d, dict):
                raise ValueError(f"a JSON {type(d).__name__}, not an object")
            kind = d.get("type", "charge")  # no type: the original format, a plain charge
            if kind == "charge":
                state.charges.append(LedgerEntry.from_line(d))
            elif kind == "reserve":
                r = ReservationRecord.from_line(d, i)
                if r.id in state.reservations:
                    raise ValueError(f"reservation id {r.id!r} already used on line {state.reservations[r.id].line}")
                state.reservations[r.id] = r
            elif kind == "attach":
                rid = text_field(d, "reservation")
                if rid in state.reservations:  # (one whose reserve line was damaged and moved away: nothing to do)
                    state.reservations[rid].processes.append(mapping_field(d, "process"))
            elif kind == "close":
                how = text_field(d, "how")
                if how not in ("closed", "settled"):
                    raise ValueError(f"field 'how' must be 'closed' or 'settled', found {how!r}")
                closes.append((text_field(d, "reservation"), how, str(d.get("reason", ""))))
            else:
                raise ValueError(f"unknown entry type {kind!r}")
        except (ValueError, UnicodeDecodeError) as e:  # (json.JSONDecodeError is a ValueError)
            last = i == len(lines)  # no newline after it: its writer never finished
            what = "unterminated last line, its writer killed mid-write?" if last else "not a ledger entry"
            state.damage.append(Damage(line=i, reason=f"{what}: {e}", raw=line))
            continue
        state.good_lines.append(line)
    for rid, how, reason in closes:
        r = state.reservations.get(rid)
        if r is not None and r.status == "open":  # the first close counts
            r.status, r.reason = how, reason
    for e in state.charges:
        if e.reservation in state.reservations:
            state.reservations[e.reservation].charged += e.flops
    return state


# ---- the ledger ---------------------------------------------------------------------------------


class Ledger:
    """The budget file at ``path``: ``reserve`` before a run, charge its work, close it (module docstring)."""

    def __init__(self, path: str | os.PathLike, *, budget: float = DEFAULT_BUDGET) -> None:
        if not budget > 0:
            raise ValueError(f"budget must be positive, got {budget!r}")
        self.path = Path(path)
        self.budget = float(budget)
        self.problems: list[str] = []  # the damaged lines the last read met

    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool, create: bool = False) -> Iterator[int | None]:
        """The file's descriptor under flock, exclusive or shared; None if there is no file (and not ``create``).
        ``repair`` replaces the file: whoever waited on the old one's lock opens the new one."""
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = (os.O_RDWR | os.O_APPEND | (os.O_CREAT if create else 0)) if exclusive else os.O_RDONLY
        while True:
            try:
                fd = os.open(self.path, flags, 0o644)
            except FileNotFoundError:
                if create:
                    raise
                yield None
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                try:
                    now = os.stat(self.path)
                    current = (now.st_dev, now.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
                except FileNotFoundError:
                    current = False
                if current:
                    yield fd
                    return
            finally:
                os.close(fd)  # (closing releases the lock)

    @staticmethod
    def _bytes(fd: int | None) -> bytes:
        if fd is None:
            return b""
        size, data = os.fstat(fd).st_size, b""  # (no writer runs while the lock is held)
        while len(data) < size and (chunk := os.pread(fd, size - len(data), len(data))):
            data += chunk
        return data

    def _read(self, fd: int | None) -> Snapshot:
        state = _parse(self._bytes(fd))
        self.problems = [f"{self.path}:{d.line}: {d.reason}" for d in state.damage]
        return state

    def _write(self, fd: int, record: dict[str, Any]) -> None:
        """Append one complete line (the lock is held). A record the reader would reject is refused
        here instead, so no caller can damage the ledger by passing, say, a name that is not a string.
        A line that cannot be written whole is cut off again: LedgerWriteError (module docstring)."""
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        bad = _parse(line).damage
        if bad:
            raise ValueError(f"{self.path}: refusing to write an invalid entry ({bad[0].reason.split(': ', 1)[1]}): "
                             f"{record!r}")
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a killed writer left a torn line: end it first
            line = b"\n" + line
        try:
            rest = memoryview(line)
            while rest:  # (a write may take less than asked: the rest goes after it, O_APPEND, the lock held)
                written = os.write(fd, rest)
                if not written:
                    raise OSError(errno.EIO, f"wrote 0 of the {len(rest)} bytes left of the line")
                rest = rest[written:]
            os.fsync(fd)
        except OSError as e:
            raise self._unwritten(fd, size, record, e) from e

    def _unwritten(self, fd: int, size: int, record: dict[str, Any], error: OSError) -> LedgerWriteError:
        """Cut the file back to ``size`` bytes after a failed append (the lock is held), and the error that says so."""
        what = str(record.get("type", "charge"))
        rid = record.get("id") if what == "reserve" else record.get("reservation")
        amount = record.get("flops")
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
            after = f"the ledger was cut back to its {size} bytes before it"
        except OSError as e:
            after = (f"cutting the partial line off failed too ({e.strerror or e}), so its last line may be torn "
                     f"(python -m flops ledger --ledger {self.path} --repair moves it aside)")
        of = f" of {amount:.6e} FLOPs" if isinstance(amount, (int, float)) else ""
        name = f", {record['name']!r}" if record.get("name") else ""
        to = f" ({'id' if what == 'reserve' else 'reservation'} {rid}{name})" if rid else ""
        return LedgerWriteError(
            f"{self.path}: could not write the {what} line{of}{to}: {error.strerror or error}; {after}; "
            f"the {what} is NOT recorded", path=self.path, what=what, reservation=rid,
            flops=float(amount) if isinstance(amount, (int, float)) else None)

    def _refuse_damage(self, state: Snapshot) -> None:
        if state.damage:
            where = "; ".join(f"{self.path}:{d.line}: {d.reason}" for d in state.damage[:5])
            more = f" (and {len(state.damage) - 5} more)" if len(state.damage) > 5 else ""
            raise LedgerDamaged(
                f"the FLOP ledger has {len(state.damage)} damaged line(s), so its budget figures cannot be "
                f"trusted: {where}{more}. Look at them, then repair: python -m flops ledger --ledger {self.path} "
                f"--repair (moves the damaged lines to {self.path}.damaged and keeps every other line)")

    def _settled(self, fd: int | None) -> Snapshot:
        """The file (the exclusive lock is held), refused if damaged, with dead processes' reservations settled."""
        state = self._read(fd)
        self._refuse_damage(state)
        self._settle_dead(fd, state)
        return state

    def _settle_dead(self, fd: int | None, state: Snapshot) -> list[ReservationRecord]:
        """Close every open reservation all of whose processes are known dead (the lock is held)."""
        dead = [r for r in state.open() if fd is not None and r.alive() is False]  # (no file: none to settle)
        for r in dead:
            r.status, r.reason = "settled", f"settled after its process died ({describe(r.processes)})"
            self._write(fd, {"type": "close", "reservation": r.id, "how": "settled", "reason": r.reason,
                             "time": time.time()})
        return dead

    def left(self, state: Snapshot) -> float:
        """What ``state`` leaves of the budget: budget - charges - open reservations' unspent parts."""
        return self.budget - state.spent() - state.reserved()

    def reserve(self, planned: float, *, name: str, kind: str, config: dict[str, Any] | None = None) -> Reservation:
        """Hold ``planned`` FLOPs for a run, or refuse (BudgetExceeded) if they are not left; one locked step.
        Refuses (LedgerDamaged) on a damaged ledger. Settles dead processes' reservations first."""
        planned = check_flops(planned, "planned")
        rid = uuid.uuid4().hex[:16]
        with self._locked(exclusive=True, create=True) as fd:
            state = self._settled(fd)
            left = self.left(state)
            if planned > left:
                spent, held = state.spent(), state.reserved()
                holders = "".join(f"; {r.id} {r.name!r} holds {r.unspent:.4e} ({r.detail(self.path)})"
                                  for r in state.open())
                raise BudgetExceeded(
                    f"run {name!r} plans {planned:.4e} FLOPs but only {left:.4e} are left of the budget "
                    f"{self.budget:.4e} ({spent:.4e} already spent, {spent / self.budget:.2%}; {held:.4e} held by "
                    f"open reservations{holders}; ledger {self.path})")
            assert fd is not None
            self._write(fd, {"type": "reserve", "id": rid, "name": name, "kind": kind, "flops": planned,
                             "config": dict(config or {}), "process": this_process(), "time": time.time()})
        return Reservation(self, rid, name=name, kind=kind, planned=planned)

    def attach(self, reservation_id: str) -> Reservation:
        """A handle to charge an open reservation made by another process (e.g. a study's, from a run it
        starts). This process is recorded with it, so the reservation is settled only when all are dead."""
        with self._locked(exclusive=True) as fd:
            r = self._open_reservation(fd, reservation_id)
            self._write(fd, {"type": "attach", "reservation": r.id, "process": this_process(), "time": time.time()})
        return Reservation(self, r.id, name=r.name, kind=r.kind, planned=r.planned, charged=r.charged, owner=False)

    def _open_reservation(self, fd: int | None, reservation_id: str) -> ReservationRecord:
        """The open reservation ``reservation_id`` (under the caller's lock), or KeyError / ValueError."""
        r = self._read(fd).reservations.get(reservation_id)
        if r is None or fd is None:
            raise KeyError(f"{self.path}: no reservation {reservation_id!r}")
        if r.status != "open":
            raise ValueError(f"{self.path}: reservation {reservation_id!r} ({r.name!r}) is {r.status}: {r.reason}")
        return r

    def _charged(self, fd: int | None, reservation_id: str) -> float:
        """FLOPs charged to one reservation so far, by every process (under the caller's lock). Only the
        lines that name it are parsed: cheap on a long ledger, and blind to damage elsewhere."""
        key = json.dumps(reservation_id).encode()
        mine = b"\n".join(line for line in self._bytes(fd).split(b"\n") if key in line)
        return sum(e.flops for e in _parse(mine).charges if e.reservation == reservation_id)

    def _charge(self, r: Reservation, entry: LedgerEntry) -> float:
        """Write ``entry`` to reservation ``r`` if it fits (else ReservationExceeded, nothing written); what
        the reservation has been charged in all, this entry included."""
        with self._locked(exclusive=True, create=True) as fd:
            assert fd is not None
            charged = self._charged(fd, r.id)
            if not _fits(charged, entry.flops, r.planned):
                raise ReservationExceeded(
                    f"{self.path}: reservation {r.id} ({r.name!r}) holds {r.planned:.6e} FLOPs and has been charged "
                    f"{charged:.6e}; refusing a charge of {entry.flops:.6e} ({entry.name!r}, {entry.kind}), which "
                    f"would take it {charged + entry.flops - r.planned:.6e} past what it holds; nothing was written")
            self._write(fd, entry.to_line())
        return charged + entry.flops

    def settle(self) -> list[ReservationRecord]:
        """Close the open reservations whose processes are all known dead; return them. Works on a damaged
        ledger (it only reads reservations, and writes closes)."""
        with self._locked(exclusive=True) as fd:
            return self._settle_dead(fd, self._read(fd))

    def settle_by_hand(self, reservation_id: str) -> ReservationRecord:
        """Settle one open reservation whose processes cannot be checked from here, for a person who knows
        they have ended. Refused while any of them is seen running."""
        with self._locked(exclusive=True) as fd:
            r = self._open_reservation(fd, reservation_id)
            if r.alive():
                raise ValueError(f"{self.path}: reservation {reservation_id!r} ({r.name!r}) belongs to a running "
                                 f"process ({describe(r.processes)}); it closes it itself")
            reason = f"settled by hand ({describe(r.processes)} could not be checked)"
            self._write(fd, {"type": "close", "reservation": r.id, "how": "settled", "reason": reason,
                             "time": time.time()})
            r.status, r.reason = "settled", reason
            return r

    def repair(self) -> list[Damage]:
        """Move every damaged line to ``<ledger>.damaged`` and keep every other line, byte for byte; return them.

        The kept lines go to a new file that atomically replaces the ledger (a crash leaves either the old
        file or the new one); the damaged ones are appended and synced to the side file first. Appenders
        waiting on the old file's lock then open the new one (``_locked``)."""
        with self._locked(exclusive=True) as fd:
            state = self._read(fd)
            if fd is None or not state.damage:
                return []
            side = self.path.with_name(self.path.name + ".damaged")
            tmp = self.path.with_name(self.path.name + ".repair-tmp")
            for where, mode, lines in ((side, "ab", [d.raw for d in state.damage]), (tmp, "wb", state.good_lines)):
                with open(where, mode) as f:
                    f.write(b"".join(line + b"\n" for line in lines))
                    f.flush()
                    os.fsync(f.fileno())
            os.chmod(tmp, os.fstat(fd).st_mode & 0o777)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self.problems = []
        return state.damage

    # ---- budget figures (refused on a damaged ledger), and what can be read (damage listed) ---------

    def spent(self) -> float:
        """FLOPs charged so far."""
        state = self.snapshot()
        self._refuse_damage(state)
        return state.spent()

    def remaining(self) -> float:
        """``left``: budget - charges - open reservations' unspent parts (after settling dead processes')."""
        with self._locked(exclusive=True) as fd:
            return self.left(self._settled(fd))

    def snapshot(self) -> Snapshot:
        """Everything readable, under one shared lock; damaged lines are in ``damage`` and ``problems``."""
        with self._locked(exclusive=False) as fd:
            return self._read(fd)

    def entries(self) -> list[LedgerEntry]:
        """Every readable charge in file order; damaged lines are skipped, warned about and listed in ``problems``."""
        state = self.snapshot()
        for p in self.problems:
            warnings.warn(p, stacklevel=2)
        return state.charges

    def reservations(self) -> list[ReservationRecord]:
        """Every readable reservation in file order, with what was charged to it and its status."""
        return self.snapshot().in_order()


def _fits(charged: float, flops: float, planned: float) -> bool:
    return charged + flops <= planned + ROUNDING * planned


class Reservation:
    """A run's hold on part of the budget, and its ceiling: ``fits`` before work, ``charge`` it when done,
    ``close`` at the end (as a context manager: on leaving, an exception included)."""

    def __init__(self, ledger: Ledger, id: str, *, name: str, kind: str, planned: float, charged: float = 0.0,
                 owner: bool = True) -> None:
        self.ledger, self.id, self.name, self.kind = ledger, id, name, kind
        self.planned, self.charged = planned, charged  # charged: as of this handle's last charge or look
        self.owner = owner  # made by this process (only the owner closes it)
        self.closed = False
        self.unrecorded: list[LedgerEntry] = []  # charges that could not be written (LedgerWriteError)

    def charge(self, flops: float, *, tokens: int = 0, steps: int = 0, seconds: float = 0.0, name: str | None = None,
               kind: str | None = None, config: dict[str, Any] | None = None) -> LedgerEntry:
        """Book FLOPs spent under this reservation (name and kind default to the reservation's; periodic
        evaluations in a training run are kind "eval"). Raises ReservationExceeded, writing nothing, if
        the charges of every process would go past what it holds; LedgerWriteError if the line could not
        be written (the entry is then kept in ``unrecorded``)."""
        entry = LedgerEntry(name=name or self.name, kind=kind or self.kind, flops=check_flops(flops, "flops"),
                            tokens=int(tokens), steps=int(steps), seconds=float(seconds), config=dict(config or {}),
                            time=time.time(), reservation=self.id)
        try:
            self.charged = self.ledger._charge(self, entry)
        except LedgerWriteError:
            self.unrecorded.append(entry)
            raise
        return entry

    def left(self) -> float:
        """What it still holds: planned minus what every process has charged to it, read from the file."""
        with self.ledger._locked(exclusive=False) as fd:
            self.charged = self.ledger._charged(fd, self.id)
        return max(0.0, self.planned - self.charged)

    def fits(self, flops: float) -> bool:
        """Whether a charge of ``flops`` would be accepted now: ask before doing the work."""
        self.left()
        return _fits(self.charged, check_flops(flops, "flops"), self.planned)

    def close(self) -> None:
        """Release what was not charged (idempotent)."""
        if self.closed:
            return
        if not self.owner:
            raise RuntimeError(f"reservation {self.id} ({self.name!r}) was attached, not made, by this process: "
                               f"the process that reserved it closes it")
        try:
            with self.ledger._locked(exclusive=True, create=True) as fd:
                assert fd is not None
                self.ledger._write(fd, {"type": "close", "reservation": self.id, "how": "closed",
                                        "reason": "closed by its run", "time": time.time()})
        except LedgerWriteError as e:
            if not self.unrecorded:
                raise
            lost = sum(x.flops for x in self.unrecorded)
            raise LedgerWriteError(
                f"{e}; besides, {len(self.unrecorded)} charge(s) to it of {lost:.6e} FLOPs in all could not be written "
                "earlier in this process (Reservation.unrecorded; any booked again since are in the ledger)",
                path=e.path, what=e.what, reservation=e.reservation, flops=e.flops) from e
        self.closed = True

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owner:
            self.close()


__all__ = ["DEFAULT_BUDGET", "DEFAULT_LEDGER", "ROUNDING", "BudgetExceeded", "Damage", "Ledger", "LedgerDamaged",
           "LedgerEntry", "LedgerError", "LedgerWriteError", "Reservation", "ReservationExceeded", "ReservationRecord",
           "Snapshot"]

"""The FLOP budget ledger: one JSON-lines file that every run reserves from, charges to and settles.

File format: one JSON object per line, each written whole (one ``os.write``, then ``fsync``) under an
exclusive ``flock`` of the file. ``"type"`` tells the four kinds apart:

    reserve  {"type": "reserve", "id", "name", "kind", "flops": planned, "config", "process", "time"}
    attach   {"type": "attach", "reservation": id, "process", "time"}     (another process charges to it)
    charge   {"type": "charge", "reservation": id or null, "name", "kind", "flops", "tokens", "steps",
              "seconds", "config", "time"}
    close    {"type": "close", "reservation": id, "how": "closed" or "settled", "reason", "time"}

A line without ``"type"`` (the original format: name, kind, flops, tokens, ...) is a charge with no
reservation. ``"process"`` is {pid, start (from /proc/<pid>/stat, so a reused pid is told apart), host,
boot (the kernel's boot id), pidns (the pid namespace)}.

Protocol. ``Ledger.reserve`` takes the lock, reads the file, settles the reservations of dead processes,
and writes its reserve line only if the planned FLOPs fit in what is left: check and reservation are one
step, so two runs started together cannot both take the same remaining budget. The run books its work as
it is spent (``Reservation.charge``) and ends with ``Reservation.close``, releasing the unspent part.

    left = budget - every charge - the unspent part (planned - charged) of every open reservation

A run killed without closing leaves its reservation open. The next ``reserve``/``check`` (or ``python -m
flops ledger --settle``) closes it as settled once all its processes are known to be dead, so what it
charged stays spent and the rest is freed. Whether a process lives can only be told on the machine (and
pid namespace, and boot) it ran on; elsewhere its reservation stays open and is reported, and only a
person who knows it has ended settles it (``--settle-id``). A live process's reservation is never settled.

Damage. A line that is not a valid entry (e.g. torn by a writer killed mid-write; the next append
terminates it, so that append's own line stays whole) makes every budget figure untrustworthy:
``reserve``, ``check``, ``spent``, ``reserved`` and ``remaining`` raise ``LedgerDamaged``, naming the file,
the line and the repair command (``python -m flops ledger --repair`` moves damaged lines to
``<ledger>.damaged``). Charging and closing never read the file, so damage never stops a running run
from booking what it spent. ``entries``, ``reservations`` and the reports read what they can and list
the problems.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import io
import json
import math
import os
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BUDGET = 1e17
DEFAULT_LEDGER = "runs/ledger.jsonl"


class BudgetExceeded(RuntimeError):  # noqa: N818 (the name experiments/ use)
    """A planned run would spend more FLOPs than are left of the budget."""


class LedgerDamaged(RuntimeError):  # noqa: N818 (reads as the state it reports)
    """The ledger holds lines that are not valid entries, so no budget figure can be trusted until repaired."""


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

    @property
    def unspent(self) -> float:
        """What it still holds of the budget: planned minus charged while open, nothing once closed."""
        return max(0.0, self.planned - self.charged) if self.status == "open" else 0.0

    def alive(self) -> bool | None:
        """True if any of its processes lives, False if all are dead, None if that cannot be told here."""
        states = [process_alive(p) for p in self.processes]
        if any(s is True for s in states):
            return True
        return None if any(s is None for s in states) else False


@dataclass
class Damage:
    """A line that is not a valid ledger entry."""

    line: int
    reason: str
    raw: bytes


# ---- processes: who holds a reservation, and whether it still lives ---------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc/<pid>/stat; None if none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name (field 2) may hold spaces
    return fields[0], int(fields[19])             # fields 3 and 22 of proc(5)


@functools.cache
def _machine() -> dict[str, str | None]:
    """Where pids mean something: the host, the running kernel (a reboot reuses pids) and the pid namespace."""
    def read(how: Any, path: str) -> str | None:
        try:
            return how(path).strip()
        except OSError:
            return None

    return {"host": socket.gethostname(),
            "boot": read(lambda p: Path(p).read_text(), "/proc/sys/kernel/random/boot_id"),
            "pidns": read(os.readlink, "/proc/self/ns/pid")}


def this_process() -> dict[str, Any]:
    """The identity recorded with a reservation: pid, its start time, and the machine it is meaningful on."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {"pid": pid, "start": stat[1] if stat else None, **_machine()}


def process_alive(process: dict[str, Any]) -> bool | None:
    """Whether a recorded process still runs: None when this machine cannot tell (another host, namespace
    or boot); False when its pid is gone, now belongs to a later process, or is a zombie."""
    if any(process.get(k) != v for k, v in _machine().items()):
        return None
    pid = process.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    stat = _proc_stat(pid)
    if stat is None:  # no /proc entry: gone, unless /proc hides it (hidepid) or there is no /proc at all
        try:
            os.kill(pid, 0)  # signal 0 only asks whether the pid exists
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True  # it exists, but its start time cannot be read: the safe side is "alive"
    state, start = stat
    if process.get("start") is not None and start != process["start"]:
        return False
    return state not in ("Z", "X")


def _describe(process: dict[str, Any]) -> str:
    return f"pid {process.get('pid')} on {process.get('host')}"


# ---- parsing ------------------------------------------------------------------------------------


def _text(d: dict, key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise ValueError(f"field {key!r} must be a string, found {v!r}")
    return v


def _amount(d: dict, key: str, default: float | None = None, *, integer: bool = False) -> Any:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"field {key!r} must be a finite number >= 0, found {v!r}")
    return v


def _mapping(d: dict, key: str) -> dict:
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise ValueError(f"field {key!r} must be an object, found {v!r}")
    return v


@dataclass
class _State:
    charges: list[LedgerEntry] = field(default_factory=list)
    reservations: dict[str, ReservationRecord] = field(default_factory=dict)
    damage: list[Damage] = field(default_factory=list)
    good_lines: list[bytes] = field(default_factory=list)

    def spent(self, name: str | None = None, kind: str | None = None, prefix: str | None = None) -> float:
        return sum(e.flops for e in self.charges if _matches(e, name, kind, prefix))

    def reserved(self, name: str | None = None, kind: str | None = None, prefix: str | None = None) -> float:
        return sum(r.unspent for r in self.reservations.values() if _matches(r, name, kind, prefix))

    def open(self) -> list[ReservationRecord]:
        return [r for r in self.reservations.values() if r.status == "open"]


def _matches(e: LedgerEntry | ReservationRecord, name: str | None, kind: str | None, prefix: str | None) -> bool:
    return ((name is None or e.name == name) and (kind is None or e.kind == kind)
            and (prefix is None or e.name.startswith(prefix)))


def _parse(raw: bytes) -> _State:
    state = _State()
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
                rid = d.get("reservation")
                if rid is not None and not isinstance(rid, str):
                    raise ValueError(f"field 'reservation' must be a string or null, found {rid!r}")
                state.charges.append(LedgerEntry(
                    name=_text(d, "name"), kind=_text(d, "kind"), flops=float(_amount(d, "flops")),
                    tokens=_amount(d, "tokens", 0, integer=True), steps=_amount(d, "steps", 0, integer=True),
                    seconds=float(_amount(d, "seconds", 0.0)), config=_mapping(d, "config"),
                    time=float(_amount(d, "time", 0.0)), reservation=rid))
            elif kind == "reserve":
                rid = _text(d, "id")
                if rid in state.reservations:
                    raise ValueError(f"reservation id {rid!r} already used on line {state.reservations[rid].line}")
                state.reservations[rid] = ReservationRecord(
                    id=rid, name=_text(d, "name"), kind=_text(d, "kind"), planned=float(_amount(d, "flops")),
                    config=_mapping(d, "config"), time=float(_amount(d, "time", 0.0)),
                    processes=[_mapping(d, "process")], line=i)
            elif kind == "attach":
                rid = _text(d, "reservation")
                if rid in state.reservations:  # (one whose reserve line was damaged and moved away: nothing to do)
                    state.reservations[rid].processes.append(_mapping(d, "process"))
            elif kind == "close":
                how = _text(d, "how")
                if how not in ("closed", "settled"):
                    raise ValueError(f"field 'how' must be 'closed' or 'settled', found {how!r}")
                closes.append((_text(d, "reservation"), how, str(d.get("reason", ""))))
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


def _check_flops(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number of FLOPs >= 0, got {value!r}")
    return float(value)


# ---- the ledger ---------------------------------------------------------------------------------


class Ledger:
    """The budget file at ``path``: ``reserve`` before a run, charge its work, close it (module docstring)."""

    def __init__(self, path: str | os.PathLike, *, budget: float = DEFAULT_BUDGET) -> None:
        if not budget > 0:
            raise ValueError(f"budget must be positive, got {budget!r}")
        self.path = Path(path)
        self.budget = float(budget)
        self.problems: list[str] = []  # the damaged lines the last read met

    # ---- the file: locked access ------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool, create: bool = False) -> Iterator[int | None]:
        """The file's descriptor under flock, exclusive or shared; None if there is no file (and not ``create``).

        ``repair`` replaces the file; whoever waited for the lock on the old one opens the new one, so
        nothing is ever written to a file that is no longer the ledger."""
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

    def _read(self, fd: int | None) -> _State:
        if fd is None:
            return _State()
        size, chunks, offset = os.fstat(fd).st_size, [], 0
        while offset < size:
            chunk = os.pread(fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        state = _parse(b"".join(chunks))
        self.problems = [f"{self.path}:{d.line}: {d.reason}" for d in state.damage]
        return state

    def _write(self, fd: int, record: dict[str, Any]) -> None:
        """Append one complete line (the lock is held). A record the reader would reject is refused
        here instead, so no caller can damage the ledger by passing, say, a name that is not a string."""
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        bad = _parse(line).damage
        if bad:
            raise ValueError(f"{self.path}: refusing to write an invalid entry ({bad[0].reason.split(': ', 1)[1]}): "
                             f"{record!r}")
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a killed writer left a torn line: end it first
            line = b"\n" + line
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
        os.fsync(fd)

    def _append(self, record: dict[str, Any]) -> None:
        """Append without reading: what charges, attaches and closes use, so damage never stops them."""
        with self._locked(exclusive=True, create=True) as fd:
            assert fd is not None
            self._write(fd, record)

    def _refuse_damage(self, state: _State) -> None:
        if state.damage:
            where = "; ".join(f"{self.path}:{d.line}: {d.reason}" for d in state.damage[:5])
            more = f" (and {len(state.damage) - 5} more)" if len(state.damage) > 5 else ""
            raise LedgerDamaged(
                f"the FLOP ledger has {len(state.damage)} damaged line(s), so its budget figures cannot be "
                f"trusted: {where}{more}. Look at them, then repair: python -m flops ledger --ledger {self.path} "
                f"--repair (moves the damaged lines to {self.path}.damaged and keeps every other line)")

    def _settle_dead(self, fd: int | None, state: _State) -> list[ReservationRecord]:
        """Close every open reservation all of whose processes are known dead (the lock is held)."""
        settled: list[ReservationRecord] = []
        if fd is None:  # no file, nothing to settle
            return settled
        for r in state.open():
            if r.alive() is False:
                reason = f"settled after its process died ({', '.join(_describe(p) for p in r.processes)})"
                self._write(fd, {"type": "close", "reservation": r.id, "how": "settled", "reason": reason,
                                 "time": time.time()})
                r.status, r.reason = "settled", reason
                settled.append(r)
        return settled

    def _left(self, state: _State) -> float:
        return self.budget - state.spent() - state.reserved()

    def _refuse_over(self, state: _State, planned: float, name: str) -> float:
        spent, held = state.spent(), state.reserved()
        left = self.budget - spent - held
        if planned > left:
            holders = "".join(f"; {r.id} {r.name!r} holds {r.unspent:.4e} ({self._status(r)})" for r in state.open())
            raise BudgetExceeded(
                f"run {name!r} plans {planned:.4e} FLOPs but only {left:.4e} are left of the budget "
                f"{self.budget:.4e} ({spent:.4e} already spent, {spent / self.budget:.2%}; {held:.4e} held by open "
                f"reservations{holders}; ledger {self.path})")
        return left - planned

    def _status(self, r: ReservationRecord) -> str:
        if r.status != "open":
            return r.reason or r.status
        alive = r.alive()
        who = ", ".join(_describe(p) for p in r.processes)
        if alive:
            return f"open, its process runs ({who})"
        if alive is False:
            return (f"open, but its process died ({who}): the next reserve or check settles it, or "
                    f"python -m flops ledger --settle")
        return (f"open; cannot tell from here whether its process ({who}) still runs (another machine, container "
                f"or boot): if it has ended, python -m flops ledger --ledger {self.path} --settle-id {r.id}")

    # ---- reserving, charging, settling ------------------------------------------------------------

    def reserve(self, planned: float, *, name: str, kind: str, config: dict[str, Any] | None = None) -> Reservation:
        """Hold ``planned`` FLOPs for a run, or refuse (BudgetExceeded) if they are not left; one locked step.

        Refuses (LedgerDamaged) on a damaged ledger. Settles dead processes' reservations first."""
        planned = _check_flops(planned, "planned")
        rid = uuid.uuid4().hex[:16]
        with self._locked(exclusive=True, create=True) as fd:
            assert fd is not None
            state = self._read(fd)
            self._refuse_damage(state)
            self._settle_dead(fd, state)
            self._refuse_over(state, planned, name)
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

    def append(self, *, name: str, kind: str, flops: float, tokens: int = 0, steps: int = 0, seconds: float = 0.0,
               config: dict[str, Any] | None = None, reservation: str | None = None) -> LedgerEntry:
        """Book one charge (``Reservation.charge`` is the usual way; without ``reservation`` it is
        charged outside any). Never reads the file, so it works on a damaged ledger too."""
        entry = LedgerEntry(name=name, kind=kind, flops=_check_flops(flops, "flops"), tokens=int(tokens),
                            steps=int(steps), seconds=float(seconds), config=dict(config or {}), time=time.time(),
                            reservation=reservation)
        self._append({"type": "charge", "reservation": reservation, "name": name, "kind": kind, "flops": entry.flops,
                      "tokens": entry.tokens, "steps": entry.steps, "seconds": entry.seconds, "config": entry.config,
                      "time": entry.time})
        return entry

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
                                 f"process ({', '.join(_describe(p) for p in r.processes)}); it closes it itself")
            reason = f"settled by hand ({', '.join(_describe(p) for p in r.processes)} could not be checked)"
            self._write(fd, {"type": "close", "reservation": r.id, "how": "settled", "reason": reason,
                             "time": time.time()})
            r.status, r.reason = "settled", reason
            return r

    def repair(self) -> list[Damage]:
        """Move every damaged line to ``<ledger>.damaged`` and keep every other line, byte for byte.

        The kept lines go to a new file that atomically replaces the ledger (a crash leaves either the
        old file or the new one); the damaged ones are appended and synced to the side file first."""
        with self._locked(exclusive=True) as fd:
            state = self._read(fd)
            if fd is None or not state.damage:
                return []
            side = self.path.with_name(self.path.name + ".damaged")
            with open(side, "ab") as f:
                f.write(b"".join(d.raw + b"\n" for d in state.damage))
                f.flush()
                os.fsync(f.fileno())
            tmp = self.path.with_name(self.path.name + ".repair-tmp")
            with open(tmp, "wb") as f:
                f.write(b"".join(line + b"\n" for line in state.good_lines))
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

    # ---- budget figures (refused on a damaged ledger) ---------------------------------------------

    def check(self, planned: float, *, name: str = "") -> float:
        """Refuse (BudgetExceeded) a run planning more FLOPs than are left; return what is left after it.
        Reserves nothing: ``reserve`` is the check that also holds the FLOPs."""
        planned = _check_flops(planned, "planned")
        with self._locked(exclusive=True) as fd:
            state = self._read(fd)
            self._refuse_damage(state)
            self._settle_dead(fd, state)
            return self._refuse_over(state, planned, name)

    def spent(self, *, name: str | None = None, kind: str | None = None, prefix: str | None = None) -> float:
        """FLOPs charged so far, optionally only for one name, kind or name prefix."""
        with self._locked(exclusive=False) as fd:
            state = self._read(fd)
        self._refuse_damage(state)
        return state.spent(name, kind, prefix)

    def reserved(self, *, name: str | None = None, kind: str | None = None, prefix: str | None = None) -> float:
        """FLOPs held by open reservations and not yet charged (after settling dead processes' reservations)."""
        with self._locked(exclusive=True) as fd:
            state = self._read(fd)
            self._refuse_damage(state)
            self._settle_dead(fd, state)
        return state.reserved(name, kind, prefix)

    def remaining(self) -> float:
        """Budget - charges - open reservations' unspent parts (after settling dead processes' reservations)."""
        with self._locked(exclusive=True) as fd:
            state = self._read(fd)
            self._refuse_damage(state)
            self._settle_dead(fd, state)
        return self._left(state)

    # ---- reading what is there (damage is listed, not refused) ------------------------------------

    def _read_tolerant(self) -> _State:
        with self._locked(exclusive=False) as fd:
            return self._read(fd)

    def entries(self) -> list[LedgerEntry]:
        """Every readable charge in file order; damaged lines are skipped, warned about and listed in ``problems``."""
        state = self._read_tolerant()
        for p in self.problems:
            warnings.warn(p, stacklevel=2)
        return state.charges

    def reservations(self) -> list[ReservationRecord]:
        """Every readable reservation in file order, with what was charged to it and its status."""
        return sorted(self._read_tolerant().reservations.values(), key=lambda r: r.line)

    def damaged(self) -> list[Damage]:
        """The lines that are not valid entries (what ``repair`` would move), with their bytes."""
        return self._read_tolerant().damage

    # ---- reports -----------------------------------------------------------------------------------

    _COLUMNS = ("name", "kind", "tokens", "steps", "seconds", "flops", "percent_of_budget")

    def _row(self, name: str, kind: str, tokens: Any, steps: Any, seconds: Any, flops: float) -> dict[str, Any]:
        return {"name": name, "kind": kind, "tokens": tokens, "steps": steps, "seconds": seconds, "flops": flops,
                "percent_of_budget": 100 * flops / self.budget}

    @staticmethod
    def _grouped(charges: list[LedgerEntry]) -> list[LedgerEntry]:
        """Charges summed per (name, kind), in order of first appearance."""
        groups: dict[tuple[str, str], LedgerEntry] = {}
        for e in charges:
            g = groups.setdefault((e.name, e.kind), LedgerEntry(name=e.name, kind=e.kind, flops=0.0))
            g.flops += e.flops
            g.tokens += e.tokens
            g.steps += e.steps
            g.seconds += e.seconds
        return list(groups.values())

    def summary(self) -> dict[str, Any]:
        """Everything the reports show, as plain data (``python -m flops ledger --json``)."""
        state = self._read_tolerant()
        spent, held = state.spent(), state.reserved()
        by_kind: dict[str, float] = {}
        for e in state.charges:
            by_kind[e.kind] = by_kind.get(e.kind, 0.0) + e.flops
        return {
            "ledger": str(self.path), "budget": self.budget, "spent": spent, "reserved": held,
            "remaining": self.budget - spent - held, "spent_by_kind": by_kind,
            "charges": [{"name": g.name, "kind": g.kind, "tokens": g.tokens, "steps": g.steps, "seconds": g.seconds,
                         "flops": g.flops} for g in self._grouped(state.charges)],
            "reservations": [{"id": r.id, "name": r.name, "kind": r.kind, "planned": r.planned, "charged": r.charged,
                              "unspent": r.unspent, "status": r.status, "detail": self._status(r),
                              "processes": r.processes, "line": r.line}
                             for r in sorted(state.reservations.values(), key=lambda r: r.line)],
            "problems": list(self.problems),
        }

    def report_csv(self) -> str:
        """One row per charge, then TOTAL (charged), RESERVED (held by open reservations), REMAINING, and
        a "DAMAGED LINE" row naming each line that could not be read (left out of every figure)."""
        state = self._read_tolerant()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self._COLUMNS, lineterminator="\n")
        w.writeheader()
        for e in state.charges:
            w.writerow(self._row(e.name, e.kind, e.tokens, e.steps, e.seconds, e.flops))
        c = state.charges
        spent, held = state.spent(), state.reserved()
        w.writerow(self._row("TOTAL", "", sum(e.tokens for e in c), sum(e.steps for e in c),
                             sum(e.seconds for e in c), spent))
        w.writerow(self._row("RESERVED", "", "", "", "", held))
        w.writerow(self._row("REMAINING", "", "", "", "", self.budget - spent - held))
        for d in state.damage:
            w.writerow({"name": f"DAMAGED LINE {d.line}: {d.reason}"})
        return buf.getvalue()

    def report_markdown(self) -> str:
        """Charges per experiment and kind, totals by kind, reservations, what is left, and any damage."""
        state = self._read_tolerant()
        pct = 100 / self.budget
        lines = ["| experiment | kind | tokens | steps | seconds | FLOPs | % of budget |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for g in self._grouped(state.charges):
            lines.append(f"| {g.name} | {g.kind} | {g.tokens} | {g.steps} | {g.seconds:.1f} | {g.flops:.4e} | "
                         f"{g.flops * pct:.4f}% |")
        for kind in sorted({e.kind for e in state.charges}):
            f = state.spent(kind=kind)
            lines.append(f"| **all {kind}** | | | | | {f:.4e} | {f * pct:.4f}% |")
        c, spent, held = state.charges, state.spent(), state.reserved()
        lines.append(f"| **TOTAL** | | {sum(e.tokens for e in c)} | {sum(e.steps for e in c)} | "
                     f"{sum(e.seconds for e in c):.1f} | {spent:.4e} | {spent * pct:.4f}% |")
        if state.reservations:
            lines += ["", "| reservation | experiment | kind | planned | charged | still held | status |",
                      "| --- | --- | --- | ---: | ---: | ---: | --- |"]
            for r in sorted(state.reservations.values(), key=lambda r: r.line):
                lines.append(f"| {r.id} | {r.name} | {r.kind} | {r.planned:.4e} | {r.charged:.4e} | "
                             f"{r.unspent:.4e} | {self._status(r)} |")
        left = self.budget - spent - held
        lines.append(f"\nBudget {self.budget:.4e} FLOPs; spent {spent:.4e} ({spent * pct:.4f}%); held by open "
                     f"reservations {held:.4e} ({held * pct:.4f}%); remaining {left:.4e} ({left * pct:.4f}%).")
        if state.damage:
            lines.append(f"\n**{len(state.damage)} damaged line(s)**: budget checks refuse until they are repaired "
                         f"(python -m flops ledger --ledger {self.path} --repair); the figures above leave them out.")
            lines += [f"- {p}" for p in self.problems]
        return "\n".join(lines) + "\n"


class Reservation:
    """A run's hold on part of the budget: ``charge`` work as it is spent, ``close`` at the end.

    As a context manager it closes on leaving (an exception included), releasing what was not charged."""

    def __init__(self, ledger: Ledger, id: str, *, name: str, kind: str, planned: float, charged: float = 0.0,
                 owner: bool = True) -> None:
        self.ledger, self.id, self.name, self.kind = ledger, id, name, kind
        self.planned, self.charged = planned, charged
        self.owner = owner    # made by this process (only the owner closes it)
        self.closed = False

    @property
    def unspent(self) -> float:
        return 0.0 if self.closed else max(0.0, self.planned - self.charged)

    def charge(self, flops: float, *, tokens: int = 0, steps: int = 0, seconds: float = 0.0, name: str | None = None,
               kind: str | None = None, config: dict[str, Any] | None = None) -> LedgerEntry:
        """Book FLOPs spent under this reservation (name and kind default to the reservation's; periodic
        evaluations in a training run are kind "eval"). Always written, even past the plan or after close,
        since the work was done; going past the plan warns, as it eats into what others can reserve."""
        entry = self.ledger.append(name=name or self.name, kind=kind or self.kind, flops=flops, tokens=tokens,
                                   steps=steps, seconds=seconds, config=config, reservation=self.id)
        before, self.charged = self.charged, self.charged + entry.flops
        if self.charged > self.planned >= before:
            warnings.warn(f"{self.ledger.path}: reservation {self.id} ({self.name!r}) charged {self.charged:.4e} "
                          f"FLOPs, more than the {self.planned:.4e} it reserved", stacklevel=2)
        return entry

    def close(self) -> None:
        """Release what was not charged (idempotent)."""
        if self.closed:
            return
        if not self.owner:
            raise RuntimeError(f"reservation {self.id} ({self.name!r}) was attached, not made, by this process: "
                               f"the process that reserved it closes it")
        self.ledger._append({"type": "close", "reservation": self.id, "how": "closed", "reason": "closed by its run",
                             "time": time.time()})
        self.closed = True

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owner:
            self.close()


__all__ = ["DEFAULT_BUDGET", "DEFAULT_LEDGER", "BudgetExceeded", "Damage", "Ledger", "LedgerDamaged", "LedgerEntry",
           "Reservation", "ReservationRecord", "process_alive", "this_process"]

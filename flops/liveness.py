"""Who holds a ledger reservation, and whether it still lives.

A process is recorded as {pid, start (from /proc/<pid>/stat, so a reused pid is told apart), host, boot
(the kernel's boot id), pidns (the pid namespace)}. Whether it lives can only be told on the machine,
pid namespace and boot it ran on; elsewhere the answer is None ("cannot tell from here").
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any


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


def all_alive(processes: list[dict[str, Any]]) -> bool | None:
    """True if any of the processes lives, False if all are dead, None if that cannot be told here."""
    states = [process_alive(p) for p in processes]
    if any(s is True for s in states):
        return True
    return None if any(s is None for s in states) else False


def describe(processes: list[dict[str, Any]]) -> str:
    """"pid 123 on host, pid 456 on host" for messages."""
    return ", ".join(f"pid {p.get('pid')} on {p.get('host')}" for p in processes)


def holders_status(processes: list[dict[str, Any]], ledger: str | os.PathLike, reservation_id: str) -> str:
    """What an open reservation's processes are doing, and what to do about it, for reports and refusals."""
    alive, who = all_alive(processes), describe(processes)
    if alive:
        return f"open, its process runs ({who})"
    if alive is False:
        return (f"open, but its process died ({who}): the next reserve settles it, or "
                f"python -m flops ledger --settle")
    return (f"open; cannot tell from here whether its process ({who}) still runs (another machine, container "
            f"or boot): if it has ended, python -m flops ledger --ledger {ledger} --settle-id {reservation_id}")


__all__ = ["all_alive", "describe", "holders_status", "process_alive", "this_process"]

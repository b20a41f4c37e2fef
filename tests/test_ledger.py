"""flops.ledger under attack: processes racing for the last of the budget, writers killed mid-line, runs
killed with SIGKILL while holding a reservation, damaged lines, files written by the original format,
charges past what a reservation holds, and writes that fail (disk full, I/O errors, short writes). Every
expected figure is derived by hand from the FLOPs the test itself books."""

from __future__ import annotations

import csv
import errno
import io
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flops
from flops.__main__ import ledger_main as ledger_cli
from flops.liveness import _proc_stat, this_process

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def legacy_line(name: str, kind: str, flops_: float, tokens: int = 0) -> str:
    """A line exactly as the original ledger wrote it (no type, no reservation)."""
    return json.dumps({"config": {}, "flops": flops_, "kind": kind, "name": name, "seconds": 0.0, "steps": 0,
                       "time": 1.0, "tokens": tokens}, sort_keys=True) + "\n"


def spent(ledger: flops.Ledger, *, name: str | None = None, kind: str | None = None, prefix: str = "") -> float:
    """What the ledger's charges of one name, kind or name prefix add up to."""
    return sum(e.flops for e in ledger.entries()
               if name in (None, e.name) and kind in (None, e.kind) and e.name.startswith(prefix))


def held(ledger: flops.Ledger) -> float:
    """What its open reservations still hold."""
    return sum(r.unspent for r in ledger.reservations())


def spawn(target: Callable[..., None], *args: Any) -> tuple[mp.Process, Any]:
    """A separate process (forked) running ``target(conn, *args)``, and what it sends on ``conn`` once it
    has done its part (it then goes on until killed). Waits for that message or the child's end, whichever
    comes first."""
    ctx = mp.get_context("fork")
    ours, theirs = ctx.Pipe()
    p = ctx.Process(target=target, args=(theirs, *args))
    p.start()
    mp.connection.wait([ours, p.sentinel])
    assert ours.poll(), f"the child process ended (exit code {p.exitcode}) before doing its part"
    return p, ours.recv()


def kill(p: mp.Process) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.join()


# ---------------------------------------------------------------------------------------------
# appends: nothing lost, nothing interleaved, a killed writer damages only its own line


def _append_many(path: str, tag: str, n: int) -> None:
    with flops.Ledger(path).reserve(float(n), name=tag, kind="train") as r:
        for i in range(n):
            r.charge(1.0, name=f"{tag}-{i}", tokens=i, config={"pad": "x" * 3000})


def _append_until_killed(conn, path: str, tag: str, size: int) -> None:
    """Charge line after line; say so once the file holds ``size`` bytes, and go on until killed."""
    told = False
    with flops.Ledger(path).reserve(1e6, name=tag, kind="train") as r:
        for i in range(10**6):
            r.charge(1.0, name=f"{tag}-{i}", tokens=i, config={"pad": "x" * 3000})
            if not told and os.path.getsize(path) >= size:
                conn.send(i)
                told = True


def _append_few(path: str, tag: str, n: int, reservation: str) -> None:
    r = flops.Ledger(path).attach(reservation)
    for i in range(n):
        r.charge(1.0, name=f"{tag}-{i}")


def test_concurrent_appends_lose_nothing(tmp_path):
    path = str(tmp_path / "ledger.jsonl")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, tag, 200)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    ledger = flops.Ledger(path)
    names = [e.name for e in ledger.entries()]
    assert not ledger.problems
    assert sorted(names) == sorted([f"a-{i}" for i in range(200)] + [f"b-{i}" for i in range(200)])
    assert ledger.spent() == 400.0


def test_a_writer_killed_mid_line_blocks_budget_checks_but_never_charges(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = flops.Ledger(path, budget=1000.0)
    run = ledger.reserve(12.0, name="run", kind="eval")  # line 1
    run.charge(5.0, name="before")                        # line 2
    # A writer killed in the middle of its line (SIGKILL right after a partial write).
    code = ("import os, signal, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND); "
            "os.write(fd, b'{\"name\": \"torn\", \"kind\": \"train\", \"flo'); os.kill(os.getpid(), signal.SIGKILL)")
    p = subprocess.run([sys.executable, "-c", code, str(path)])
    assert p.returncode == -signal.SIGKILL
    with pytest.warns(UserWarning, match="ledger.jsonl:3: unterminated last line"):
        assert [e.name for e in ledger.entries()] == ["before"]
    with pytest.raises(flops.LedgerDamaged, match="ledger.jsonl:3: unterminated last line"):
        ledger.reserve(1.0, name="next", kind="train")
    # a running run's charge still goes in, on a line of its own, and its close too
    run.charge(7.0, name="after")
    run.close()
    with pytest.warns(UserWarning, match="ledger.jsonl:3: not a ledger entry"):
        assert [e.name for e in ledger.entries()] == ["before", "after"]
    for figure in (lambda: ledger.remaining(), lambda: ledger.spent(),
                   lambda: ledger.reserve(1.0, name="next", kind="train")):
        with pytest.raises(flops.LedgerDamaged, match="--repair"):
            figure()
    assert [d.line for d in ledger.repair()] == [3]
    assert ledger.remaining() == 1000.0 - 5.0 - 7.0
    assert (tmp_path / "ledger.jsonl.damaged").read_bytes() == b'{"name": "torn", "kind": "train", "flo\n'

    # and a real appender killed at a random moment leaves complete lines only
    path2 = tmp_path / "ledger2.jsonl"
    writer, _ = spawn(_append_until_killed, str(path2), "w", 100_000)  # (once it has written 100 kB, in full flow)
    kill(writer)
    got = flops.Ledger(path2).entries()
    assert got and all(e.flops == 1.0 for e in got)
    assert [e.name for e in got] == [f"w-{i}" for i in range(len(got))]


# ---------------------------------------------------------------------------------------------
# budget figures and reports


def test_budget_and_reports(tmp_path):
    assert flops.Ledger(tmp_path / "x.jsonl").budget == 1e17 == flops.DEFAULT_BUDGET
    ledger = flops.Ledger(tmp_path / "l.jsonl", budget=1000.0)
    with ledger.reserve(600.0, name="a", kind="train") as r:
        r.charge(400.0, tokens=10, steps=2, seconds=1.5)
        r.charge(200.0, name="b", kind="eval", tokens=5)
    assert ledger.remaining() == 400.0
    with ledger.reserve(400.0, name="ok", kind="train"):
        assert ledger.remaining() == 0.0
    with pytest.raises(flops.BudgetExceeded) as e:
        ledger.reserve(500.0, name="big", kind="train")
    msg = str(e.value)
    for figure in ("5.0000e+02", "4.0000e+02", "1.0000e+03", "6.0000e+02", "big"):
        assert figure in msg
    md = flops.report_markdown(ledger)
    assert "| a | train |" in md and "**TOTAL**" in md and "60.0000%" in md
    rows = list(csv.DictReader(io.StringIO(flops.report_csv(ledger))))
    assert [r["name"] for r in rows] == ["a", "b", "TOTAL", "RESERVED", "REMAINING"]
    assert float(rows[2]["flops"]) == 600.0 and float(rows[2]["percent_of_budget"]) == 60.0
    assert float(rows[3]["flops"]) == 0.0 and float(rows[4]["flops"]) == 400.0
    assert spent(ledger, kind="eval") == 200.0 and spent(ledger, prefix="a") == 400.0


def test_reserve_charge_close(tmp_path):
    ledger = flops.Ledger(tmp_path / "l.jsonl", budget=1000.0)
    with ledger.reserve(100.0, name="old", kind="train") as old:
        old.charge(100.0)
    with ledger.reserve(500.0, name="run", kind="train", config={"lr": 1e-4}) as r:
        r.charge(120.0, tokens=64, steps=2)
        r.charge(30.0, kind="eval")
        # spent 100 + 150; the open reservation still holds 500 - 150 = 350
        assert ledger.spent() == 250.0 and held(ledger) == 350.0 and ledger.remaining() == 400.0
        assert spent(ledger, name="run") == 150.0 and spent(ledger, kind="eval") == 30.0
        assert r.left() == 350.0 and r.fits(350.0) and not r.fits(351.0)
        with pytest.raises(flops.BudgetExceeded, match="only 4.0000e\\+02 are left"):
            ledger.reserve(401.0, name="other", kind="train")
    assert held(ledger) == 0.0 and ledger.remaining() == 750.0
    [_, rec] = ledger.reservations()
    assert (rec.status, rec.planned, rec.charged, rec.unspent) == ("closed", 500.0, 150.0, 0.0)

    # an exception inside the block still releases the rest; going past the plan is refused, unwritten
    with pytest.raises(KeyError), ledger.reserve(200.0, name="crash", kind="forecast") as r:
        r.charge(50.0)
        raise KeyError("boom")
    assert ledger.remaining() == 700.0
    r = ledger.reserve(100.0, name="over", kind="train")
    before = ledger.path.read_bytes()
    with pytest.raises(flops.ReservationExceeded, match="holds 1.000000e\\+02 FLOPs.*charge of 1.300000e\\+02"):
        r.charge(130.0)
    assert ledger.path.read_bytes() == before and ledger.remaining() == 600.0
    r.charge(100.0)  # all it holds
    assert ledger.remaining() == 600.0
    r.close()
    r.close()  # idempotent
    assert [x.status for x in ledger.reservations()] == ["closed", "closed", "closed", "closed"]


def test_original_format_lines_count_as_charges(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text(legacy_line("lora/a", "train", 300.0, tokens=10) + legacy_line("lora/a", "eval", 200.0))
    ledger = flops.Ledger(path, budget=1000.0)
    assert ledger.spent() == 500.0 and spent(ledger, kind="eval") == 200.0 and spent(ledger, name="lora/a") == 500.0
    assert ledger.remaining() == 500.0
    r = ledger.reserve(500.0, name="b", kind="train")
    with pytest.raises(flops.BudgetExceeded):
        ledger.reserve(1.0, name="c", kind="train")
    r.close()
    assert ledger.remaining() == 500.0
    assert path.read_text().startswith(legacy_line("lora/a", "train", 300.0, tokens=10))  # never rewritten


def test_invalid_entries_are_refused_before_they_reach_the_file(tmp_path):
    ledger = flops.Ledger(tmp_path / "l.jsonl", budget=1000.0)
    with ledger.reserve(10.0, name="a", kind="train") as r:
        for bad in (dict(name=1, kind="train", flops=1.0), dict(name="a", kind="train", flops=float("nan")),
                    dict(name="a", kind="train", flops=-1.0), dict(name="a", kind="train", flops=1.0, tokens=-3)):
            with pytest.raises(ValueError):
                r.charge(**bad)
    with pytest.raises(ValueError):
        ledger.reserve(float("inf"), name="a", kind="train")
    assert ledger.remaining() == 1000.0 and not ledger.problems and ledger.reservations()[0].charged == 0.0


# ---------------------------------------------------------------------------------------------
# reservations race, and survive their processes


def _race(path: str, barrier, planned: float) -> None:
    ledger = flops.Ledger(path, budget=1000.0)
    barrier.wait()
    try:
        r = ledger.reserve(planned, name=f"racer-{os.getpid()}", kind="train")
    except flops.BudgetExceeded:
        os._exit(3)
    r.charge(100.0)
    os._exit(0)  # dies holding its reservation


@pytest.mark.parametrize("round_", range(8))
def test_two_processes_racing_for_the_last_of_the_budget(tmp_path, round_):
    path = tmp_path / "l.jsonl"
    # 400 FLOPs spent in 6400 lines of 1/16 (exact in binary): reading them takes long enough that a check
    # made outside the lock lets both racers through almost every time
    path.write_text(legacy_line("earlier", "train", 0.0625) * 6400)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_race, args=(str(path), barrier, 600.0)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert sorted(p.exitcode for p in procs) == [0, 3]  # exactly one got the 600 left
    ledger = flops.Ledger(path, budget=1000.0)
    assert ledger.spent() == 400.0 + 100.0  # the earlier lines and the winner's one charge
    [winner] = ledger.reservations()
    assert winner.planned == 600.0 and winner.charged == 100.0
    # the winner died without closing (if it died before the loser looked, the loser settled it already):
    # the next figure settles it to its 100 charged
    assert ledger.remaining() == 1000.0 - 400.0 - 100.0
    assert ledger.reservations()[0].status == "settled"


def _victim(conn, path: str) -> None:
    r = flops.Ledger(path, budget=1000.0).reserve(600.0, name="victim", kind="train")
    r.charge(120.0, steps=1)
    r.charge(80.0, kind="eval")
    conn.send(r.id)
    time.sleep(600)


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_a_killed_runs_reservation_is_settled_to_its_charges(tmp_path, reaped):
    path = tmp_path / "l.jsonl"
    path.write_text(legacy_line("earlier", "train", 100.0))
    ledger = flops.Ledger(path, budget=1000.0)
    p, rid = spawn(_victim, str(path))
    try:
        # alive: its reservation holds 600 - 200; nobody else may settle it
        assert ledger.remaining() == 1000.0 - 100.0 - 600.0
        assert ledger.settle() == []
        with pytest.raises(ValueError, match="belongs to a running process"):
            ledger.settle_by_hand(rid)
        with pytest.raises(flops.BudgetExceeded, match="its process runs"):
            ledger.reserve(301.0, name="next", kind="train")
    finally:
        os.kill(p.pid, signal.SIGKILL)
    if reaped:
        p.join()
    else:  # dead but not reaped: a zombie can charge no more
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
        assert _proc_stat(p.pid)[0] == "Z"
    assert "its process died" in flops.report_markdown(ledger)  # a read-only report settles nothing
    # the next reservation settles it: 1000 - 100 - 200 charged = 700 free, to the FLOP
    nxt = ledger.reserve(700.0, name="next", kind="train")
    victim = next(r for r in ledger.reservations() if r.id == rid)
    assert (victim.status, victim.charged, victim.unspent) == ("settled", 200.0, 0.0)
    assert victim.reason.startswith(f"settled after its process died (pid {p.pid} on ")
    assert spent(ledger, name="victim") == 200.0 and spent(ledger, kind="eval") == 80.0
    assert ledger.remaining() == 0.0
    nxt.close()
    assert "settled after its process died" in flops.report_markdown(ledger)
    p.join()


def _owner(conn, path: str) -> None:
    conn.send(flops.Ledger(path, budget=1000.0).reserve(500.0, name="study", kind="train").id)
    time.sleep(600)


def _helper(conn, path: str, rid: str) -> None:
    flops.Ledger(path, budget=1000.0).attach(rid).charge(150.0, name="study/run-1")
    conn.send("charged")
    time.sleep(600)


def test_an_attached_process_keeps_the_reservation_alive(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = flops.Ledger(path, budget=1000.0)
    owner, rid = spawn(_owner, str(path))
    helper, _ = spawn(_helper, str(path), rid)
    kill(owner)
    # the study died but the run it started still spends under its reservation
    assert ledger.settle() == [] and ledger.remaining() == 1000.0 - 500.0
    kill(helper)
    assert [r.id for r in ledger.settle()] == [rid]
    assert ledger.remaining() == 1000.0 - 150.0 and spent(ledger, name="study/run-1") == 150.0


def test_reused_pids_and_other_machines(tmp_path):
    me = this_process()
    reused = {**me, "start": me["start"] + 1}          # our pid, but a process started at another time
    elsewhere = {**me, "host": "some-other-host"}      # cannot be checked from here
    alive = dict(me)                                   # this very process
    lines = []
    for rid, planned, process in (("r-reused", 300.0, reused), ("r-elsewhere", 400.0, elsewhere),
                                  ("r-alive", 100.0, alive)):
        lines.append(json.dumps({"type": "reserve", "id": rid, "name": rid, "kind": "train", "flops": planned,
                                 "config": {}, "process": process, "time": 1.0}) + "\n")
    lines.append(json.dumps({"type": "charge", "reservation": "r-reused", "name": "r-reused", "kind": "train",
                             "flops": 50.0}) + "\n")
    lines.append(json.dumps({"type": "charge", "reservation": "r-elsewhere", "name": "r-elsewhere",
                             "kind": "train", "flops": 100.0}) + "\n")
    path = tmp_path / "l.jsonl"
    path.write_text("".join(lines))
    ledger = flops.Ledger(path, budget=1000.0)
    # r-reused is settled at its 50; r-elsewhere still holds 400 - 100; r-alive holds 100
    assert ledger.remaining() == 1000.0 - 50.0 - 100.0 - 300.0 - 100.0
    status = {r.id: r.status for r in ledger.reservations()}
    assert status == {"r-reused": "settled", "r-elsewhere": "open", "r-alive": "open"}
    md = flops.report_markdown(ledger)
    assert "cannot tell from here" in md and "--settle-id r-elsewhere" in md
    with pytest.raises(ValueError, match="running process"):
        ledger.settle_by_hand("r-alive")
    assert ledger.settle_by_hand("r-elsewhere").status == "settled"
    assert ledger.remaining() == 1000.0 - 50.0 - 100.0 - 100.0


# ---------------------------------------------------------------------------------------------
# damage in the middle of the file, and its repair


def test_a_damaged_middle_line_is_refused_reported_and_repaired(tmp_path, capsys):
    path = tmp_path / "l.jsonl"
    good1, good3 = legacy_line("a", "train", 100.0), legacy_line("c", "train", 200.0)
    bad = '{"name": "b", "kind": "eval", "flops": 4\x00\x00\x00 garbage\n'
    # line 4: a reservation this very process holds, as a running run's would be
    run = json.dumps({"type": "reserve", "id": "r-run", "name": "d", "kind": "eval", "flops": 50.0, "config": {},
                      "process": this_process(), "time": 1.0}) + "\n"
    path.write_text(good1 + bad + good3 + run)
    ledger = flops.Ledger(path, budget=1000.0)
    for refused in (lambda: ledger.reserve(10.0, name="x", kind="train"), lambda: ledger.remaining(),
                    lambda: ledger.spent()):
        with pytest.raises(flops.LedgerDamaged) as e:
            refused()
        assert f"{path}:2:" in str(e.value) and f"python -m flops ledger --ledger {path} --repair" in str(e.value)
    ledger.attach("r-run").charge(50.0)  # charging goes on
    md = flops.report_markdown(ledger)
    assert "| a | train |" in md and "| c | train |" in md and "| d | eval |" in md and "| b |" not in md
    assert "1 damaged line(s)" in md and f"{path}:2:" in md
    rows = list(csv.DictReader(io.StringIO(flops.report_csv(ledger))))
    assert [r["name"].split(":")[0] for r in rows] == ["a", "c", "d", "TOTAL", "RESERVED", "REMAINING",
                                                       "DAMAGED LINE 2"]
    assert float(rows[3]["flops"]) == 100.0 + 200.0 + 50.0

    before = path.read_bytes()
    cli = ["--ledger", str(path), "--budget", "1000"]
    # the real command line once (its exit status), then in this process
    shown = subprocess.run([sys.executable, "-m", "flops", "ledger", *cli], cwd=ROOT, env=ENV, capture_output=True,
                           text=True)
    assert shown.returncode == 1 and "| c | train |" in shown.stdout and f"{path}:2:" in shown.stdout
    assert ledger_cli(cli + ["--repair"]) == 1  # stdin is not a terminal and no --yes: it does not ask
    out, err = capsys.readouterr()
    assert "not repaired" in err and "garbage" in err  # the damaged line was shown
    assert path.read_bytes() == before and not (tmp_path / "l.jsonl.damaged").exists()
    assert ledger_cli(cli + ["--repair", "--yes"]) == 0
    out, err = capsys.readouterr()
    assert "moved line(s) 2" in err and "damaged line" not in out
    assert (tmp_path / "l.jsonl.damaged").read_text() == bad
    assert path.read_bytes() == before.replace(bad.encode(), b"")  # every other line byte for byte, in order
    assert ledger.remaining() == 1000.0 - 100.0 - 200.0 - 50.0


def test_repair_while_others_append_loses_nothing(tmp_path):
    """``repair`` replaces the file; appenders that opened the old one re-open the new one."""
    path = tmp_path / "l.jsonl"
    ledger, repairs = flops.Ledger(path), 0
    run = ledger.reserve(300.0, name="run", kind="train")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_few, args=(str(path), tag, 150, run.id)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        run.charge(0.0, name="junk")  # then damage that line by hand, and repair
        with open(path, "r+b") as f:
            data = f.read()
            f.seek(data.rindex(b'"name": "junk"'))
            f.write(b'"name": \x00\x00\x00')
        repairs += len(ledger.repair())
        time.sleep(0.02)  # let the appenders queue up on the lock of the file being replaced
    for p in procs:
        p.join()
        assert p.exitcode == 0
    run.close()
    assert repairs > 0 and ledger.snapshot().damage == []
    names = sorted(e.name for e in ledger.entries() if e.name != "junk")
    assert names == sorted([f"a-{i}" for i in range(150)] + [f"b-{i}" for i in range(150)])


def test_cli_json(tmp_path, capsys):
    path = tmp_path / "l.jsonl"
    ledger = flops.Ledger(path, budget=1000.0)
    with ledger.reserve(150.0, name="a", kind="train") as a:
        a.charge(100.0)
        a.charge(50.0, steps=3)
    r = ledger.reserve(300.0, name="b", kind="forecast")
    r.charge(20.0)
    assert ledger_cli(["--ledger", str(path), "--budget", "1000", "--settle", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["spent"], d["reserved"], d["remaining"]) == (170.0, 280.0, 1000.0 - 170.0 - 280.0)
    assert d["spent_by_kind"] == {"train": 150.0, "forecast": 20.0}
    assert [(c["name"], c["kind"], c["flops"], c["steps"]) for c in d["charges"]] == [
        ("a", "train", 150.0, 3), ("b", "forecast", 20.0, 0)]
    [_, res] = d["reservations"]
    assert (res["id"], res["status"], res["charged"], res["unspent"]) == (r.id, "open", 20.0, 280.0)
    assert d["problems"] == []


# ---------------------------------------------------------------------------------------------
# a reservation is a ceiling


def test_a_charge_past_the_reservation_is_refused_whoever_charges(tmp_path):
    assert all(issubclass(e, flops.LedgerError) for e in (flops.BudgetExceeded, flops.LedgerDamaged,
                                                          flops.ReservationExceeded))
    ledger = flops.Ledger(tmp_path / "l.jsonl", budget=1000.0)
    r = ledger.reserve(100.0, name="study", kind="train")
    other = flops.Ledger(ledger.path, budget=1000.0).attach(r.id)  # e.g. a run the study started
    other.charge(60.0, name="study/run-1")
    # r's handle never saw that charge; the file under the lock did
    assert r.left() == 40.0 and r.fits(40.0) and not r.fits(41.0)
    before = ledger.path.read_bytes()
    with pytest.raises(flops.ReservationExceeded) as e:
        r.charge(50.0, name="study/run-2")
    msg = str(e.value)
    for part in (r.id, "'study'", "holds 1.000000e+02", "charged 6.000000e+01", "charge of 5.000000e+01",
                 "1.000000e+01 past", "nothing was written"):
        assert part in msg
    assert ledger.path.read_bytes() == before
    r.charge(40.0, name="study/run-2")
    with pytest.raises(flops.ReservationExceeded, match="charge of 1.000000e\\+00"):
        other.charge(1.0)
    other.charge(0.0)  # nothing is always left
    assert not other.fits(1.0) and other.left() == 0.0
    r.close()
    assert ledger.reservations()[0].charged == 100.0 and ledger.remaining() == 900.0


def test_charges_never_exceed_the_reservation_over_random_plans(tmp_path):
    """Random reservation sizes and random charges: well within what is left, past it (by at least 1e-8
    of the reservation), exactly what is left, nothing; and plans split into parts that add up to them
    but for floating-point rounding, every part of which is accepted. ``fits`` says what ``charge``
    does; a refused charge leaves the file byte for byte; the accepted ones sum exactly to what the
    file holds, which never passes the reservation (but for 1e-9 of it)."""
    rng = np.random.default_rng(0)
    refused = accepted = rounded_past = 0
    for case in range(300):
        ledger = flops.Ledger(tmp_path / f"{case}.jsonl")
        planned = float(10.0 ** rng.uniform(0, 16) * rng.uniform(1, 10))  # up to the budget, 1e17
        r = ledger.reserve(planned, name=f"case-{case}", kind="train")
        exact = case % 5 == 0
        parts = planned * rng.dirichlet(np.ones(int(rng.integers(1, 12)))) if exact else None
        total = 0.0  # the accepted charges, added in the order the file holds them
        for i in range(len(parts) if exact else int(rng.integers(1, 10))):
            rest, how = planned - total, "part" if exact else ("within", "past", "rest", "nothing")[rng.integers(4)]
            if how == "part":
                amount = float(parts[i])
            elif how == "within":
                amount = rest * rng.uniform(0, 0.999)
            elif how == "past":
                amount = rest + planned * 10.0 ** rng.uniform(-8, 0)
            else:
                amount = rest if how == "rest" else 0.0
            fits, before = r.fits(amount), ledger.path.read_bytes()
            try:
                r.charge(amount)
            except flops.ReservationExceeded:
                assert how == "past" and not fits and ledger.path.read_bytes() == before
                refused += 1
            else:
                assert how != "past" and fits
                total += amount
                accepted += 1
        r.close()
        [rec] = ledger.reservations()
        assert rec.id == r.id and rec.charged == total == ledger.spent() <= planned * (1 + 1e-9)
        if exact:
            assert total == pytest.approx(planned, rel=1e-12)
            rounded_past += total > planned
    assert refused > 50 and accepted > 300 and rounded_past > 0  # (the tolerance was needed, and given)


# ---------------------------------------------------------------------------------------------
# writes that fail (disk full, I/O errors) or fall short: no partial line left, nothing lost without a word


class _OsWith:
    """``os`` as flops.ledger sees it, with some of its functions replaced."""

    def __init__(self, **replaced: Callable[..., Any]) -> None:
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def _short_writes(chunk: int, calls: list[int]) -> Callable[[int, bytes], int]:
    """os.write that writes at most ``chunk`` bytes a call (as a write interrupted by a signal may); ``calls``
    gets the size of each."""
    def write(fd: int, data: bytes) -> int:
        calls.append(min(len(data), chunk))
        return os.write(fd, bytes(data[:chunk]))
    return write


def _disk_full_after(cut: int, code: int = errno.ENOSPC) -> Callable[[int, bytes], int]:
    """os.write whose first call writes ``cut`` bytes (negative: all but the last -cut) and whose next call fails
    with ``code`` (with ``cut`` 0 the first fails), as when the disk fills in the middle of a line."""
    state = {"calls": 0}

    def write(fd: int, data: bytes) -> int:
        state["calls"] += 1
        if state["calls"] > 1 or cut == 0:
            raise OSError(code, os.strerror(code))
        return os.write(fd, bytes(data[: cut if cut >= 0 else len(data) + cut]))
    return write


def test_short_writes_still_write_each_line_whole(tmp_path, monkeypatch):
    path = tmp_path / "l.jsonl"
    ledger = flops.Ledger(path, budget=1000.0)
    calls: list[int] = []
    monkeypatch.setattr(flops.ledger, "os", _OsWith(write=_short_writes(7, calls)))
    with ledger.reserve(300.0, name="run", kind="train") as r:
        r.charge(100.0, name="a", tokens=3)
        r.charge(25.0, name="b", kind="eval")
    monkeypatch.undo()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(x)["type"] for x in lines[:-1]] == ["reserve", "charge", "charge", "close"]
    # each line took ceil(its bytes / 7) writes of 7 bytes but the last, and nothing was written twice
    assert calls == [min(7, len(x) + 1 - i) for x in lines[:-1] for i in range(0, len(x) + 1, 7)]
    assert [(e.name, e.kind, e.flops, e.tokens) for e in ledger.entries()] == [("a", "train", 100.0, 3),
                                                                               ("b", "eval", 25.0, 0)]
    assert ledger.remaining() == 1000.0 - 125.0 and not ledger.problems


@pytest.mark.parametrize("cut", [0, 1, 40, -1], ids=["nothing", "one byte", "40 bytes", "all but the newline"])
def test_a_charge_cut_short_by_a_full_disk_is_not_recorded_and_says_so(tmp_path, monkeypatch, cut):
    """The disk fills in the middle of a charge's line (even with only its newline left to write: the JSON is
    then complete, and would be read as a charge): the file is cut back to what it held, the caller gets
    LedgerWriteError naming the ledger, the charge, its FLOPs and its reservation, and the reservation keeps
    the charge in ``unrecorded``; a close that fails too says that charge is missing; once there is room the
    run books it, and the figures are the hand-added ones."""
    path = tmp_path / "l.jsonl"
    ledger = flops.Ledger(path, budget=1000.0)
    r = ledger.reserve(500.0, name="run", kind="train")
    r.charge(100.0, name="run/step-1")
    before = path.read_bytes()
    monkeypatch.setattr(flops.ledger, "os", _OsWith(write=_disk_full_after(cut)))
    with pytest.raises(flops.LedgerWriteError) as e:
        r.charge(123.456, name="run/step-2")
    msg = str(e.value)
    for part in (f"{path}: could not write the charge line of 1.234560e+02 FLOPs (reservation {r.id}, "
                 "'run/step-2'): No space left on device", f"cut back to its {len(before)} bytes before it",
                 "the charge is NOT recorded"):
        assert part in msg
    assert isinstance(e.value, flops.LedgerError)
    assert (e.value.path, e.value.what, e.value.reservation, e.value.flops) == (path, "charge", r.id, 123.456)
    assert path.read_bytes() == before
    assert r.charged == 100.0 and [(x.name, x.flops) for x in r.unrecorded] == [("run/step-2", 123.456)]

    with pytest.raises(flops.LedgerWriteError, match=r"could not write the close line \(reservation [0-9a-f]{16}\)"
                       r".*the close is NOT recorded; besides, 1 charge\(s\) to it of 1.234560e\+02 FLOPs in all could "
                       "not be written earlier"):
        r.close()
    assert path.read_bytes() == before and not r.closed

    monkeypatch.undo()  # room again
    r.charge(123.456, name="run/step-2")
    r.close()
    assert [e.flops for e in ledger.entries()] == [100.0, 123.456] and not ledger.problems
    assert ledger.remaining() == 1000.0 - 100.0 - 123.456 and ledger.reservations()[0].status == "closed"


def test_reserve_and_attach_that_fail_to_sync_leave_nothing_behind(tmp_path, monkeypatch):
    path = tmp_path / "l.jsonl"
    ledger = flops.Ledger(path, budget=1000.0)
    r = ledger.reserve(100.0, name="study", kind="train")
    before = path.read_bytes()
    syncs = []

    def fsync(fd: int) -> None:  # the line's own fsync fails (EIO); the one after cutting it off works
        syncs.append(fd)
        if len(syncs) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fsync(fd)

    monkeypatch.setattr(flops.ledger, "os", _OsWith(fsync=fsync))
    with pytest.raises(flops.LedgerWriteError, match=r"could not write the reserve line of 5.000000e\+02 FLOPs "
                                                     r"\(id [0-9a-f]{16}, 'next'\): Input/output error; .*the "
                                                     "reserve is NOT recorded"):
        ledger.reserve(500.0, name="next", kind="forecast")
    assert path.read_bytes() == before and len(syncs) == 2
    syncs.clear()
    with pytest.raises(flops.LedgerWriteError, match=f"could not write the attach line \\(reservation {r.id}\\)"):
        ledger.attach(r.id)
    assert path.read_bytes() == before
    monkeypatch.undo()
    assert [x.id for x in ledger.reservations()] == [r.id] and ledger.remaining() == 900.0


def test_a_partial_line_that_cannot_be_cut_off_is_reported_as_damage_never_as_a_charge(tmp_path, monkeypatch):
    path = tmp_path / "l.jsonl"
    ledger = flops.Ledger(path, budget=1000.0)
    r = ledger.reserve(500.0, name="run", kind="train")

    def ftruncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(flops.ledger, "os", _OsWith(write=_disk_full_after(50), ftruncate=ftruncate))
    with pytest.raises(flops.LedgerWriteError) as e:
        r.charge(200.0)
    assert ("cutting the partial line off failed too (Input/output error), so its last line may be torn (python -m "
            f"flops ledger --ledger {path} --repair moves it aside); the charge is NOT recorded") in str(e.value)
    monkeypatch.undo()
    with pytest.raises(flops.LedgerDamaged, match="l.jsonl:2: unterminated last line"):
        ledger.spent()
    r.charge(200.0)  # on a line of its own
    r.close()
    assert [d.line for d in ledger.repair()] == [2]
    assert ledger.spent() == 200.0 and ledger.remaining() == 800.0


def test_a_write_that_makes_no_progress_fails_instead_of_spinning(tmp_path, monkeypatch):
    path = tmp_path / "l.jsonl"
    ledger = flops.Ledger(path, budget=1000.0)
    monkeypatch.setattr(flops.ledger, "os", _OsWith(write=lambda fd, data: 0))
    with pytest.raises(flops.LedgerWriteError, match=r"could not write the reserve line .*: wrote 0 of the \d+ bytes "
                                                     "left of the line; the ledger was cut back to its 0 bytes"):
        ledger.reserve(10.0, name="a", kind="train")
    assert path.read_bytes() == b""

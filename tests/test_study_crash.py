"""A crash test of the study: the tiny study killed with SIGKILL at many moments spread over its run,
run again after each kill until it finishes, must end as an uninterrupted run ends.

The moments are events, not clocks: first as soon as the first grid run has finished, then a seeded
draw of thresholds on the study's progress (the files in its folder plus the distinct pieces of work
charged to its ledger), each kill coming when the progress reaches the next threshold, after a small
random offset. The study process alone is killed, as a person or the OOM killer would; its running
script dies with it (study.py's children ask for SIGKILL when it dies). After every kill, and at the
end, the invariants are checked rather than the happy path trusted (Jepsen's way): a run marked done
has its results whole (every forecasts.h5 opens, every finished training run has its adapter and
log) and is never written or charged again, and the ledger reads without a damaged line. At the end:
test_metrics.json, the choices, the plan, every run's metrics, adapter, forecasts and summary equal
the uninterrupted run's (wall-clock fields aside), every reservation is settled or closed, and every
charge of the uninterrupted run is in the crashed run's ledger, whose total holds the killed work
besides.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.torch import load_file

from flops import Ledger
from tests.conftest import HANG_GUARD_S, wait_for

ROOT = Path(__file__).resolve().parent.parent
STUDY_PY = str(ROOT / "experiments" / "study.py")
KILLS = 5           # SIGKILLs of one study, each at its own moment
SEED = 20261203     # the moments' draw
MASKED = {"tokens_per_s", "wall_s", "seconds"}   # wall-clock figures, different from run to run


def _cmd(ckpt: Path, data: Path, out: Path) -> list[str]:
    # the tiny preset with one rank and one context run: every stage, 4 training runs instead of 7
    return [sys.executable, STUDY_PY, "--preset", "tiny", "--model", str(ckpt), "--data", str(data), "--out", str(out),
            "--dtype", "fp32", "--device", "cpu", "--ranks", "2", "--contexts", "series"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:   # (the child holds its own descriptor)
        return subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _group_alive(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that still run (zombies aside), from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _, group = text[text.rindex(")") + 2:].split()[:3]
        if int(group) == pgid and state not in ("Z", "X"):
            alive.append(int(stat.parent.name))
    return alive


def _charges(ledger: Path) -> list:
    return Ledger(ledger).entries() if ledger.exists() else []


def _work_key(e) -> tuple:
    """A charge as a piece of work: which run, what kind, at which step, for how many FLOPs."""
    c = e.config
    return (e.name, e.kind, c.get("to_step"), c.get("step"), c.get("mode"), c.get("model"), c.get("of"), e.flops)


def _progress(out: Path) -> int:
    """Files in the study's folder (hidden ones, locks and temporaries, aside) plus the distinct pieces of
    work charged: it grows with the study's progress, not with work done again after a kill."""
    files = 0
    for folder, dirs, names in os.walk(out):   # (os.walk passes over a folder that vanishes while it looks)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += sum(1 for n in names if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))
    return files + len({_work_key(e) for e in _charges(out / "ledger.jsonl")})


def _forecast_runs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("**/forecast_args.json"))


def _train_runs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("**/train_args.json"))


def _whole(out: Path) -> None:
    """No mark of a finished run without its results whole, and a ledger that reads."""
    for run in _forecast_runs(out):
        if (run / "forecast_metrics.json").exists():
            marked = json.loads((run / "forecast_metrics.json").read_text())
            with h5py.File(run / "forecasts.h5", "r") as f:   # opens, and holds every model the metrics score
                assert set(marked["summary"]) <= set(f), run
                assert np.array_equal(f["system_ids"][()], marked["systems"]), run
    for run in _train_runs(out):
        if (run / "summary.json").exists():
            assert load_file(run / "adapter" / "adapter_model.safetensors"), run
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            assert rows[-1]["kind"] == "val_full", run
    if (out / "ledger.jsonl").exists():
        assert Ledger(out / "ledger.jsonl").snapshot().damage == []


def _datasets(f: h5py.File) -> list[str]:
    """Every dataset's path in an HDF5 file."""
    out: list[str] = []
    f.visititems(lambda key, obj: out.append(key) if isinstance(obj, h5py.Dataset) else None)
    return out


def _masked(x):
    if isinstance(x, dict):
        return {k: _masked(v) for k, v in x.items() if k not in MASKED}
    if isinstance(x, list):
        return [_masked(v) for v in x]
    return x


def _json(path: Path, root: Path):
    """The file's JSON with its study's folder written "<out>" (the two studies' folders differ), wall-clock
    figures left out."""
    return _masked(json.loads(path.read_text().replace(json.dumps(str(root))[1:-1], "<out>")))


def _rows(run: Path) -> list:
    return [_masked(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_study_killed_at_random_moments_ends_as_an_uninterrupted_one(tmp_path, tiny_ckpt, lv_data_file):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    first = _start(_cmd(tiny_ckpt, lv_data_file, straight), tmp_path / "straight.log")
    assert first.wait(timeout=HANG_GUARD_S) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    _whole(straight)
    end = _progress(straight)

    rng = random.Random(SEED)
    attempts, killed, kept = 0, [], {}   # kept: a finished run's mark -> (its mtime, its charges) when first seen

    def attempt(moment: Callable[[], bool], what: str) -> bool:
        """Run the study until ``moment()`` (then SIGKILL it, a little after) or its end; True if killed."""
        nonlocal attempts
        attempts += 1
        log = tmp_path / f"crashed-{attempts}.log"
        proc = _start(_cmd(tiny_ckpt, lv_data_file, crashed), log)
        if wait_for(moment, proc, what):
            # at once (between two writes of one step, say) or a little into the work the event began
            time.sleep(rng.choice([0.0, rng.uniform(0.0, 0.25)]))
            os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=HANG_GUARD_S)
        guard = time.monotonic() + HANG_GUARD_S
        while _group_alive(proc.pid):   # the script it ran dies with it, at once
            assert time.monotonic() < guard, f"hang guard: {_group_alive(proc.pid)} outlived the study"
            time.sleep(0.02)
        assert code in (0, -signal.SIGKILL), f"attempt {attempts} failed ({code}): {log.read_text()[-3000:]}"
        _whole(crashed)
        charged = Counter(e.name for e in _charges(crashed / "ledger.jsonl"))
        for mark in [*crashed.glob("**/summary.json"), *crashed.glob("**/forecast_metrics.json")]:
            name = str(mark.parent.relative_to(crashed)).replace("/", "_")
            kept.setdefault(mark, (mark.stat().st_mtime_ns, charged[name]))
        return code != 0

    # the first kill as soon as the first grid run has finished, then at moments spread over the rest
    assert attempt((crashed / "grid" / "lr0.001_r2" / "summary.json").exists, "the first grid run's summary")
    moments = sorted(rng.sample(range(_progress(crashed) + 1, end), KILLS - 1))
    for threshold in moments:
        if (crashed / "report.md").exists():
            break   # (finished before this moment came)
        if attempt(lambda t=threshold: _progress(crashed) >= t, f"progress {threshold}"):
            killed.append(threshold)
    assert not attempt(lambda: False, "the end")
    assert len(killed) >= KILLS - 2, (killed, moments)   # (nearly every moment came before the end)

    # ---- a run, once finished, is kept: never written again, its work never done again
    charged = Counter(e.name for e in _charges(crashed / "ledger.jsonl"))
    for mark, (mtime, charges) in kept.items():
        name = str(mark.parent.relative_to(crashed)).replace("/", "_")
        assert (mark.stat().st_mtime_ns, charged[name]) == (mtime, charges), mark
    assert charged["zeroshot_val"] == 1   # (finished before the first kill: one greedy generate call)

    # ---- the results: what the uninterrupted study wrote
    def same(path: str) -> tuple:
        return _json(crashed / path, crashed), _json(straight / path, straight)

    mine, theirs = same("test_metrics.json")
    assert mine == theirs
    mine, theirs = same("choices.json")
    assert mine == theirs
    mine, theirs = same("plan.json")   # (what was spent before an invocation differs, of course)
    assert {k: v for k, v in mine.items() if k not in ("spent_before", "to_spend")} == {
        k: v for k, v in theirs.items() if k not in ("spent_before", "to_spend")}
    trained = [r.relative_to(straight) for r in _train_runs(straight)]
    assert trained == [r.relative_to(crashed) for r in _train_runs(crashed)] and len(trained) == 4
    for name in trained:
        assert _rows(crashed / name) == _rows(straight / name), name
        a, b = (load_file(d / name / "adapter" / "adapter_model.safetensors") for d in (straight, crashed))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    forecast = [r.relative_to(straight) for r in _forecast_runs(straight)]
    assert forecast == [r.relative_to(crashed) for r in _forecast_runs(crashed)] and len(forecast) == 3
    for name in forecast:
        mine, theirs = same(str(name / "forecast_metrics.json"))
        assert mine == theirs, name
        with h5py.File(straight / name / "forecasts.h5") as f, h5py.File(crashed / name / "forecasts.h5") as g:
            datasets = _datasets(f)
            assert datasets and datasets == _datasets(g), name
            for key in datasets:
                assert np.array_equal(f[key][()], g[key][()], equal_nan=f[key].dtype.kind == "f"), (name, key)

    # ---- the ledger: whole, every reservation ended, every charge of the straight run there, and more
    ledger = Ledger(crashed / "ledger.jsonl")
    assert ledger.snapshot().damage == []
    records = ledger.reservations()
    assert 1 <= len(records) <= attempts   # one per invocation that got as far (its scripts charge to it)
    assert [r.status for r in records] == ["settled"] * (len(records) - 1) + ["closed"]
    ours, theirs = Counter(map(_work_key, ledger.entries())), Counter(map(_work_key, Ledger(
        straight / "ledger.jsonl").entries()))
    assert not theirs - ours, theirs - ours   # every piece of the uninterrupted run's work is charged
    assert ledger.spent() >= Ledger(straight / "ledger.jsonl").spent()
    assert ledger.spent() == pytest.approx(sum(r.charged for r in records), rel=1e-12)
    report = subprocess.run([sys.executable, "-m", "flops", "ledger", "--ledger", str(crashed / "ledger.jsonl"),
                             "--json"], env=_env(), capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert summary["problems"] == [] and summary["spent"] == pytest.approx(ledger.spent(), rel=1e-12)

    # ---- last, each training run's summary.json
    for name in trained:
        mine, theirs = same(str(name / "summary.json"))
        assert mine == theirs, name

"""Faults that must lose nothing and report nothing wrong: every result file is written whole (a
temporary name, synced, renamed), a full disk at any writer ends in one line naming the file and
leaves no half-written file under a final name and no done mark (summary.json, forecast_metrics.json,
eval_metrics.json) without the results it stands for; a charge the ledger cannot write ends the run
in one line naming the FLOPs it lacks; a resumed run refuses other data at the same path; a torn
metrics line is dropped on --resume; a loss that is not finite is no result; a data file too small
for its splits is one line in every script. The disk fills by injection at each writer (os.fsync
failing with ENOSPC on that writer's file), and for real on a small tmpfs where one can be mounted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import flops
from experiments import evaluate, forecast, study, train
from experiments.lib import errors, files
from experiments.lib.run import checkpoint, cli, folder, metrics_log, rundata
from experiments.lib.science.lotka_volterra import generate_dataset, save_h5
from experiments.lib.training.state import RunState
from flops import __main__ as flops_cli
from tests.conftest import script_argv

NO_SPACE = os.strerror(errno.ENOSPC)
REAL_FSYNC, REAL_WRITE = os.fsync, os.write
SCRIPTS = {"train": train.main, "evaluate": evaluate.main, "forecast": forecast.main, "study": study.main}

# train.py as small as it runs: 2 steps, a checkpoint and a cross-entropy evaluation after each, no generation
TRAIN = ["--max-systems", 2, "--context-length", 32, "--batch-size", 2, "--max-steps", 2, "--checkpoint-every", 1,
         "--eval-every", 1, "--val-systems", 1, "--eval-windows", 2, "--select-by", "loss",
         "--val-forecast-systems", 0]
# forecast.py on two test systems, two steps ahead, the untrained model alone
FORECAST = ["--max-systems", 2, "--context-steps", 6, "--horizon", 2, "--no-baselines"]


class DiskFull:
    """``os.fsync`` (or ``os.write``, with ``call``) failing with ENOSPC for the files and folders ``hit``
    picks by path, once ``skip`` of them have gone through, ``times`` times (None: from then on): a writer
    finds the disk full at that file (as a write-back file system reports it at fsync) and every other
    file is written as usual."""

    def __init__(self, hit: Callable[[Path], bool], skip: int = 0, times: int | None = None,
                 call: Callable = REAL_FSYNC) -> None:
        self.hit, self.skip, self.times, self.call, self.seen = hit, skip, times, call, 0

    def __call__(self, fd: int, *args):
        try:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            path = None
        if path is not None and self.hit(path):
            self.seen += 1
            if self.skip < self.seen and (self.times is None or self.seen <= self.skip + self.times):
                raise OSError(errno.ENOSPC, NO_SPACE)
        return self.call(fd, *args)


def named(target: str) -> Callable[[Path], bool]:
    """The file ``target`` itself, or its temporary name while files.writing writes it."""
    stem, suffix = Path(target).stem, Path(target).suffix
    return lambda p: p.name == target or (p.name.startswith(f".{stem}{files.TMP_MARK}") and p.suffix == suffix)


# Where train.py meets a full disk: the file the one line names, and the files that find it full
TRAIN_WRITERS = {
    "train_args.json": ("train_args.json", named("train_args.json"), 0),
    "data.json": ("data.json", named("data.json"), 0),
    "metrics.jsonl": ("metrics.jsonl", named("metrics.jsonl"), 1),          # its second row
    "checkpoint": ("checkpoint", lambda p: p.parent.name == "checkpoint.tmp" and p.name == "state.safetensors", 1),
    "adapter": ("adapter", lambda p: p.parent.name.startswith(".adapter.saving-") and p.name == "data.json", 0),
    "summary.json": ("summary.json", named("summary.json"), 0),
}


def drive(script: str, argv: list, capsys) -> tuple[int, list[str]]:
    """A script's main through its own handler: (exit status, stderr's non-empty lines), its lock let go."""
    capsys.readouterr()
    code = cli.run_as_script(SCRIPTS[script], [str(a) for a in argv])
    err = capsys.readouterr().err
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    if out:
        folder.unlock_run(Path(out))
    return code, [line for line in err.splitlines() if line.strip()]


def one_error(script: str, code: int, lines: list[str], *needles: str) -> str:
    """Exit status 1, one error line (the last line; progress bars closed before it), no traceback."""
    assert not any("Traceback" in x for x in lines), "\n".join(lines)
    errs = [x for x in lines if ": error: " in x]
    assert code == 1 and len(errs) == 1 and lines[-1] == errs[0], (code, lines)
    assert errs[0].startswith(f"{script}.py: error: "), errs[0]
    for needle in needles:
        assert needle in errs[0], (needle, errs[0])
    return errs[0]


def assert_nothing_half_written(out: Path) -> None:
    """No temporary file or folder is left, and every file under a final name is whole: its JSON
    parses, metrics.jsonl has no torn line, an adapter folder holds every file, HDF5 files open."""
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert not hidden and not (out / "checkpoint.tmp").exists(), hidden
    for p in out.rglob("*.json"):
        json.loads(p.read_text())
    if (out / "metrics.jsonl").exists():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            metrics_log.read_rows(out)
    if (out / "adapter").exists():
        assert {p.name for p in (out / "adapter").iterdir()} >= {
            "adapter_config.json", "adapter_model.safetensors", "base_model.json", *rundata.ADAPTER_FILES}
        load_file(out / "adapter" / "adapter_model.safetensors")
    for p in out.glob("*.h5"):
        with h5py.File(p) as f:
            assert "truth" in f


def assert_ledger_whole(path: Path, *, closed: bool = True) -> flops.Snapshot:
    snap = flops.Ledger(path).snapshot()
    assert not snap.damage, snap.damage
    if closed:
        assert not snap.open(), snap.open()
    return snap


def rows_of(out: Path) -> list[tuple]:
    return [(r["step"], r["kind"], r["loss"]) for r in metrics_log.read_rows(out)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_ckpt, lv_data_file) -> Path:
    """train.py run through without a fault: what every run that met a full disk ends up with once it
    is run again."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train.main([str(a) for a in script_argv(tiny_ckpt, lv_data_file, out, *TRAIN)])
    folder.unlock_run(out)
    return out


# ---------------------------------------------------------------------------------------------
# files: one way to write a file whole


def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = files.write_json(tmp_path / "result.json", {"v": 1})
    monkeypatch.setattr(os, "fsync", DiskFull(named("result.json")))
    with pytest.raises(errors.WriteError, match=f"^writing {re.escape(str(path))}: {NO_SPACE}$") as e:
        files.write_json(path, {"v": 2})
    assert e.value.errno == errno.ENOSPC
    assert json.loads(path.read_text()) == {"v": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    monkeypatch.undo()
    # a writer's own failure (not the disk) removes the temporary file too, and is raised as it came
    with pytest.raises(RuntimeError, match="plot failed"), files.writing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("plot failed")
    assert json.loads(path.read_text()) == {"v": 1} and files.leftovers(tmp_path) == []


def test_a_file_is_synced_before_its_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        REAL_FSYNC(fd)

    real_replace = os.replace
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b)))
    path = files.write_text(tmp_path / "a.txt", "whole")
    (kind1, tmp), (kind2, dest), (kind3, parent) = events
    assert (kind1, kind2, kind3) == ("fsync", "rename", "fsync")
    assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".a.tmp-") and Path(tmp).suffix == ".txt"
    assert (dest, parent) == (str(path), str(tmp_path)) and path.read_text() == "whole"


def test_an_append_cut_short_by_a_full_disk_leaves_no_torn_line(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    files.append(log, '{"step": 1}\n')
    before = log.read_bytes()
    real_write, calls = os.write, []

    def write(fd: int, data: bytes) -> int:   # the first call writes 5 bytes, the next finds the disk full
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, NO_SPACE)
        return real_write(fd, bytes(data[:5]))

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(errors.WriteError, match=f"writing {re.escape(str(log))}: {NO_SPACE}"):
        files.append(log, '{"step": 2, "kind": "train"}\n')
    monkeypatch.undo()
    assert log.read_bytes() == before and len(calls) == 2


def test_an_os_error_of_the_machine_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    def full(argv):
        raise OSError(errno.ENOSPC, NO_SPACE, "/somewhere/model.bin")

    def read_only(argv):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/file")

    def missing(argv):
        raise FileNotFoundError(errno.ENOENT, "no such file", "/internal/path")

    assert cli.run_as_script(full, [], name="x.py") == 1
    assert capsys.readouterr().err == f"x.py: error: writing /somewhere/model.bin: {NO_SPACE}\n"
    assert cli.run_as_script(read_only, [], name="x.py") == 1
    assert capsys.readouterr().err == f"x.py: error: writing /ro/file: {os.strerror(errno.EROFS)}\n"
    with pytest.raises(OSError):
        cli.run_as_script(full, ["--debug"], name="x.py")
    with pytest.raises(FileNotFoundError):   # (not the machine's: a bug, with its traceback)
        cli.run_as_script(missing, [], name="x.py")


# ---------------------------------------------------------------------------------------------
# train.py: a full disk at each writer, then the same command again once there is room


@pytest.mark.parametrize("writer", list(TRAIN_WRITERS))
def test_train_meets_a_full_disk_at_each_writer_and_loses_nothing(writer, reference, tmp_path, tiny_ckpt,
                                                                  lv_data_file, monkeypatch, capsys):
    target, hit, skip = TRAIN_WRITERS[writer]
    out = tmp_path / "run"
    argv = script_argv(tiny_ckpt, lv_data_file, out, *TRAIN)
    full = DiskFull(hit, skip)
    monkeypatch.setattr(os, "fsync", full)
    code, lines = drive("train", argv, capsys)
    monkeypatch.undo()
    assert full.seen > skip
    one_error("train", code, lines, f"writing {out / target}: {NO_SPACE}")
    assert not (out / "summary.json").exists()          # no done mark
    assert_nothing_half_written(out)
    assert_ledger_whole(tmp_path / "ledger.jsonl")
    if writer == "checkpoint":   # the first checkpoint is kept whole: the run goes on from it
        assert checkpoint.read_state(checkpoint.folder(out)).step == 1

    # room again: the command that continues it (as study.py would run it) finishes the same run
    again = [*argv, "--resume" if checkpoint.exists(checkpoint.folder(out)) else "--overwrite"]
    code, lines = drive("train", again, capsys)
    assert code == 0, lines
    assert rows_of(out) == rows_of(reference)
    assert (json.loads((out / "summary.json").read_text())["val_loss"]
            == json.loads((reference / "summary.json").read_text())["val_loss"])
    assert_nothing_half_written(out)
    assert_ledger_whole(tmp_path / "ledger.jsonl")


# ---------------------------------------------------------------------------------------------
# forecast.py and evaluate.py


@pytest.mark.parametrize("target", ["forecasts.h5", "examples.png", "error_vs_horizon.png", "forecast_metrics.json"])
def test_forecast_meets_a_full_disk_and_leaves_no_done_mark_without_its_forecasts(target, tmp_path, tiny_ckpt,
                                                                                  lv_data_file, monkeypatch, capsys):
    out = tmp_path / "fc"
    monkeypatch.setattr(os, "fsync", DiskFull(named(target)))
    code, lines = drive("forecast", script_argv(tiny_ckpt, lv_data_file, out, *FORECAST), capsys)
    monkeypatch.undo()
    one_error("forecast", code, lines, f"writing {out / target}: {NO_SPACE}")
    assert not (out / "forecast_metrics.json").exists()
    assert not (out / target).exists()
    assert_nothing_half_written(out)
    assert_ledger_whole(tmp_path / "ledger.jsonl")
    item = study.Item("zeroshot", "fc", forecast.parse_args([str(a) for a in script_argv(
        tiny_ckpt, lv_data_file, out, *FORECAST)]))
    assert not item.done(tmp_path)   # a study runs it again


def test_forecast_writes_its_forecasts_first_and_its_metrics_last(tmp_path, tiny_ckpt, lv_data_file, monkeypatch):
    renamed: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(Path(b).name), real_replace(a, b)))
    out = tmp_path / "fc"
    forecast.main([str(a) for a in script_argv(tiny_ckpt, lv_data_file, out, *FORECAST)])
    results = [n for n in renamed if n in folder.WORK_FILES["forecast"]]
    assert results == ["forecasts.h5", "examples.png", "error_vs_horizon.png", "forecast_metrics.json"]
    # a plot that fails for another reason than the disk leaves the forecasts whole and no done mark
    monkeypatch.setattr(forecast.plots, "plot_error_vs_horizon", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        forecast.main([str(a) for a in script_argv(tiny_ckpt, lv_data_file, out, *FORECAST, "--overwrite")])
    assert not (out / "forecast_metrics.json").exists() and not (out / "error_vs_horizon.png").exists()
    assert_nothing_half_written(out)


def test_evaluate_meets_a_full_disk_at_its_metrics(tmp_path, tiny_ckpt, lv_data_file, monkeypatch, capsys):
    out = tmp_path / "ev"
    monkeypatch.setattr(os, "fsync", DiskFull(named("eval_metrics.json")))
    code, lines = drive("evaluate", script_argv(tiny_ckpt, lv_data_file, out, "--max-systems", 1), capsys)
    monkeypatch.undo()
    one_error("evaluate", code, lines, f"writing {out / 'eval_metrics.json'}: {NO_SPACE}")
    assert not (out / "eval_metrics.json").exists()
    assert_nothing_half_written(out)
    snap = assert_ledger_whole(tmp_path / "ledger.jsonl")
    assert snap.spent() > 0   # the work that ran is charged


# ---------------------------------------------------------------------------------------------
# the ledger: a charge that cannot be written ends the run in one line naming what it lacks


@pytest.mark.parametrize("close_fails", [False, True], ids=["the close written", "the close fails too"])
def test_a_charge_the_ledger_cannot_write_ends_the_run_naming_the_flops(close_fails, tmp_path, tiny_ckpt,
                                                                        lv_data_file, monkeypatch, capsys):
    out, ledger = tmp_path / "ev", tmp_path / "ledger.jsonl"
    # the reserve line is written; the first charge's line is not (nor, with close_fails, any line after it)
    monkeypatch.setattr(os, "write", DiskFull(lambda p: p == ledger, skip=1, times=None if close_fails else 1,
                                              call=REAL_WRITE))
    code, lines = drive("evaluate", script_argv(tiny_ckpt, lv_data_file, out, "--max-systems", 1), capsys)
    monkeypatch.undo()
    line = one_error("evaluate", code, lines, "could not write the charge line", "NOT recorded", "the run stops",
                     "FLOPs of finished work are not recorded in the ledger")
    lost = float(re.search(r"stops; (\S+) FLOPs of finished work", line).group(1))
    assert lost > 0 and not (out / "eval_metrics.json").exists()
    snap = assert_ledger_whole(ledger, closed=not close_fails)
    assert snap.spent() == 0.0                         # nothing booked twice, nothing half-booked
    [r] = snap.reservations.values()
    assert r.charged == 0.0 and r.planned >= lost
    assert ("closing the reservation failed too" in line) == close_fails


def test_pending_steps_the_ledger_cannot_take_on_the_way_out_are_named_with_what_stopped_the_run(tmp_path,
                                                                                                    monkeypatch):
    """Steps charged every 3rd (--charge-every 3): two are pending when a metrics row cannot be written;
    on the way out their charge cannot be written either, nor the close. One error says all three."""
    from experiments.lib.budget.booking import Booking

    path = tmp_path / "ledger.jsonl"
    reservation = flops.Ledger(path, budget=1e15).reserve(100.0, name="run", kind="train")
    before = path.read_bytes()
    monkeypatch.setattr(os, "write", DiskFull(lambda p: p == path, call=REAL_WRITE))
    with pytest.raises(errors.UnrecordedChargeError) as e, Booking(reservation, every=3) as booking:
        booking.step(10.0, 1)
        booking.step(15.0, 2)
        raise errors.WriteError(tmp_path / "metrics.jsonl", OSError(errno.ENOSPC, NO_SPACE))
    monkeypatch.undo()
    line = errors.one_line(e.value)
    assert "could not write the charge line of 2.500000e+01 FLOPs" in line and "NOT recorded" in line
    assert "2.5000e+01 FLOPs of finished work are not recorded" in line
    assert f"the run had stopped on: writing {tmp_path / 'metrics.jsonl'}: {NO_SPACE}" in line
    assert "closing the reservation failed too" in line
    assert booking.unrecorded == 25.0 and path.read_bytes() == before


def test_ledger_repair_on_a_full_disk_is_one_line_and_changes_nothing(tmp_path, monkeypatch, capsys):
    path = tmp_path / "ledger.jsonl"
    ledger = flops.Ledger(path, budget=1e15)
    with ledger.reserve(10.0, name="a", kind="eval") as r:
        r.charge(4.0)
    with open(path, "ab") as f:
        f.write(b'{"type": "charge", "flo\n')      # a torn line: the ledger needs its repair
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", DiskFull(lambda p: p.name.endswith(".repair-tmp")))
    code = flops_cli.run(["ledger", "--ledger", str(path), "--repair", "--yes"])
    monkeypatch.undo()
    err = [x for x in capsys.readouterr().err.splitlines() if ": error: " in x]
    assert code == 1 and len(err) == 1 and err[0].startswith("python -m flops: error: --repair: writing ")
    assert NO_SPACE in err[0] and f"{path} is unchanged" in err[0]
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# metrics.jsonl on --resume


def test_a_torn_last_metrics_line_is_dropped_on_resume_with_a_warning(tmp_path):
    log = metrics_log.MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log(RunState(step=step, tokens=10 * step, flops=1e9 * step), "train", 1.0 / step, 0.1)
    whole = (tmp_path / "metrics.jsonl").read_text()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "tr')                # killed in the middle of step 4's row
    with pytest.warns(UserWarning, match=r"metrics.jsonl: line 4 is torn"):
        metrics_log.MetricsLog(tmp_path, resume_step=2)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(whole.splitlines(keepends=True)[:2])
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,kind,loss") and [x.split(",")[:3] for x in csv_lines[1:]] == [
        ["1", "train", "1.0"], ["2", "train", "0.5"]]
    # damage anywhere but the last line is no kill's: refused, naming the line
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\nnot json\n{"step": 2, "kind": "train"}\n')
    with pytest.raises(errors.RunFolderError, match=r"metrics.jsonl: line 2 is not a metrics row"):
        metrics_log.MetricsLog(tmp_path, resume_step=2)


def test_the_resume_rewrite_of_the_metrics_is_whole_or_not_at_all(tmp_path, monkeypatch):
    log = metrics_log.MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log(RunState(step=step), "train", 1.0, 0.1)
    before = {n: (tmp_path / n).read_bytes() for n in ("metrics.jsonl", "metrics.csv")}
    for name in before:
        monkeypatch.setattr(os, "fsync", DiskFull(named(name)))
        with pytest.raises(errors.WriteError, match=f"writing {re.escape(str(tmp_path / name))}: {NO_SPACE}"):
            metrics_log.MetricsLog(tmp_path, resume_step=1)
        monkeypatch.undo()
        assert (tmp_path / "metrics.jsonl").read_bytes() == (before["metrics.jsonl"] if name == "metrics.jsonl" else
                                                              b"".join(before["metrics.jsonl"].splitlines(True)[:1]))
        assert files.leftovers(tmp_path) == []
    assert (tmp_path / "metrics.csv").read_bytes() == before["metrics.csv"]   # (its rewrite failed: the old one)


# ---------------------------------------------------------------------------------------------
# provenance


def test_resume_on_other_data_at_the_same_path_is_refused_naming_both_checksums(tmp_path, tiny_ckpt, lv_data_file,
                                                                                capsys):
    data = tmp_path / "lv.h5"
    shutil.copy(lv_data_file, data)
    out = tmp_path / "run"
    argv = script_argv(tiny_ckpt, data, out, *TRAIN)
    assert drive("train", argv, capsys)[0] == 0
    assert json.loads((out / "data.json").read_text())["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    before_sha = hashlib.sha256(data.read_bytes()).hexdigest()
    with h5py.File(data, "a") as f:                   # the file replaced in place: other numbers, same path
        f["trajectories"][0, 0, 0] += 1.0
    after_sha = hashlib.sha256(data.read_bytes()).hexdigest()
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in (".lock", "train_args.json")}
    code, lines = drive("train", [*argv, "--resume"], capsys)
    one_error("train", code, lines, f"data file {data} (sha256 {after_sha})", f"(sha256 {before_sha}",
              str(out / "data.json"))
    assert {p: p.read_bytes() for p in kept} == kept


def test_an_adapter_without_its_base_model_record_loads_with_a_warning_in_the_results(reference, tmp_path, tiny_ckpt,
                                                                                       lv_data_file):
    adapter = tmp_path / "peft_like"
    shutil.copytree(reference / "adapter", adapter)
    (adapter / "base_model.json").unlink()
    ev = evaluate.main([str(a) for a in script_argv(tiny_ckpt, lv_data_file, tmp_path / "ev", "--adapter", adapter,
                                                    "--split", "val")])
    fc = forecast.main([str(a) for a in script_argv(tiny_ckpt, lv_data_file, tmp_path / "fc", "--adapter", adapter,
                                                    *FORECAST, "--no-untrained")])
    for result, path in ((ev, tmp_path / "ev" / "eval_metrics.json"), (fc, tmp_path / "fc" / "forecast_metrics.json")):
        saved = json.loads(path.read_text())["warnings"]
        assert saved == result["warnings"] and len(saved) == 1
        assert f"adapter {adapter} has no base_model.json" in saved[0] and "could not be checked" in saved[0]


def test_an_interrupted_adapter_save_is_named_by_the_scripts(tmp_path):
    adapter = tmp_path / "adapter"
    (tmp_path / ".adapter.saving-0123456789ab").mkdir()     # a first save killed before its swap
    with pytest.raises(errors.AdapterFolderError, match=r"--adapter .*adapter: .*adapter is missing: its first save "
                                                         r"was interrupted"):
        rundata.adapter_info(adapter)


def test_a_loss_that_is_not_finite_is_no_result(reference, tmp_path, tiny_ckpt, lv_data_file, capsys):
    """An adapter whose (finite) weights overflow the logits: evaluate.py ends in one line, exit 1,
    writes no eval_metrics.json, and the work it did is charged."""
    adapter = tmp_path / "overflowing"
    shutil.copytree(reference / "adapter", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    for k, t in weights.items():
        weights[k] = torch.full_like(t, 1e38 if "lora_B" in k else 1e5)
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "ev"
    code, lines = drive("evaluate", script_argv(tiny_ckpt, lv_data_file, out, "--adapter", adapter, "--split", "val"),
                        capsys)
    one_error("evaluate", code, lines, f"the cross-entropy of {adapter} in float32 is ", ", not a finite number",
              f"no {out / 'eval_metrics.json'} is written")
    assert not (out / "eval_metrics.json").exists()
    snap = assert_ledger_whole(tmp_path / "ledger.jsonl")
    assert snap.spent() > 0


# (script, systems in the data file, the split the default --splits leave empty that the script needs first)
TOO_SMALL = [("train", 1, "val"), ("evaluate", 1, "val"), ("forecast", 1, "val"), ("study", 1, "val"),
             ("evaluate", 2, "test"), ("forecast", 2, "test"), ("study", 2, "test")]


@pytest.mark.parametrize("script, systems, split", TOO_SMALL, ids=[f"{s} {n} system(s)" for s, n, _ in TOO_SMALL])
def test_a_data_file_too_small_for_its_splits_is_one_line_in_every_script(script, systems, split, tmp_path,
                                                                          tiny_ckpt, capsys):
    traj, time_, params = generate_dataset(systems, seed=5)
    data = save_h5(tmp_path / f"lv{systems}.h5", traj, time_, params)
    if script == "study":
        argv = ["--preset", "tiny", "--model", tiny_ckpt, "--data", data, "--out", tmp_path / "study",
                "--device", "cpu", "--dtype", "fp32"]
    else:
        argv = script_argv(tiny_ckpt, data, tmp_path / script, *([] if script == "train" else ["--split", split]),
                           *(FORECAST if script == "forecast" else []))
    code, lines = drive(script, argv, capsys)
    one_error(script, code, lines, f"data file {data} holds {systems} system(s)", "--splits 0.7 0.15 0.15",
              f"the {split} split none")
    ledger = tmp_path / "study" / "ledger.jsonl" if script == "study" else tmp_path / "ledger.jsonl"
    assert not ledger.exists() or not flops.Ledger(ledger).snapshot().reservations   # refused before any booking


# ---------------------------------------------------------------------------------------------
# the study: an item is done when its mark is there, and only then


def test_the_study_counts_a_run_done_only_by_its_last_file(tmp_path, tiny_ckpt, lv_data_file):
    fc = study.Item("zeroshot", "fc", forecast.parse_args([str(a) for a in script_argv(
        tiny_ckpt, lv_data_file, tmp_path / "fc", *FORECAST)]))
    tr = study.Item("grid", "tr", train.parse_args([str(a) for a in script_argv(
        tiny_ckpt, lv_data_file, tmp_path / "tr", *TRAIN)]))
    for item, first, mark in ((fc, "forecasts.h5", "forecast_metrics.json"), (tr, "adapter", "summary.json")):
        (tmp_path / item.name).mkdir()
        (tmp_path / item.name / first).mkdir()
        assert not item.done(tmp_path)
        files.write_json(tmp_path / item.name / mark, {})
        assert item.done(tmp_path)


# ---------------------------------------------------------------------------------------------
# a real full disk: a 2 MB tmpfs as --out (mounting needs the privilege; without it the injected
# faults above stand for it)


PAGE = 4096


@pytest.fixture
def tiny_fs(tmp_path) -> Path:
    where = tmp_path / "tiny_fs"
    where.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True,
                                 text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here; the injected ENOSPC cases above cover each writer")
    if mounted.returncode:
        pytest.skip(f"a tmpfs cannot be mounted here ({mounted.stderr.strip()}); the injected ENOSPC cases above "
                    f"cover each writer")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(fs: Path, leave_pages: int) -> None:
    """Fill ``fs`` so that ``leave_pages`` pages are left free (removing an earlier filler first)."""
    (fs / "filler").unlink(missing_ok=True)
    st = os.statvfs(fs)
    size = st.f_bavail * st.f_frsize - leave_pages * PAGE
    with open(fs / "filler", "wb") as f:
        f.write(b"\0" * max(0, size))


def pages_used(fs: Path) -> int:
    st = os.statvfs(fs)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // PAGE


def test_a_real_full_disk_as_out_ends_in_one_line_with_the_ledger_intact(tiny_fs, reference, tmp_path, tiny_ckpt,
                                                                          lv_data_file, capsys):
    ledger = tmp_path / "ledger.jsonl"               # outside the full file system

    def argv_of(out: Path) -> list:
        argv = script_argv(tiny_ckpt, lv_data_file, out, *TRAIN)
        argv[argv.index("--ledger") + 1] = ledger
        return argv

    # how many pages a whole run takes, then runs that find the disk full earlier and earlier
    out = tiny_fs / "roomy"
    assert drive("train", argv_of(out), capsys)[0] == 0
    need = pages_used(tiny_fs)
    shutil.rmtree(out)
    failed = []
    for leave in sorted({0, 1, 3, need // 3, need // 2, need - 4}):
        out = tiny_fs / f"leave{leave}"
        fill(tiny_fs, leave)
        code, lines = drive("train", argv_of(out), capsys)
        if code == 0:
            continue
        line = one_error("train", code, lines, NO_SPACE)
        where = re.fullmatch(rf"train\.py: error: writing (.+): {NO_SPACE}", line).group(1)
        assert Path(where).is_relative_to(out), line
        failed.append(Path(where).name)
        assert not (out / "summary.json").exists()
        assert_nothing_half_written(out)
        assert_ledger_whole(ledger)
        shutil.rmtree(out)
    assert len(set(failed)) >= 3, failed            # the disk was found full at several writers

    # a run that met the full disk, given room, continues to the same results as a run that did not
    out = tiny_fs / "again"
    fill(tiny_fs, need // 2)
    assert drive("train", argv_of(out), capsys)[0] == 1
    (tiny_fs / "filler").unlink()
    again = [*argv_of(out), "--resume" if checkpoint.exists(checkpoint.folder(out)) else "--overwrite"]
    assert drive("train", again, capsys)[0] == 0
    assert rows_of(out) == rows_of(reference)
    assert_ledger_whole(ledger)


def test_a_real_full_disk_under_the_ledger_says_the_charge_is_not_recorded(tiny_fs, tmp_path, tiny_ckpt, lv_data_file,
                                                                           capsys):
    """The ledger on the full file system (the run folder elsewhere): its reserve line fits in the
    ledger's last page, the first charge's line does not. The run ends in one line naming the FLOPs the
    ledger lacks, and the ledger holds no partial line."""
    extra = ["--max-systems", 1]
    # the lengths of this run's reserve and charge lines, from a ledger with room
    roomy = tmp_path / "roomy.jsonl"
    argv = [*script_argv(tiny_ckpt, lv_data_file, tmp_path / "ev0", *extra)]
    argv[argv.index("--ledger") + 1] = roomy
    assert drive("evaluate", argv, capsys)[0] == 0
    reserve_len, charge_len = (len(x) + 1 for x in roomy.read_bytes().splitlines()[:2])
    # the ledger on the tmpfs, padded by a closed reservation so that the reserve line fits its page
    # and a charge line does not; then no page left
    ledger = tiny_fs / "ledger.jsonl"
    scratch = flops.Ledger(tmp_path / "pad.jsonl", budget=1e15)
    scratch.reserve(1.0, name="pad", kind="pad", config={"pad": ""}).close()
    pad = PAGE - reserve_len - charge_len // 2 - (tmp_path / "pad.jsonl").stat().st_size
    flops.Ledger(ledger, budget=1e15).reserve(1.0, name="pad", kind="pad", config={"pad": "x" * pad}).close()
    fill(tiny_fs, 0)
    argv[argv.index("--ledger") + 1] = ledger
    argv[argv.index("--out") + 1] = tmp_path / "ev"
    code, lines = drive("evaluate", argv, capsys)
    line = one_error("evaluate", code, lines, "could not write the charge line", NO_SPACE, "NOT recorded",
                     "FLOPs of finished work are not recorded in the ledger")
    assert not (tmp_path / "ev" / "eval_metrics.json").exists()
    snap = assert_ledger_whole(ledger, closed=False)
    assert snap.spent() == 0.0 and ledger.stat().st_size <= PAGE
    assert len(snap.reservations) == 2 and np.isfinite(float(re.search(r"stops; (\S+) FLOPs", line).group(1)))

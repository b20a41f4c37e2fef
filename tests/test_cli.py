"""The command line a person meets: every script's bad inputs end in one line on stderr,
``<script>: error: <message>`` naming the value or the file, exit 2 for a usage error and 1 for the
rest, no traceback, and nothing changed in an existing run folder or the ledger. Run folders are
owned: a second run on one --out, a finished --out without --overwrite, and a --resume that would
change the run are refused before any file changes."""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pytest

import flops
from experiments import evaluate, forecast, make_tiny_checkpoint, report, study, train
from experiments.lib import errors
from experiments.lib.run import cli, config
from flops import __main__ as flops_cli
from tests.conftest import script_argv

SCRIPTS = {"train": train.main, "evaluate": evaluate.main, "forecast": forecast.main, "study": study.main,
           "report": report.main, "make_tiny_checkpoint": make_tiny_checkpoint.main}


def drive(script: str, argv: list, capsys) -> tuple[int, str]:
    """Run a script's main through the handler the script itself uses; (exit status, stderr)."""
    capsys.readouterr()
    argv = [str(a) for a in argv]
    try:
        code = flops_cli.run(argv) if script == "flops" else cli.run_as_script(SCRIPTS[script], argv)
    except SystemExit as e:   # (argparse's --help only)
        code = e.code
    return code, capsys.readouterr().err


def one_error(script: str, code: int, err: str, want_code: int, *needles: str) -> str:
    name = "python -m flops" if script == "flops" else f"{script}.py"
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert code == want_code, (code, err)
    assert len(lines) == 1 and lines[0].startswith(f"{name}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tree_hash(*paths: Path) -> dict[str, str]:
    """Every file under ``paths`` (its lock file aside) -> its SHA-256."""
    out = {}
    for root in paths:
        for f in sorted(root.rglob("*") if root.is_dir() else [root]):
            if f.is_file() and f.name != ".lock":
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture
def prior(tmp_path, tiny_ckpt, lv_data_file) -> Path:
    """A run folder as an interrupted train.py leaves it (its arguments, splits, a checkpoint's
    state), beside a ledger with one closed reservation."""
    run = tmp_path / "prior"
    run.mkdir()
    argv = script_argv(tiny_ckpt, lv_data_file, run, "--max-steps", 4)
    args = train.parse_args([str(a) for a in argv])
    (run / "train_args.json").write_text(json.dumps({"argv": argv, **asdict(args)}, default=str))
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "state.json").write_text(json.dumps({"step": 2}))
    (run / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 1.0}\n')
    ledger = flops.Ledger(tmp_path / "ledger.jsonl", budget=1e15)
    with ledger.reserve(10.0, name="earlier", kind="eval", config={}) as r:
        r.charge(5.0, kind="eval")   # (a closed reservation and a charge: what the refusals must not touch)
    return run


# Refused when parsed: (script, extra arguments, what the line names)
PARSE_CASES = [
    ("train", ["--budget", 0], "--budget: 0"),
    ("train", ["--budget", "inf"], "--budget: inf"),
    ("train", ["--batch-size", 0], "--batch-size: 0"),
    ("train", ["--max-steps", -1], "--max-steps: -1"),
    ("train", ["--warmup-steps", -3], "--warmup-steps: -3"),
    ("train", ["--stride", 0], "--stride: 0"),
    ("train", ["--eval-every", -1], "--eval-every: -1"),
    ("train", ["--max-systems", -1], "--max-systems: -1"),
    ("train", ["--val-systems", 0], "--val-systems: 0"),
    ("train", ["--checkpoint-every", 0], "--checkpoint-every: 0"),
    ("train", ["--lr", "nan"], "--lr: nan"),
    ("train", ["--lr", 0], "--lr: 0"),
    ("train", ["--min-lr-ratio", 1.5], "--min-lr-ratio: 1.5"),
    ("train", ["--rank", -1], "--rank: -1"),
    ("train", ["--patience", -1], "--patience: -1"),
    ("train", ["--val-forecast-systems", -1], "--val-forecast-systems: -1"),
    ("train", ["--decimals", -1], "--decimals: -1"),
    ("train", ["--percentile", 0], "--percentile: 0"),
    ("train", ["--percentile", 101], "--percentile: 101"),
    ("train", ["--splits", 0.5, 0.5, 0.5], "--splits"),
    ("train", ["--splits", 1.2, -0.1, -0.1], "--splits"),
    ("train", ["--context-length", 1], "--context-length: 1"),
    ("train", ["--batch-size", "four"], "--batch-size: 'four' is not an integer"),
    ("train", ["--no-such-flag"], "--no-such-flag"),
    ("train", ["--rank", 0], "nothing to train"),
    ("train", ["--val-forecast-systems", 0], "--select-by mae needs --val-forecast-systems > 0"),
    ("evaluate", ["--batch-size", 0], "--batch-size: 0"),
    ("evaluate", ["--max-systems", 0], "--max-systems: 0"),
    ("forecast", ["--temperature", -1], "--temperature: -1"),
    ("forecast", ["--top-p", 2], "--top-p: 2"),
    ("forecast", ["--top-p", 0], "--top-p: 0"),
    ("forecast", ["--samples", -1], "--samples: -1"),
    ("forecast", ["--max-systems", -1], "--max-systems: -1"),
    ("forecast", ["--budget", "inf"], "--budget: inf"),
    ("forecast", ["--context-steps", 2], "--context-steps 2: the linear AR baseline needs at least 3"),
]


@pytest.mark.parametrize("script, extra, needle", PARSE_CASES,
                         ids=[f"{s} {' '.join(map(str, e))}" for s, e, _ in PARSE_CASES])
def test_a_bad_value_is_one_usage_line_and_changes_nothing(script, extra, needle, prior, tiny_ckpt, lv_data_file,
                                                           capsys):
    before = tree_hash(prior.parent)
    argv = script_argv(tiny_ckpt, lv_data_file, prior, *extra)
    code, err = drive(script, argv, capsys)
    one_error(script, code, err, 2, needle)
    assert tree_hash(prior.parent) == before


@pytest.mark.parametrize("script, argv, needle", [
    ("study", ["--budget", "inf"], "--budget: inf"),
    ("study", ["--val-systems", 0], "--val-systems: 0"),
    ("study", ["--test-systems", -2], "--test-systems: -2"),
    ("study", ["--samples", -1], "--samples: -1"),
    ("study", ["--grid-steps", 0], "--grid-steps: 0"),
    ("report", ["--budget", 0], "--budget: 0"),
    ("flops", ["--model", "x", "--context-length", "abc"], "--context-length"),
    ("flops", ["ledger", "--budget", "lots"], "--budget"),
    ("flops", ["--context-length", 4], "--model"),
])
def test_study_report_and_flops_refuse_bad_values_in_one_line(script, argv, needle, tmp_path, capsys):
    code, err = drive(script, argv + (["--out", tmp_path / "o"] if script in ("study", "report") else []), capsys)
    one_error(script, code, err, 2, needle)
    assert not (tmp_path / "o").exists()


def test_files_that_are_missing_or_damaged_are_one_line_naming_them(tmp_path, tiny_ckpt, lv_data_file, capsys):
    ledger = tmp_path / "ledger.jsonl"
    flops.Ledger(ledger).reserve(1.0, name="x", kind="eval", config={}).close()
    before = tree_hash(ledger)

    def fails(script: str, *extra, code: int = 1, out: str = "o", model: Path = tiny_ckpt,
              data: Path = lv_data_file) -> str:
        argv = script_argv(model, data, tmp_path / out, *extra)
        return one_error(script, *drive(script, argv, capsys), code)

    # a missing data file, a truncated one, NaN in it
    assert "nowhere.h5" in fails("train", out="a", data=tmp_path / "nowhere.h5")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(lv_data_file.read_bytes()[:5000])
    assert "cut.h5: not a readable HDF5 file" in fails("evaluate", out="b", data=cut)
    nan = tmp_path / "nan.h5"
    with h5py.File(nan, "w") as f:
        traj = np.ones((6, 30, 2))
        traj[2, 5, 1] = np.nan
        f["trajectories"], f["time"] = traj, np.linspace(0, 10, 30)
    assert "nan.h5: 'trajectories' has 1 non-finite value(s)" in fails("forecast", out="c", data=nan)
    # a window shorter than one time step of text (a usage error, named by its flag)
    assert "--context-length 3" in fails("train", "--context-length", 3, out="d", code=2)
    # --resume in a folder that holds no run
    assert "--resume: no checkpoint" in fails("train", "--resume", out="e")
    # a damaged adapter
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{not json")
    assert str(adapter) in fails("evaluate", "--adapter", adapter, "--max-systems", 2, out="f")
    assert tree_hash(ledger) == before   # every refusal so far before any reservation
    # a config.json that does not match its tensors, a damaged safetensors file: found as the weights load,
    # after the reservation (planned from config.json alone), which is closed with nothing charged
    spent = flops.Ledger(ledger).spent()
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_ckpt, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    line = fails("evaluate", "--max-systems", 2, "--context-length", 64, out="g", model=wrong)
    assert "model.safetensors" in line and "config.json implies" in line
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "model.safetensors: truncated or corrupt" in fails("evaluate", "--max-systems", 2, "--context-length", 64,
                                                              out="h", model=broken)
    assert "config.json" in one_error("flops", *drive("flops", ["--model", tmp_path / "nope" / "config.json",
                                                                "--context-length", 8], capsys), 1)
    assert flops.Ledger(ledger).spent() == spent
    assert {r.status for r in flops.Ledger(ledger).reservations()} == {"closed"}


def test_a_bug_keeps_its_traceback_and_debug_shows_any(tmp_path, monkeypatch, capsys):
    def broken(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        cli.run_as_script(broken, [])
    with pytest.raises(errors.DataError, match="bad file"):
        cli.run_as_script(lambda argv: (_ for _ in ()).throw(errors.DataError("bad file")), ["--debug"])
    assert cli.run_as_script(lambda argv: (_ for _ in ()).throw(errors.DataError("bad\nfile")), [],
                             name="x.py") == 1
    assert capsys.readouterr().err == "x.py: error: bad file\n"


def test_every_help_shows_defaults_and_every_option_says_what_it_does(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # (help lines unwrapped)
    for p in (cli.parser(config.TrainConfig), cli.parser(config.ForecastConfig), cli.parser(config.EvalConfig),
              report.build_parser(), make_tiny_checkpoint.build_parser()):
        assert all(a.help for a in p._actions), [a.dest for a in p._actions if not a.help]
    for p in (report.build_parser(), make_tiny_checkpoint.build_parser()):   # (each option's line ends in its default)
        text = p.format_help()
        assert issubclass(p.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
        assert text.count("(default: ") == len(p._actions) - 1, text   # (all but --help)
    for script, shown in (("train", "(default: 600)"), ("forecast", "(default: 0.7)"), ("study", "(default: cpu)"),
                          ("evaluate", "(default: runs/eval)"), ("report", "(default: runs/report)"),
                          ("make_tiny_checkpoint", "(default: 64)")):
        with pytest.raises(SystemExit):
            cli.run_as_script(SCRIPTS[script], ["--help"])
        out = capsys.readouterr().out
        assert shown in out and "%(default)" not in out and "(default: (default" not in out


def test_offline_without_a_cached_model_fails_at_once_in_one_line(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # "at once": no connection is tried and nothing waits (no retry, no back-off), whatever the clock says
    tried: list = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: tried.append(("connect", address)))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: tried.append(("getaddrinfo", a)) or [])
    monkeypatch.setattr(time, "sleep", lambda seconds: tried.append(("sleep", seconds)))
    code, err = drive("study", ["--preset", "cpu", "--dry-run", "--model", "nobody/no-such-model",
                                "--out", tmp_path / "s"], capsys)
    line = one_error("study", code, err, 1, "nobody/no-such-model", "not in the local Hub cache",
                     "hf download nobody/no-such-model", "--model")
    assert tried == [], (tried, line)


# ---------------------------------------------------------------------------------------------
# Run folders are owned


def test_a_second_run_on_one_out_is_refused_naming_the_holder(prior, tiny_ckpt, lv_data_file, capsys):
    before = tree_hash(prior.parent)
    fd = os.open(prior / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        code, err = drive("train", script_argv(tiny_ckpt, lv_data_file, prior, "--resume"), capsys)
        one_error("train", code, err, 1, "is in use by another run (pid 4242")
    finally:
        os.close(fd)
    assert tree_hash(prior.parent) == before


@pytest.mark.parametrize("change, old, new", [(["--rank", 8], "4", "8"), (["--lr", 0.01], "0.001", "0.01"),
                                              (["--max-steps", 9], "4", "9"),
                                              (["--dtype", "bf16"], "'fp32'", "'bf16'")])
def test_resume_that_changes_the_run_is_refused_before_any_file_changes(prior, tiny_ckpt, lv_data_file, capsys,
                                                                        change, old, new):
    before = tree_hash(prior.parent)
    argv = script_argv(tiny_ckpt, lv_data_file, prior, "--max-steps", 4, "--resume", *change)
    code, err = drive("train", argv, capsys)
    one_error("train", code, err, 2, f"{change[0]} was {old}", f"now {new}")
    assert tree_hash(prior.parent) == before


def test_a_folder_holding_a_run_is_refused_unless_overwrite(prior, tiny_ckpt, lv_data_file, capsys):
    before = tree_hash(prior.parent)
    small = ["--max-steps", 1, "--eval-every", 0, "--val-forecast-systems", 0, "--select-by", "loss",
             "--max-systems", 1, "--val-systems", 1, "--context-length", 32, "--batch-size", 1]
    code, err = drive("train", script_argv(tiny_ckpt, lv_data_file, prior, *small), capsys)
    one_error("train", code, err, 1, f"--out {prior} already holds a train run", "--overwrite", "--resume")
    assert tree_hash(prior.parent) == before
    (prior / "forecast_args.json").write_text("{}")
    (prior / "forecast_metrics.json").write_text("{}")
    code, err = drive("forecast", script_argv(tiny_ckpt, lv_data_file, prior), capsys)
    one_error("forecast", code, err, 1, "already holds a forecast run", "--overwrite")
    code, _ = drive("train", script_argv(tiny_ckpt, lv_data_file, prior, *small, "--overwrite"), capsys)
    assert code == 0 and (prior / "summary.json").is_file()
    assert json.loads((prior / "train_args.json").read_text())["max_steps"] == 1


def test_a_study_run_again_resumes_or_restarts_its_interrupted_runs(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(study, "launch", lambda cmd: launched.append(cmd[2:]) or 0)
    items = [study.Item("grid", name, kind(out=str(tmp_path / name)))
             for name, kind in (("done", config.TrainConfig), ("resumable", config.TrainConfig),
                                ("restart", config.TrainConfig), ("fresh", config.TrainConfig),
                                ("fc", config.ForecastConfig))]
    for name, files in (("done", ["train_args.json", "summary.json"]),
                        ("resumable", ["train_args.json", "checkpoint/state.json"]),
                        ("restart", ["train_args.json", "metrics.jsonl"]), ("fc", ["forecast_args.json"])):
        for f in files:
            (tmp_path / name / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / f).write_text("{}")
    for item in items:
        study.run_item(item, tmp_path, "r1")
    added = [[f for f in ("--resume", "--overwrite") if f in argv] for argv in launched]
    assert added == [["--resume"], ["--overwrite"], [], ["--overwrite"]]   # "done" is skipped; "fresh" starts as is
    assert all(argv[argv.index("--reservation") + 1] == "r1" for argv in launched)


# ---------------------------------------------------------------------------------------------
# report.py and make_tiny_checkpoint.py: no output replaced unasked, every file written named


@pytest.fixture
def report_runs(tmp_path) -> Path:
    """What report.py reads, by hand: a training run, an evaluation, a forecast run with two plots,
    and a ledger with one closed reservation (tmp_path/ledger.jsonl)."""
    runs_dir = tmp_path / "runs"
    (runs_dir / "t1").mkdir(parents=True)
    (runs_dir / "t1" / "summary.json").write_text(json.dumps(
        {"lr": 1e-3, "rank": 4, "context_length": 64, "steps": 2, "select_by": "loss", "best_step": 2,
         "best_val": {"loss": 1.5}, "val_loss": 1.5, "flops": 1e9}))
    (runs_dir / "t1" / "metrics.jsonl").write_text(
        '{"step": 1, "kind": "train", "loss": 2.0}\n{"step": 2, "kind": "train", "loss": 1.8}\n'
        '{"step": 2, "kind": "val", "loss": 1.5}\n')
    (runs_dir / "e1").mkdir()
    (runs_dir / "e1" / "eval_metrics.json").write_text(json.dumps({"split": "val", "loss": 1.5, "scored_tokens": 9}))
    (runs_dir / "f1").mkdir()
    (runs_dir / "f1" / "forecast_metrics.json").write_text(json.dumps({"summary": {"persistence": {
        "mae": 1.0, "mae_se": 0.1, "coverage": 1.0, "relative_score": 1.0, "relative_score_se": 0.0}}}))
    for png in ("examples.png", "error_vs_horizon.png"):
        (runs_dir / "f1" / png).write_bytes(b"\x89PNG " + png.encode())
    with flops.Ledger(tmp_path / "ledger.jsonl", budget=1e15).reserve(10.0, name="e1", kind="eval", config={}) as r:
        r.charge(5.0, kind="eval")
    return runs_dir


def report_argv(runs_dir: Path, out: Path, *extra) -> list:
    return ["--runs", runs_dir, "--ledger", runs_dir.parent / "ledger.jsonl", "--out", out, *extra]


def wrote_lines(stdout: str) -> list[Path]:
    return [Path(line.removeprefix("wrote ")) for line in stdout.splitlines() if line.startswith("wrote ")]


def lock_held(folder: Path) -> bool:
    """Whether some open file holds ``folder``/.lock (tried from a fresh descriptor)."""
    fd = os.open(folder / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def test_report_prints_every_file_it_wrote_and_regenerates_its_own(report_runs, tmp_path, capsys):
    out = tmp_path / "report"
    capsys.readouterr()
    assert cli.run_as_script(report.main, [str(a) for a in report_argv(report_runs, out)]) == 0
    printed = wrote_lines(capsys.readouterr().out)
    appeared = sorted(f for f in out.rglob("*") if f.is_file() and f.name != ".lock")
    assert sorted(printed) == appeared and len(set(printed)) == len(printed)
    assert {f.name for f in appeared} == {"report_args.json", "flops.md", "flops.csv", "loss_curves.png", "report.md",
                                          "f1_examples.png", "f1_error_vs_horizon.png"}
    assert (out / "f1_examples.png").read_bytes() == b"\x89PNG examples.png"
    assert not lock_held(out)   # (held while it wrote, let go of once done)
    # run again: its own earlier report is regenerated in place, no --overwrite needed
    (out / "report.md").write_text("stale")
    assert cli.run_as_script(report.main, [str(a) for a in report_argv(report_runs, out)]) == 0
    assert sorted(wrote_lines(capsys.readouterr().out)) == appeared
    assert "## Training runs" in (out / "report.md").read_text()


def test_report_overwrite_replaces_files_it_did_not_write_and_nothing_else(report_runs, tmp_path, capsys):
    out = tmp_path / "study"
    out.mkdir()
    (out / "report.md").write_text("the study's own report")
    (out / "plan.json").write_text("{}")
    capsys.readouterr()
    assert cli.run_as_script(report.main, [str(a) for a in report_argv(report_runs, out, "--overwrite")]) == 0
    assert out / "report.md" in wrote_lines(capsys.readouterr().out)
    assert (out / "report.md").read_text().startswith("# qwen-lora-ts report")
    assert (out / "plan.json").read_text() == "{}"


def test_make_tiny_checkpoint_overwrite_replaces_the_checkpoint_files_only(tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')   # (a stale shard index)
    (out / "notes.txt").write_text("mine")
    small = ["--hidden-size", "8", "--heads", "2", "--kv-heads", "1", "--intermediate-size", "16", "--layers", "1"]
    assert cli.run_as_script(make_tiny_checkpoint.main, ["--out", str(out), *small, "--overwrite"]) == 0
    assert not (out / "model.safetensors.index.json").exists() and (out / "notes.txt").read_text() == "mine"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        f.name for f in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 8
    # Qwen2.5-Instruct's special ids, read from the tokenizer it copies: <|im_end|> 151645, <|endoftext|> 151643
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": [151645, 151643],
                                                                        "pad_token_id": 151643}


def test_make_tiny_checkpoint_refuses_a_tokenizer_without_qwens_special_tokens(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in make_tiny_checkpoint.TOKENIZER_FILES:
        shutil.copy(make_tiny_checkpoint.default_tokenizer_dir() / name, tok / name)
    d = json.loads((tok / "tokenizer.json").read_text())
    d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] != "<|im_end|>"]
    (tok / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(errors.UsageError, match=r"tokenizer.json: has no <\|im_end\|>: not a Qwen2.5 tokenizer"):
        make_tiny_checkpoint.main(["--out", str(tmp_path / "ckpt"), "--tokenizer", str(tok)])
    assert not (tmp_path / "ckpt").exists()   # (refused before anything was written)


def _locked_by_4242(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242\n")
    return fd


def _foreign_report(out: Path) -> None:
    out.mkdir(parents=True)
    (out / "report.md").write_text("the study's own report")
    (out / "loss_curves.png").write_bytes(b"the study's own plot")


def _earlier_report_locked(out: Path) -> int:
    _foreign_report(out)
    (out / "report_args.json").write_text("{}")
    return _locked_by_4242(out)


def _a_checkpoint(out: Path) -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")


def _a_file(out: Path) -> None:
    out.write_text("not a folder")


# Refused, nothing changed: (script, how --out is found, extra arguments, exit status, what the line names)
OUTPUT_CASES = [
    ("report", _locked_by_4242, [], 1, ["is in use by another run (pid 4242"]),
    ("report", _earlier_report_locked, ["--overwrite"], 1, ["is in use by another run (pid 4242"]),
    ("report", _foreign_report, [], 1, ["already holds loss_curves.png, report.md", "not written by report.py",
                                        "--overwrite"]),
    ("make_tiny_checkpoint", _a_checkpoint, [], 1, ["is not empty (it holds config.json, model.safetensors)",
                                                    "--overwrite"]),
    ("make_tiny_checkpoint", _a_file, ["--overwrite"], 1, ["is a file, not a folder"]),
    ("make_tiny_checkpoint", _a_checkpoint, ["--kv-heads", 3, "--overwrite"], 1, ["multiple of num_key_value_heads"]),
]


@pytest.mark.parametrize("script, prepare, extra, want, needles", OUTPUT_CASES,
                         ids=[f"{s} {p.__name__.strip('_')} {' '.join(map(str, e))}".strip()
                              for s, p, e, _, _ in OUTPUT_CASES])
def test_an_output_folder_is_never_replaced_unasked(script, prepare, extra, want, needles, report_runs, tmp_path,
                                                    capsys):
    out = tmp_path / "out"
    fd = prepare(out)
    try:
        before = tree_hash(tmp_path)
        argv = report_argv(report_runs, out, *extra) if script == "report" else ["--out", out, *extra]
        code, err = drive(script, argv, capsys)
        line = one_error(script, code, err, want, *needles)
        assert str(out) in line or "num_key_value_heads" in line
        assert tree_hash(tmp_path) == before
    finally:
        if isinstance(fd, int):
            os.close(fd)


@pytest.mark.parametrize("who", ["flops", "script"])
def test_output_into_a_closed_pipe_stops_quietly(who, tiny_ckpt):
    # `... | head -1`: the reader is gone before the command writes; it ends as a C tool killed by
    # SIGPIPE would (status 141, nothing on stderr), not with a BrokenPipeError traceback
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    cmd = ([sys.executable, "-m", "flops", "--model", str(tiny_ckpt), "--context-length", "8", "--json", "--terms"]
           if who == "flops" else
           [sys.executable, "-c", "from experiments.lib.run import cli\n"
            "raise SystemExit(cli.run_as_script(lambda argv: print('0.25,1.50;' * 100_000), [], name='x.py'))"])
    p = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait() == 128 + signal.SIGPIPE and err == "", err

"""sweep.py plans against the budget (refuses or trims), runs its three stages, resumes; report.py
gathers the ledger, runs and plots into one folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import report, sweep
from flops import Ledger


def _argv(tiny_ckpt, lv_data_file, root: Path, *extra) -> list[str]:
    return ["--out", str(root / "sweep"), "--grid-steps", "2", "--final-steps", "3", "--lrs", "1e-3", "1e-2",
            "--ranks", "2", "--contexts", "64", "128", "--model", str(tiny_ckpt), "--data", str(lv_data_file),
            "--ledger", str(root / "ledger.jsonl"), "--val-systems", "2", "--max-systems", "3",
            "--eval-every", "0", "--batch-size", "2", "--dtype", "fp32", "--device", "cpu", *map(str, extra)]


def test_sweep_refuses_what_the_budget_cannot_pay(tmp_path, tiny_ckpt, lv_data_file):
    with pytest.raises(SystemExit, match=r"the sweep needs .* FLOPs but only 1\.000e\+10 are left"):
        sweep.main(_argv(tiny_ckpt, lv_data_file, tmp_path, "--budget", 1e10, "--no-trim"))
    assert Ledger(tmp_path / "ledger.jsonl").entries() == []


def test_sweep_runs_resumes_and_reports(tmp_path, tiny_ckpt, lv_data_file):
    results = sweep.main(_argv(tiny_ckpt, lv_data_file, tmp_path))
    names = [r["name"].split("/")[1] for r in results]
    best_grid = min(results[:2], key=lambda r: r["val_loss"])
    best_ctx = min(results[2:4], key=lambda r: r["val_loss"])["context_length"]
    lr = f"{best_grid['lr']:g}"
    assert names == ["grid_lr0.001_r2_ctx512", "grid_lr0.01_r2_ctx512", f"context_lr{lr}_r2_ctx64",
                     f"context_lr{lr}_r2_ctx128", f"final_lr{lr}_r2_ctx{best_ctx}"]
    # equal tokens per context run: 2 steps x 512 = 16 x 64 = 8 x 128
    assert [r["steps"] for r in results[2:4]] == [16, 8]
    for f in ("sweep_summary.csv", "sweep_summary.json", "sweep_summary.md"):
        assert (tmp_path / "sweep" / f).is_file()
    ledger = Ledger(tmp_path / "ledger.jsonl")
    spent = ledger.spent()
    assert spent == pytest.approx(sum(r["flops"] for r in results), rel=1e-9)

    # run again: everything is done, nothing is spent twice
    again = sweep.main(_argv(tiny_ckpt, lv_data_file, tmp_path))
    assert [r["name"] for r in again] == [r["name"] for r in results]
    assert Ledger(tmp_path / "ledger.jsonl").spent() == spent

    md = report.main(["--runs", str(tmp_path), "--ledger", str(tmp_path / "ledger.jsonl"),
                      "--out", str(tmp_path / "report")])
    text = md.read_text()
    assert "## FLOPs by experiment" in text and "## Training runs" in text
    assert (tmp_path / "report" / "flops.csv").read_text().count("\n") >= len(ledger.entries()) + 1
    assert (tmp_path / "report" / "loss_curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())[0]["lr"] == 1e-3


def test_sweep_trims_to_fit(tmp_path, tiny_ckpt, lv_data_file):
    full = sweep.main(_argv(tiny_ckpt, lv_data_file, tmp_path / "plan", "--dry-run"))
    assert full == []
    # a budget that fits about half of the plan: every run's steps are scaled down
    needed = sweep.plan_total(_argv(tiny_ckpt, lv_data_file, tmp_path / "plan"))
    results = sweep.main(_argv(tiny_ckpt, lv_data_file, tmp_path, "--budget", needed * 0.6, "--final-steps", 10))
    assert results[-1]["steps"] < 10
    assert Ledger(tmp_path / "ledger.jsonl", budget=needed * 0.6).remaining() >= 0

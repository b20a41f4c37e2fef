"""The training script end to end on a tiny checkpoint: it learns, resumes exactly, runs data
parallel, compiles, and refuses what the budget cannot pay for."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from experiments import train
from flops import Ledger
from tests.conftest import script_argv

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PY = str(ROOT / "experiments" / "train.py")


def _losses(run: Path, kind: str = "train") -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == kind}


def test_overfits_a_fixed_batch_and_writes_its_files(tmp_path, tiny_ckpt, lv_data_file):
    out = tmp_path / "run"
    # One system of ~1000 tokens cut into exactly two 512-token windows = the batch, every step.
    summary = train.main(script_argv(tiny_ckpt, lv_data_file, out, "--max-systems", 1, "--context-length", 512,
                                     "--stride", 512, "--batch-size", 2, "--lr", 0.3, "--max-steps", 30,
                                     "--train-lm-head-bias", "--eval-every", 0, "--checkpoint-every", 10,
                                     "--val-systems", 2))
    losses = _losses(out)
    assert len(losses) == 30
    assert losses[30] < 0.5 * losses[1], losses
    for f in ("metrics.jsonl", "metrics.csv", "summary.json", "splits.json", "encoding.json", "train_args.json",
              "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/lm_head_bias.safetensors",
              "checkpoint/state.json", "checkpoint/state.safetensors"):
        assert (out / f).is_file(), f
    assert (out / "metrics.csv").read_text().count("\n") == 30 + 1 + 1  # header, 30 steps, final val
    assert summary["data"] == str(lv_data_file)  # which data file the run read, also when it was the default
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    entries = Ledger(out.parent / "ledger.jsonl").entries()
    assert [e.kind for e in entries] == ["train", "train", "train", "eval"]
    assert sum(e.steps for e in entries) == 30
    assert summary["flops"] == pytest.approx(sum(e.flops for e in entries))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def test_resume_after_a_kill_continues_exactly(tmp_path, tiny_ckpt, lv_data_file):
    common = ["--max-systems", 6, "--context-length", 128, "--batch-size", 2, "--lr", 0.05, "--max-steps", 24,
              "--checkpoint-every", 4, "--eval-every", 4, "--val-systems", 2, "--eval-windows", 4,
              "--train-lm-head-bias"]
    straight = tmp_path / "a" / "run"
    train.main(script_argv(tiny_ckpt, lv_data_file, straight, *common))

    killed = tmp_path / "b" / "run"
    cmd = [sys.executable, TRAIN_PY, *script_argv(tiny_ckpt, lv_data_file, killed, *common)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 8:
            proc.kill()
            break
        time.sleep(0.02)
    proc.wait()
    at = json.loads(state.read_text())["step"]
    assert 8 <= at < 24, "the run was not killed mid-way"
    train.main(script_argv(tiny_ckpt, lv_data_file, killed, *common, "--resume"))

    a, b = _losses(straight), _losses(killed)
    assert sorted(b) == list(range(1, 25))  # steps logged after the checkpoint were dropped, then re-run
    assert all(abs(a[s] - b[s]) <= 1e-6 * abs(a[s]) for s in range(at + 1, 25)), (a, b)
    assert _losses(straight, "val") == pytest.approx(_losses(killed, "val"), rel=1e-6)
    entries = [e for e in Ledger(killed.parent / "ledger.jsonl").entries() if e.kind == "train"]
    assert sum(e.steps for e in entries) == 24  # each step counted once
    ledger_a = Ledger(straight.parent / "ledger.jsonl")
    assert Ledger(killed.parent / "ledger.jsonl").spent() == pytest.approx(ledger_a.spent(), rel=1e-12)


def test_torchrun_two_processes_equal_one_process(tmp_path, tiny_ckpt, lv_data_file):
    common = ["--max-systems", 6, "--context-length", 128, "--batch-size", 4, "--lr", 0.01, "--max-steps", 3,
              "--eval-every", 0, "--val-systems", 2, "--train-lm-head-bias", "--rank", 4]
    one = tmp_path / "one" / "run"
    two = tmp_path / "two" / "run"
    subprocess.run([sys.executable, TRAIN_PY, *script_argv(tiny_ckpt, lv_data_file, one, *common)],
                   env=_env(), check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                        TRAIN_PY, *script_argv(tiny_ckpt, lv_data_file, two, *common)],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    assert np.allclose(list(_losses(one).values()), list(_losses(two).values()), rtol=1e-5)
    # FLOPs over all ranks: the same global batches, so the same total
    assert Ledger(two.parent / "ledger.jsonl").spent(kind="train") == pytest.approx(
        Ledger(one.parent / "ledger.jsonl").spent(kind="train"), rel=1e-9)


def test_over_budget_run_is_refused_before_any_model_work(tmp_path, tiny_ckpt, lv_data_file):
    # A checkpoint folder without weights: anything that tried to load the model would fail differently.
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_ckpt.iterdir():
        if not f.name.endswith(".safetensors"):
            (bare / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"refused before any model work: run 'run' plans .* FLOPs but only "
                                         r"1\.0000e\+09 are left"):
        train.main(script_argv(bare, lv_data_file, out, "--budget", 1e9, "--max-steps", 5, "--max-systems", 2,
                               "--val-systems", 2))
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint").exists()
    assert Ledger(out.parent / "ledger.jsonl").entries() == []


def test_compiled_training_matches_eager(tmp_path, tiny_ckpt, lv_data_file):
    common = ["--max-systems", 2, "--context-length", 128, "--batch-size", 2, "--lr", 0.05, "--max-steps", 4,
              "--eval-every", 4, "--val-systems", 2, "--eval-windows", 4]
    eager, compiled = tmp_path / "a" / "run", tmp_path / "b" / "run"
    train.main(script_argv(tiny_ckpt, lv_data_file, eager, *common))
    train.main(script_argv(tiny_ckpt, lv_data_file, compiled, *common, "--compile"))
    a, b = _losses(eager), _losses(compiled)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a[4] < a[1]  # it learns
    assert all(abs(a[s] - b[s]) <= 1e-4 * abs(a[s]) for s in a), (a, b)

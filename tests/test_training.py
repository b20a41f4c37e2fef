"""The pieces of train.py's loop, each alone: early stopping, the batch order and learning rate, the
validation loss against transformers, the metrics files on resume, and the ledger entries."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

import qwen_min
from experiments.lib import runs, training
from experiments.lib.training import MetricsLog, RunState
from flops import Ledger


def test_early_stopping_stops_after_patience_bad_evaluations_and_keeps_the_best():
    state = RunState()
    seen = []
    for step, loss in [(10, 5.0), (20, 4.0), (30, 4.0), (40, 4.5)]:   # an equal loss is no improvement
        state.step = step
        seen.append((state.record_val(loss), state.out_of_patience(2)))
    assert seen == [(True, False), (True, False), (False, False), (False, True)]
    assert (state.best_val, state.best_step, state.bad_evals) == (4.0, 20, 2)
    state.step = 50
    assert state.record_val(3.0) and not state.out_of_patience(2)   # an improvement resets the count
    assert (state.best_val, state.best_step, state.bad_evals) == (3.0, 50, 0)
    for _ in range(100):
        state.record_val(9.0)
    assert not state.out_of_patience(0)   # patience 0: never stop


def test_batch_order_is_a_permutation_fixed_by_seed_and_epoch():
    a = training.batch_order(50, seed=3, epoch=2)
    assert sorted(a.tolist()) == list(range(50))
    assert a.tolist() == training.batch_order(50, seed=3, epoch=2).tolist()
    assert a.tolist() != training.batch_order(50, seed=3, epoch=3).tolist()
    assert a.tolist() != training.batch_order(50, seed=4, epoch=2).tolist()


def test_lr_warms_up_linearly_then_stays():
    assert [training.lr_at(s, 2.0, 4) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert training.lr_at(0, 2.0, 0) == 2.0


def test_windows_loss_equals_transformers_cross_entropy(tiny_ckpt, hf_tiny):
    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (3, 16), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[1, 9:] = -100   # the second window: real tokens up to position 9, then padding
    loss, count = training.windows_loss(model, ids, labels, batch_size=2, device=torch.device("cpu"))
    with torch.no_grad():
        logits = hf_tiny(ids).logits
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert count == 3 * 15 - 6
    assert loss == pytest.approx(want.item(), rel=1e-5)


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_metrics_log_drops_the_rows_after_the_resumed_step(tmp_path):
    log = MetricsLog(tmp_path)
    state = RunState()
    for step in range(1, 7):
        state.step, state.tokens, state.flops = step, 10 * step, 1e9 * step
        log(state, "train", 1.0 / step, 0.1, tokens_per_s=5.0)
        if step % 3 == 0:
            log(state, "val", 2.0 / step, 0.1)
    # killed after step 6, the checkpoint of step 3 resumed: steps 4-6 run again
    MetricsLog(tmp_path, resume_step=3)
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["kind"]) for r in rows] == [(1, "train"), (2, "train"), (3, "train"), (3, "val")]
    assert rows[0] == {"step": 1, "kind": "train", "loss": 1.0, "lr": 0.1, "tokens": 10, "flops": 1e9,
                       "tokens_per_s": 5.0}
    with open(tmp_path / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["step"], r["kind"], r["tokens_per_s"]) for r in table] == [
        ("1", "train", "5.0"), ("2", "train", "5.0"), ("3", "train", "5.0"), ("3", "val", "")]
    # a fresh run in the same folder starts both files over; another rank writes nothing
    MetricsLog(tmp_path, write=False)
    assert len(_rows(tmp_path / "metrics.jsonl")) == 4
    MetricsLog(tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "metrics.csv").exists()


def test_ledger_charges_every_step_once_across_a_resume(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl", budget=1e15)
    args = runs.train_parser().parse_args(["--name", "r", "--batch-size", "2", "--context-length", "8"])

    def run_to(state: RunState, step: int) -> None:   # steps of 10 FLOPs each
        state.flops += 10.0 * (step - state.step)
        state.step = step

    state = RunState()
    run_to(state, 4)
    training.charge_ledger(ledger, state, args, world=1, seconds=1.0)
    checkpointed = RunState(**vars(state))          # what the checkpoint of step 4 holds
    run_to(state, 6)                                 # ... killed here, before the next entry
    state = checkpointed
    run_to(state, 6)
    training.charge_ledger(ledger, state, args, world=1, seconds=1.0)
    training.charge_ledger(ledger, state, args, world=1, seconds=1.0)   # nothing new: no entry
    entries = ledger.entries()
    assert [(e.config["from_step"], e.config["to_step"], e.steps, e.flops, e.tokens) for e in entries] == [
        (0, 4, 4, 40.0, 4 * 2 * 8), (4, 6, 2, 20.0, 2 * 2 * 8)]
    assert ledger.spent(name="r") == 60.0

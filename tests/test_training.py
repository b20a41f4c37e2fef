"""The pieces of train.py's loop, each alone: early stopping, the batch order and learning rate, the
validation loss against transformers (and its refusal to score nothing), the metrics files on
resume, and the ledger bookings: charged as work ends, closed on any way out, signals held off
while a charge is written."""

from __future__ import annotations

import csv
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import qwen_min
from experiments.lib import errors
from experiments.lib.budget.booking import Booking
from experiments.lib.errors import Interrupted
from experiments.lib.run import windows
from experiments.lib.run.metrics_log import MetricsLog
from experiments.lib.science import data
from experiments.lib.training import evaluation, schedule, state
from experiments.lib.training.state import RunState
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
    a = schedule.batch_order(50, seed=3, epoch=2)
    assert sorted(a.tolist()) == list(range(50))
    assert a.tolist() == schedule.batch_order(50, seed=3, epoch=2).tolist()
    assert a.tolist() != schedule.batch_order(50, seed=3, epoch=3).tolist()
    assert a.tolist() != schedule.batch_order(50, seed=4, epoch=2).tolist()


def test_lr_warms_up_linearly_then_stays():
    assert [schedule.lr_at(s, 2.0, 4) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert schedule.lr_at(0, 2.0, 0) == 2.0


def test_lr_decays_to_its_floor_at_the_last_step_cosine_or_linear():
    # warm-up 2 steps, then 10 steps of decay from 2.0 to 0.1 * 2.0 at step 12
    def cos(s: int) -> float:
        return schedule.lr_at(s, 2.0, 2, schedule="cosine", total_steps=12, min_lr_ratio=0.1)

    def lin(s: int) -> float:
        return schedule.lr_at(s, 2.0, 2, schedule="linear", total_steps=12, min_lr_ratio=0.1)

    assert [cos(0), cos(1), lin(0), lin(1)] == [1.0, 2.0, 1.0, 2.0]              # the warm-up
    assert cos(2) == lin(2) == 2.0                                             # the peak, after the warm-up
    assert cos(7) == pytest.approx(0.2 + 1.8 * 0.5)                            # halfway: cos(pi / 2) = 0
    assert cos(4) == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lin(7) == pytest.approx(0.2 + 1.8 * 0.5) and lin(4) == pytest.approx(0.2 + 1.8 * 0.8)
    assert cos(12) == lin(12) == pytest.approx(0.2) and cos(50) == pytest.approx(0.2)   # the floor, and after
    assert all(cos(s) > cos(s + 1) for s in range(2, 12))
    with pytest.raises(ValueError, match="schedule 'step'"):
        schedule.lr_at(3, 2.0, 2, schedule="step", total_steps=12)


def test_windows_loss_equals_transformers_cross_entropy(tiny_ckpt, hf_tiny):
    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (3, 16), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[1, 9:] = -100   # the second window: real tokens up to position 9, then padding
    loss, count = evaluation.windows_loss(model, ids, labels, batch_size=2, device=torch.device("cpu"))
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


def test_windows_loss_refuses_to_score_nothing(tiny_ckpt):
    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)
    ids = torch.zeros(2, 8, dtype=torch.long)
    calls = []
    with pytest.raises(ValueError, match=r"the test subset: no token to score \(2 windows, every label padding\)"):
        evaluation.windows_loss(model, ids, torch.full_like(ids, -100), 2, torch.device("cpu"), what="the test subset",
                              after_batch=lambda rows, scored: calls.append(rows))
    assert calls == []   # refused before any work
    empty = data.Windows(*(torch.zeros(0, 8, dtype=torch.long),) * 3)
    with pytest.raises(errors.DataError, match=r"the validation split \(0 systems\): no windows to score"):
        windows.require_scored(empty, "the validation split (0 systems)")
    padding = data.Windows(ids, torch.full_like(ids, -100), torch.zeros_like(ids))
    with pytest.raises(errors.DataError, match=r"x: its 2 windows hold no token to score \(all padding\)"):
        windows.require_scored(padding, "x")


def test_check_finite_names_the_step():
    state.check_finite(3.5, "training", 7)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(errors.Diverged, match=rf"step 7: the validation loss is {bad}"):
            state.check_finite(bad, "validation", 7)


def _charges(ledger: Ledger) -> list[tuple]:
    return [(e.kind, e.flops, e.steps, e.tokens, e.config) for e in ledger.entries()]


def test_booking_charges_each_step_as_it_ends_and_closes_with_the_rest_released(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl", budget=1000.0)
    r = ledger.reserve(500.0, name="r", kind="train")
    with Booking(r, step_tokens=16) as booking:
        booking.step(10.0, 1)
        assert _charges(ledger) == [("train", 10.0, 1, 16, {"from_step": 0, "to_step": 1})]
        booking.step(10.0, 2)
        booking.charge(4.0, kind="eval", tokens=8, config={"step": 2})
    assert _charges(ledger)[1:] == [("train", 10.0, 1, 16, {"from_step": 1, "to_step": 2}),
                                    ("eval", 4.0, 0, 8, {"step": 2})]
    assert booking.charged == 24.0
    [rec] = ledger.reservations()
    assert (rec.status, rec.charged) == ("closed", 24.0) and ledger.remaining() == 1000.0 - 24.0


def test_booking_every_n_steps_charges_what_is_pending_on_flush_and_on_an_exception(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl", budget=1000.0)
    with pytest.raises(RuntimeError, match="boom"), Booking(ledger.reserve(500.0, name="r", kind="train"),
                                                            every=3, step_tokens=4) as booking:
        for step in range(1, 8):
            booking.step(1.0, step)
            if step == 4:
                booking.flush()   # as before a checkpoint: nothing pending in it
        raise RuntimeError("boom")
    assert [(c[2], c[4]) for c in _charges(ledger)] == [
        (3, {"from_step": 0, "to_step": 3}), (1, {"from_step": 3, "to_step": 4}),
        (3, {"from_step": 4, "to_step": 7})]
    assert ledger.reservations()[0].status == "closed" and ledger.spent() == 7.0


def test_a_signal_waits_for_a_held_block_then_the_booking_closes_and_restores_the_handlers(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl", budget=1000.0)
    before = signal.getsignal(signal.SIGTERM)
    after_kill = []
    with pytest.raises(Interrupted) as caught, Booking(ledger.reserve(500.0, name="r", kind="train")) as booking:
        with booking.held():
            os.kill(os.getpid(), signal.SIGTERM)   # delivered now, acted on at the end of the block
            after_kill.append("charged")
            booking.step(10.0, 1)
        after_kill.append("not reached")
    assert after_kill == ["charged"] and caught.value.signum == signal.SIGTERM
    assert ledger.spent() == 10.0 and ledger.reservations()[0].status == "closed"
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(Interrupted, match="SIGINT"), Booking(None) as nothing:   # another rank: charges nothing
        nothing.step(10.0, 1)
        os.kill(os.getpid(), signal.SIGINT)
    assert ledger.spent() == 10.0

"""The training script end to end on a tiny checkpoint: it learns, resumes exactly after SIGKILLs at
random moments with every FLOP that ran charged once, closes its reservation on SIGTERM and SIGINT,
stops on a loss that is not finite, runs data parallel, compiles, and refuses what the budget
cannot pay for or what has nothing to score."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import flops
import lora
import qwen_min
from experiments import forecast, train
from experiments.lib import errors
from experiments.lib.budget import planning
from experiments.lib.run import checkpoint, cli
from experiments.lib.science.lotka_volterra import load_h5
from experiments.lib.training import evaluation, schedule
from flops import Ledger
from qwen_min import QwenConfig
from tests.conftest import HANG_GUARD_S, script_argv, wait_for
from tests.number_writer import hand_forecasts, hand_paired, hand_scores

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PY = str(ROOT / "experiments" / "train.py")


def _losses(run: Path, kind: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(run) if r["kind"] == kind}


def test_overfits_a_fixed_batch_and_writes_its_files(tmp_path, tiny_ckpt, lv_data_file):
    out = tmp_path / "run"
    # One system of ~1000 tokens cut into exactly two 512-token windows = the batch, every step.
    summary = train.main(script_argv(tiny_ckpt, lv_data_file, out, "--max-systems", 1, "--context-length", 512,
                                     "--stride", 512, "--batch-size", 2, "--lr", 0.3, "--max-steps", 30,
                                     "--schedule", "constant", "--warmup-steps", 0,
                                     "--train-lm-head-bias", "--eval-every", 0, "--checkpoint-every", 10,
                                     "--val-systems", 2))
    losses = _losses(out)
    assert len(losses) == 30
    assert losses[30] < 0.5 * losses[1], losses
    for f in ("metrics.jsonl", "metrics.csv", "summary.json", "splits.json", "encoding.json", "train_args.json",
              "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/lm_head_bias.safetensors",
              "adapter/encoding.json", "adapter/splits.json", "adapter/data.json",
              "checkpoint/state.json", "checkpoint/state.safetensors"):
        assert (out / f).is_file(), f
    for f in ("encoding.json", "splits.json"):
        assert (out / "adapter" / f).read_text() == (out / f).read_text()
    assert json.loads((out / "adapter" / "data.json").read_text()) == {
        "path": str(lv_data_file.resolve()), "sha256": hashlib.sha256(lv_data_file.read_bytes()).hexdigest(),
        "systems": 40}
    assert (out / "metrics.csv").read_text().count("\n") == 30 + 1 + 1  # header, 30 steps, final val
    assert summary["data"] == str(lv_data_file)  # which data file the run read, also when it was the default
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    ledger = Ledger(out.parent / "ledger.jsonl")
    entries = ledger.entries()   # a charge per step, then per batch of the final evaluation
    assert [(e.kind, e.steps, e.config["to_step"]) for e in entries[:30]] == [("train", 1, s) for s in range(1, 31)]
    assert {e.kind for e in entries[30:]} == {"eval"} and sum(e.config["windows"] for e in entries[30:]) >= 2
    assert summary["flops"] == pytest.approx(sum(e.flops for e in entries))
    [reservation] = ledger.reservations()
    assert reservation.status == "closed" and reservation.charged == pytest.approx(summary["flops"])
    assert reservation.planned >= reservation.charged


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


# Every kind of run below: 40 steps of 2 x 32 tokens, the 2-window validation subset scored at step 0
# and every 4 steps (selection by its loss, no forecasts), a checkpoint every 3.
SMALL = ["--max-systems", 6, "--context-length", 32, "--batch-size", 2, "--lr", 0.05, "--max-steps", 40,
         "--checkpoint-every", 3, "--eval-every", 4, "--val-systems", 1, "--eval-windows", 2, "--select-by", "loss",
         "--val-forecast-systems", 0]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _shape(ckpt: Path) -> qwen_min.Qwen2:
    shape = planning.meta_model(QwenConfig.from_json(ckpt / "config.json"))
    lora.apply_lora(shape, rank=4)
    return shape


def _work_logged(rows: list[dict], shape: qwen_min.Qwen2) -> list[tuple[str, int, float]]:
    """(kind, step, FLOPs) of each training step and subset evaluation the metrics rows show, in the
    order they ran, priced by the counter at the tokens each row says were scored."""
    def cost(r: dict) -> float:
        train_row = r["kind"] == "train"
        return flops.count(shape, batch=2, seq_len=32, mode="train" if train_row else "forward",
                           scored_tokens=r["scored_tokens"]).total
    return [("train" if r["kind"] == "train" else "eval", r["step"], cost(r)) for r in rows if r["kind"] != "val_full"]


def _work_charged(ledger: Ledger, reservation: str) -> list[tuple[str, int, float]]:
    """The same, as charged to the ledger under one reservation (the final evaluation's batches apart)."""
    return [(e.kind, e.config["to_step"] if e.kind == "train" else e.config["step"], e.flops)
            for e in ledger.entries() if e.reservation == reservation and "of" not in e.config]


def _start(run: Path, ckpt: Path, data: Path, *extra, stderr: Path | None = None) -> subprocess.Popen:
    argv = [sys.executable, TRAIN_PY, *script_argv(ckpt, data, run, *SMALL, *extra)]
    err = open(stderr, "w") if stderr else subprocess.DEVNULL   # noqa: SIM115 (the child holds it)
    return subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=err)


def _wait_until_trained(ledger: Ledger, proc: subprocess.Popen, steps: int) -> str:
    """The reservation of ``proc`` once it has charged ``steps`` training steps (waiting on its ledger
    lines, as long as it runs)."""
    def charged() -> str | None:
        mine = [r.id for r in ledger.reservations() if r.processes[0]["pid"] == proc.pid]
        return mine[0] if mine and sum(e.steps for e in ledger.entries() if e.reservation == mine[0]) >= steps else None

    rid = wait_for(charged, proc, f"train.py charging {steps} steps")
    if rid is None:
        raise AssertionError(f"train.py (pid {proc.pid}) ended before charging {steps} steps: "
                             f"exit status {proc.wait()}")
    return rid


def _resume_step(run: Path) -> int | None:
    try:
        return checkpoint.read_state(run / "checkpoint").step
    except FileNotFoundError:
        return None


def test_sigkills_at_random_moments_then_resume_the_same_losses_every_flop_charged_once(tmp_path, tiny_ckpt,
                                                                                      lv_data_file):
    straight = tmp_path / "a" / "run"
    assert _start(straight, tiny_ckpt, lv_data_file).wait() == 0
    run = tmp_path / "b" / "run"
    ledger = Ledger(run.parent / "ledger.jsonl")
    rng = random.Random(7)
    processes = []   # (reservation, step it started from, the metrics rows it wrote)
    for _ in range(3):
        at = _resume_step(run)   # None: killed before its first checkpoint, so the next one starts afresh
        proc = _start(run, tiny_ckpt, lv_data_file, *(["--resume"] if at is not None else ["--overwrite"]))
        rid = _wait_until_trained(ledger, proc, steps=rng.randint(1, 8))
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
        processes.append((rid, at or 0, [r for r in _rows(run) if at is None or r["step"] > at]))
    at = _resume_step(run)
    assert _start(run, tiny_ckpt, lv_data_file, "--resume").wait() == 0   # to the end
    rows = _rows(run)
    processes.append((ledger.reservations()[-1].id, at, [r for r in rows if r["step"] > at]))

    # the same run as the uninterrupted one: every step, loss and evaluation
    a, b = _rows(straight), rows
    assert [(r["step"], r["kind"]) for r in a] == [(r["step"], r["kind"]) for r in b]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"]) for x, y in zip(a, b, strict=True)), (a, b)
    # and the learning rate of every step: the warm-up and cosine decay (SMALL's defaults) continue exactly
    lr_of = schedule.schedule_of(train.parse_args(script_argv(tiny_ckpt, lv_data_file, run, *SMALL)))
    assert [r["lr"] for r in b if r["kind"] == "train"] == [lr_of(s) for s in range(40)]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert json.loads((run / "summary.json").read_text())["steps"] == 40

    # the ledger: each process's steps and evaluations, each charged once, at the counter's price
    shape = _shape(tiny_ckpt)
    step = flops.count(shape, batch=2, seq_len=32, mode="train").total   # every position scored: the most
    final = [e for e in ledger.entries() if e.reservation == processes[-1][0] and "of" in e.config]
    n_val = sum(e.config["windows"] for e in final)
    assert sum(e.flops for e in final) == pytest.approx(flops.count(
        shape, batch=n_val, seq_len=32, mode="forward", scored_tokens=rows[-1]["scored_tokens"]).total, rel=1e-9)
    ran = sum(e.flops for e in final)
    for i, (rid, _, wrote) in enumerate(processes):
        logged, charged = _work_logged(wrote, shape), _work_charged(ledger, rid)
        assert logged, f"process {i} logged nothing"
        if i < 3 and len(charged) == len(logged) + 1:
            # killed between a charge and its metrics row: that work ran and is charged; its row was never written
            kind, at, cost = charged.pop()
            assert at - logged[-1][1] in (0, 1) and 0 < cost <= step
            ran += cost
        assert charged == logged, f"process {i}"
        ran += sum(cost for *_, cost in logged)
    assert ledger.spent() == pytest.approx(ran, rel=1e-12)   # and nothing else

    # killed runs' reservations settled, the last one closed; each reserved what was left of its plan
    records = ledger.reservations()
    assert [r.status for r in records] == ["settled"] * 3 + ["closed"]
    # the plan prices the batches the run draws: what each step scored, as the uninterrupted run logged it
    scored = {r["step"]: r["scored_tokens"] for r in a if r["kind"] == "train"}
    subset = flops.count(shape, batch=2, seq_len=32, mode="forward",
                         scored_tokens=next(r["scored_tokens"] for r in a if r["kind"] == "val")).total
    full = flops.count(shape, batch=n_val, seq_len=32, mode="forward", scored_tokens=rows[-1]["scored_tokens"]).total
    for r, (_, start, _) in zip(records, processes, strict=True):
        evals = 10 - start // 4 + (start == 0)   # at steps 0, 4, ..., 40 not run before the checkpoint
        steps = sum(flops.count(shape, batch=2, seq_len=32, mode="train", scored_tokens=scored[s]).total
                    for s in range(start + 1, 41))
        assert r.planned == pytest.approx(steps + evals * subset + full, rel=1e-9)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_charges_what_ran_closes_the_reservation_and_ends_the_process(tmp_path, tiny_ckpt, lv_data_file,
                                                                                sig):
    run = tmp_path / "run"
    ledger = Ledger(tmp_path / "ledger.jsonl")
    proc = _start(run, tiny_ckpt, lv_data_file, stderr=tmp_path / "stderr")
    rid = _wait_until_trained(ledger, proc, steps=5)
    proc.send_signal(sig)
    assert proc.wait(timeout=HANG_GUARD_S) == -sig   # died of the signal, as without a handler
    # one line says where it stopped and the exact command line that continues it
    [note] = [line for line in (tmp_path / "stderr").read_text().splitlines() if line.startswith("train.py: ")]
    assert f"interrupted by {sig.name} at step " in note and "continue with: python experiments/train.py " in note
    assert note.endswith(" --resume") or note.endswith(" --overwrite"), note
    [record] = ledger.reservations()
    assert (record.id, record.status, record.reason) == (rid, "closed", "closed by its run")
    assert _work_charged(ledger, rid) == _work_logged(_rows(run), _shape(tiny_ckpt))   # exactly: nothing lost
    assert not (run / "summary.json").exists()


@pytest.mark.parametrize("where", ["training", "validation"])
def test_a_loss_that_is_not_finite_stops_the_run_keeping_the_last_checkpoint_and_the_best_adapter(
        tmp_path, tiny_ckpt, lv_data_file, monkeypatch, where):
    if where == "training":   # the third step's loss (and so its gradients and weights) becomes NaN
        real, steps = qwen_min.chunked_cross_entropy, []

        def cross_entropy(*args, **kwargs):
            loss = real(*args, **kwargs)
            steps.extend([1] if torch.is_grad_enabled() else [])   # training steps only, not evaluations
            return loss * float("nan") if torch.is_grad_enabled() and len(steps) == 3 else loss

        monkeypatch.setattr(qwen_min, "chunked_cross_entropy", cross_entropy)
        stop, kept = r"step 3: the training loss is nan", 2
    else:   # the third evaluation of the validation subset (steps 0, 2, then 4) scores NaN
        real, evaluations = evaluation.windows_loss, []

        def windows_loss(*args, **kwargs):
            evaluations.append(1)
            loss, n = real(*args, **kwargs)
            return (float("nan") if len(evaluations) == 3 else loss), n

        monkeypatch.setattr(evaluation, "windows_loss", windows_loss)
        stop, kept = r"step 4: the validation-subset loss is nan", 3
    out = tmp_path / "run"
    with pytest.raises(errors.Diverged, match=stop + r": the run stops; .*checkpoint keeps the last good checkpoint; "
                                              r".*adapter holds the best adapter so far \(step 2\)"):
        train.main(script_argv(tiny_ckpt, lv_data_file, out, *SMALL, "--eval-every", 2, "--checkpoint-every", 1))
    assert checkpoint.read_state(out / "checkpoint").step == kept   # the NaN state was not saved over it
    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)
    lora.load_adapter(model, out / "adapter")
    params = dict(model.named_parameters())
    best = load_file(out / "checkpoint" / "best.safetensors")   # the evaluation of step 2
    assert best and all(torch.equal(params[k], v) for k, v in best.items())
    assert not (out / "summary.json").exists()
    [record] = Ledger(tmp_path / "ledger.jsonl").reservations()
    assert record.status == "closed" and record.charged > 0


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
    assert flops.summary(Ledger(two.parent / "ledger.jsonl"))["spent_by_kind"]["train"] == pytest.approx(
        flops.summary(Ledger(one.parent / "ledger.jsonl"))["spent_by_kind"]["train"], rel=1e-9)


@pytest.mark.parametrize("extra, refusal", [
    (["--budget", 1e9, "--max-steps", 5], r"refused before any model work: run 'run' plans .* FLOPs but only "
                                          r"1\.0000e\+09 are left"),
    (["--val-systems", 0], r"argument --val-systems: 0: must be at least 1"),
    (["--eval-windows", 0], r"argument --eval-windows: 0: must be at least 1"),
    (["--rank", 0], r"nothing to train: --rank 0 without --train-lm-head-bias"),
], ids=["over budget", "no validation systems", "empty validation subset", "nothing to train"])
def test_a_run_that_cannot_be_paid_for_or_scored_is_refused_before_any_model_work(tmp_path, tiny_ckpt, lv_data_file,
                                                                                   extra, refusal):
    # A checkpoint folder without weights: anything that tried to load the model would fail differently.
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_ckpt.iterdir():
        if not f.name.endswith(".safetensors"):
            (bare / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "run"
    with pytest.raises(cli.EXPECTED, match=refusal):
        train.main(script_argv(bare, lv_data_file, out, "--max-systems", 2, "--val-systems", 2, *extra))
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint").exists()
    assert Ledger(out.parent / "ledger.jsonl").entries() == []
    assert Ledger(out.parent / "ledger.jsonl").reservations() == []


def test_compiled_training_matches_eager(tmp_path, tiny_ckpt, lv_data_file):
    common = ["--max-systems", 2, "--context-length", 128, "--batch-size", 2, "--lr", 0.05, "--max-steps", 4,
              "--schedule", "constant", "--warmup-steps", 0, "--eval-every", 4, "--val-systems", 2, "--eval-windows", 4]
    eager, compiled = tmp_path / "a" / "run", tmp_path / "b" / "run"
    train.main(script_argv(tiny_ckpt, lv_data_file, eager, *common))
    train.main(script_argv(tiny_ckpt, lv_data_file, compiled, *common, "--compile"))
    a, b = _losses(eager), _losses(compiled)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a[4] < a[1]  # it learns
    assert all(abs(a[s] - b[s]) <= 1e-4 * abs(a[s]) for s in a), (a, b)


@pytest.mark.parametrize(("select_by", "scores"), [("mae", (1.0, 0.8, 0.6, 0.9, 0.7)),
                                                   ("mae", (0.5, 0.8, 0.6, 0.9, 0.7)),
                                                   ("relative", (1.0, 0.8, 0.6, 0.9, 0.7)),
                                                   ("loss", None)],
                         ids=["mae-step-6-best", "mae-untrained-best", "relative-step-6-best", "by-loss"])
def test_the_adapter_kept_is_the_one_with_the_best_validation_score(tmp_path, tiny_ckpt, lv_data_file, monkeypatch,
                                                                    number_writer, select_by, scores, capsys):
    # evaluations at steps 0, 3, 6, 9, 12 forecast 4 validation systems with a model that writes numbers
    # (tests/number_writer.py: the untrained model's text while every LoRA B is zero, the trained one's
    # after); the scores --select-by compares are scripted, everything else is the real run; the other
    # forecast score is scripted to disagree, so a criterion that looked at it would fail
    C, H, N = 8, 12, 4
    number_writer(H)
    key = {"mae": "mae", "relative": "relative_score"}.get(select_by)
    other = {"mae": "relative_score", "relative": "mae"}.get(select_by)
    real, seen, weights = evaluation.score_forecasts, [], []

    def score(model, *args, **kwargs):
        figures = real(model, *args, **kwargs)
        seen.append(figures)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        if not scores:
            return figures
        return figures | {key: scores[len(seen) - 1], other: 2.0 - scores[len(seen) - 1]}

    monkeypatch.setattr(evaluation, "score_forecasts", score)
    run = tmp_path / "run"
    summary = train.main(script_argv(tiny_ckpt, lv_data_file, run, "--max-systems", 6, "--context-length", 64,
                                     "--batch-size", 2, "--lr", 0.3, "--max-steps", 12, "--eval-every", 3,
                                     "--val-systems", 2, "--eval-windows", 2, "--val-forecast-systems", N,
                                     "--context-steps", C, "--horizon", H, "--patience", 0,
                                     "--select-by", select_by))
    rows = _rows(run)
    val = {r["step"]: r["loss"] for r in rows if r["kind"] == "val"}
    assert sorted(val) == [0, 3, 6, 9, 12] and len(seen) == 5
    by = dict(zip(sorted(val), scores, strict=True)) if scores else val
    best_step = min(by, key=lambda s: (by[s], s))
    assert summary["best_step"] == best_step
    assert summary["best_val"][key or "val_loss"] == by[best_step]

    # what each evaluation forecast, by hand: the first N validation systems, the writer's texts decoded
    # with the run's alpha, the fill rule, the MAEs and the paired difference to step 0's forecasts
    traj, _ = load_h5(lv_data_file)
    series = traj[json.loads((run / "splits.json").read_text())["val"][:N]]
    truth, last = series[:, C:C + H], series[:, C - 1]
    alpha = json.loads((run / "encoding.json").read_text())["alpha"]
    untrained, trained = (hand_forecasts(series, alpha, C, H, who)[1] for who in ("untrained", "trained"))
    paired = hand_paired(trained, untrained, truth, last)
    for r in (r for r in rows if r["kind"] == "val_forecast"):
        values = untrained if r["step"] == 0 else trained   # (every LoRA B is zero at step 0 only)
        mine = hand_scores(values, truth, last)
        assert 0 < mine["coverage"] < 1 and r["coverage"] == pytest.approx(mine["coverage"], rel=1e-12)
        assert r["mae_h1_10"] == pytest.approx(mine["h1_10"], rel=1e-12)
        assert r["mae_h11_25"] == pytest.approx(mine["h11_25"], rel=1e-12)
        if not scores:   # (not scripted: the real figures)
            assert r["mae"] == pytest.approx(mine["mae"], rel=1e-12)
            assert r["relative_score"] == pytest.approx(mine["relative"], rel=1e-12)
        # every evaluation records its paired difference to the untrained model's (step 0's) forecasts,
        # per horizon block: zero at step 0, the trained texts' difference after
        d = r["vs_untrained"]
        assert d["systems"] == N and set(d["blocks"]) == {"h1_10", "h11_25"}
        if r["step"] == 0:
            assert d["mae_diff"] == 0.0 and d["se"] == 0.0 and d["better"] == 0 and d["median"] == 0.0
        else:
            assert d["mae_diff"] == pytest.approx(paired["mae_diff"], rel=1e-12) and d["mae_diff"] != 0.0
            assert d["se"] == pytest.approx(paired["se"], rel=1e-12)
            assert d["better"] == paired["better"]
            assert d["blocks"]["h1_10"]["mae_diff"] == pytest.approx(paired["h1_10"], rel=1e-12)
            assert d["blocks"]["h1_10"]["better"] == paired["h1_10_better"]
            assert d["median"] == pytest.approx(paired["median"], rel=1e-12)
            assert d["blocks"]["h1_10"]["median"] == pytest.approx(paired["h1_10_median"], rel=1e-12)
    # metrics.csv flattens the overall figures; each evaluation's line is printed as it ends
    with (run / "metrics.csv").open(newline="") as f:
        csv_rows = [r for r in csv.DictReader(f) if r["kind"] == "val_forecast" and r["step"] != "0"]
    assert len(csv_rows) == 4
    for r in csv_rows:
        assert int(r["vs_untrained_better"]) == paired["better"]
        assert float(r["vs_untrained_median"]) == pytest.approx(paired["median"], rel=1e-12)
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert [ln.split(":")[0] for ln in printed] == ["step 0 (untrained)", "step 3", "step 6", "step 9", "step 12"]
    assert f"all {paired['mae_diff']:+.3f} ± {paired['se']:.3f} ({paired['better']}/{N}, " \
           f"median {paired['median']:+.3f})" in printed[1]
    # the forecasts each evaluation scored: numbers where the texts decode, NaN only where they do not
    for values, figures in zip([untrained] + [trained] * 4, seen, strict=True):
        ok = np.isfinite(values).all(-1)
        assert (np.isfinite(figures["forecasts"]).all(-1) == ok).all() and ok.any()
        assert np.array_equal(figures["forecasts"][ok], values[ok])
    kept = weights[sorted(val).index(best_step)]
    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)
    lora.load_adapter(model, run / "adapter")
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in kept.items())
    if best_step == 0:   # the untrained model kept: every LoRA B still zero, so the model is the base model
        assert all(not v.any() for k, v in kept.items() if "lora_B" in k)

    # the forecasts scored at step 0 are forecast.py's of the untrained model on the same systems
    rep = forecast.main(script_argv(tiny_ckpt, lv_data_file, tmp_path / "fc", "--split", "val", "--max-systems", N,
                                    "--context-steps", C, "--horizon", H, "--no-baselines"))
    first = next(r for r in rows if r["kind"] == "val_forecast")
    for figure in ("mae_h1_10", "coverage"):   # (not scripted)
        assert first[figure] == pytest.approx(rep["summary"]["untrained"][figure], rel=1e-12)
    assert seen[0]["mae"] == pytest.approx(rep["summary"]["untrained"]["mae"], rel=1e-12)

    # every evaluation's forecasts charged as kind eval, one generate call each
    ledger = Ledger(tmp_path / "ledger.jsonl")
    calls = [e for e in ledger.entries() if e.kind == "eval" and "forecast" in e.config]
    assert [e.config["step"] for e in calls] == [0, 3, 6, 9, 12]


def test_a_reservation_is_a_ceiling_the_run_stops_before_work_it_cannot_pay_for(tmp_path, tiny_ckpt, lv_data_file):
    # a parent's reservation (as a study makes) holding the untrained evaluation and 2.5 steps of SMALL:
    # the run charges steps 1 and 2, then stops before step 3, and the ledger never passes what was held
    run = tmp_path / "run"
    ledger = Ledger(tmp_path / "ledger.jsonl")
    shape = _shape(tiny_ckpt)
    step = flops.count(shape, batch=2, seq_len=32, mode="train").total          # every position scored: the most
    subset = flops.count(shape, batch=2, seq_len=32, mode="forward").total
    held = subset + 2.5 * step
    parent = ledger.reserve(held, name="parent", kind="study")
    with pytest.raises(flops.ReservationExceeded, match="step 3 would cost"):
        train.main(script_argv(tiny_ckpt, lv_data_file, run, *SMALL, "--reservation", parent.id))
    charged = [e for e in ledger.entries() if e.reservation == parent.id]
    assert sum(e.flops for e in charged) <= held
    assert sum(e.steps for e in charged) == 2 and [r["step"] for r in _rows(run) if r["kind"] == "train"] == [1, 2]
    parent.close()

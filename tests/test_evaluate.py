"""evaluate.py end to end: the untrained model, and a trained adapter scored on its run's own systems,
also from a folder it was copied to; another data file only when allowed (and then with a warning in
the results), its training systems never; every batch charged under one reservation."""

from __future__ import annotations

import json
import shutil

import pytest

import lora
from experiments import evaluate, train
from experiments.lib import errors
from experiments.lib.science import lotka_volterra
from flops import Ledger
from tests.conftest import script_argv


def test_evaluate_untrained_and_adapter(tmp_path, tiny_ckpt, lv_data_file):
    run = tmp_path / "run"
    train.main(script_argv(tiny_ckpt, lv_data_file, run, "--max-systems", 2, "--context-length", 128,
                           "--batch-size", 2, "--lr", 0.3, "--max-steps", 10, "--eval-every", 0, "--val-systems", 2,
                           "--train-lm-head-bias"))
    base = evaluate.main(script_argv(tiny_ckpt, lv_data_file, tmp_path / "e0", "--split", "val", "--max-systems", 2,
                                     "--context-length", 128, "--splits", 0.7, 0.15, 0.15))
    tuned = evaluate.main(script_argv(tiny_ckpt, lv_data_file, tmp_path / "e1", "--split", "val", "--max-systems", 2,
                                      "--context-length", 128, "--adapter", run / "adapter"))
    # the trained run's own final validation loss on the same two systems
    assert tuned["loss"] == pytest.approx(json.loads((run / "summary.json").read_text())["val_loss"], rel=1e-6)
    assert tuned["loss"] < base["loss"]
    assert json.loads((tmp_path / "e1" / "eval_metrics.json").read_text())["warnings"] == []
    ledger = Ledger(tmp_path / "ledger.jsonl")
    [reservation] = [r for r in ledger.reservations() if r.name == "e1"]
    charges = [e for e in ledger.entries() if e.name == "e1"]
    assert len(charges) == -(-tuned["windows"] // 4) and {e.kind for e in charges} == {"eval"}   # one per batch
    assert all(e.reservation == reservation.id for e in charges) and reservation.status == "closed"
    assert sum(e.flops for e in charges) == pytest.approx(tuned["flops"]) and tuned["flops"] > 0
    assert reservation.planned == pytest.approx(tuned["flops"], rel=1e-12)   # planned at the tokens it scores

    # the adapter folder alone, copied elsewhere, no --data: its own systems, scaling and data file
    moved = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(run / "adapter", moved)
    argv = script_argv(tiny_ckpt, lv_data_file, tmp_path / "e2", "--split", "val", "--max-systems", 2,
                       "--context-length", 128, "--adapter", moved, "--seed", 5)
    del argv[argv.index("--data"):argv.index("--data") + 2]
    again = evaluate.main(argv)
    assert again["loss"] == tuned["loss"] and again["data"] == str(lv_data_file.resolve())

    # another data file: refused before any work, or scored with a warning in the results
    traj, time, params = lotka_volterra.generate_dataset(40, seed=6)
    other = lotka_volterra.save_h5(tmp_path / "other.h5", traj, time, params)
    argv = script_argv(tiny_ckpt, other, tmp_path / "e3", "--split", "val", "--max-systems", 1, "--context-length", 128,
                       "--adapter", moved)
    with pytest.raises(errors.DataError,
                       match=r"other\.h5 \(sha256 [0-9a-f]{64}\) is not the one adapter .* was trained on"):
        evaluate.main(argv)
    assert [r.name for r in ledger.reservations()].count("e3") == 0
    evaluate.main(argv + ["--allow-other-data"])   # (the refused run left only its setup: no --overwrite needed)
    [warning] = json.loads((tmp_path / "e3" / "eval_metrics.json").read_text())["warnings"]
    assert str(other) in warning and str(lv_data_file.resolve()) in warning
    with pytest.raises(errors.UsageError, match="--split train: adapter .* was trained on these systems"):
        evaluate.main(script_argv(tiny_ckpt, lv_data_file, tmp_path / "e4", "--split", "train", "--adapter", moved))

    # another base model (the same architecture, other weights): refused, or scored with a warning
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_ckpt, other_base)
    from safetensors.torch import load_file, save_file
    weights = load_file(str(other_base / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, str(other_base / "model.safetensors"), metadata={"format": "pt"})
    argv = script_argv(other_base, lv_data_file, tmp_path / "e5", "--split", "val", "--max-systems", 1,
                       "--context-length", 128, "--adapter", moved)
    refusal = "--adapter: adapter .* was trained on another base model.*--allow-other-base"
    with pytest.raises(lora.AdapterError, match=refusal):
        evaluate.main(argv)
    evaluate.main(argv + ["--allow-other-base"])
    [warning] = json.loads((tmp_path / "e5" / "eval_metrics.json").read_text())["warnings"]
    assert "another base model" in warning and str(other_base) in warning

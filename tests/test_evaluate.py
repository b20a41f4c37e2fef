"""evaluate.py end to end: the untrained model, and a trained adapter scored on its run's own systems."""

from __future__ import annotations

import json

import pytest

from experiments import evaluate, train
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
    assert (tmp_path / "e1" / "eval_metrics.json").is_file()
    e = [x for x in Ledger(tmp_path / "ledger.jsonl").entries() if x.name == "e1"]
    assert len(e) == 1 and e[0].flops == tuned["flops"] > 0

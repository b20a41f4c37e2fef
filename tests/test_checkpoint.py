"""The training checkpoint: a save and a load give back the weights, AdamW's moments, the RNG, the
run's state and the best adapter, so training continues as if never stopped; a crash mid-save
leaves a readable checkpoint."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from experiments.lib.run import checkpoint
from experiments.lib.training.state import RunState, trainable_copy


def _model_and_opt(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)   # a frozen base, a trained head
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(5, 4)).square().sum().backward()   # randn: the RNG state matters too
    opt.step()
    opt.zero_grad()


def test_a_resumed_run_continues_exactly(tmp_path):
    model, opt = _model_and_opt(0)
    for _ in range(3):
        _step(model, opt)
    best = trainable_copy(model)
    _step(model, opt)
    state = RunState(step=4, epoch=1, position=6, best_val=0.25, best_step=3, bad_evals=1, tokens=80, flops=1.5e9)
    checkpoint.save(tmp_path / "checkpoint", model, opt, state, best)
    for _ in range(2):
        _step(model, opt)

    resumed, resumed_opt = _model_and_opt(0)   # the same base, freshly loaded; an optimizer without moments
    with torch.no_grad():
        resumed[1].weight.normal_()            # ... and other trained weights
    torch.manual_seed(123)                     # ... and another RNG state
    assert checkpoint.read_state(tmp_path / "checkpoint") == state   # the state alone, before any model exists
    state_back, best_back = checkpoint.load(tmp_path / "checkpoint", resumed, resumed_opt)
    assert state_back == state
    assert best_back.keys() == best.keys() and all(torch.equal(best[k], best_back[k]) for k in best)
    assert set(best) == {"1.weight", "1.bias"}  # the trained weights only
    for _ in range(2):
        _step(resumed, resumed_opt)
    for a, b in zip(model[1].parameters(), resumed[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_fresh_state_round_trips_with_its_infinite_best(tmp_path):
    model, opt = _model_and_opt(0)
    checkpoint.save(tmp_path / "checkpoint", model, opt, RunState(), {})
    state, best = checkpoint.load(tmp_path / "checkpoint", model, opt)
    assert state == RunState() and math.isinf(state.best_val) and best == {}


def test_a_crash_between_the_renames_leaves_the_previous_checkpoint(tmp_path):
    model, opt = _model_and_opt(0)
    folder = tmp_path / "checkpoint"
    checkpoint.save(folder, model, opt, RunState(step=1), {})
    checkpoint.save(folder, model, opt, RunState(step=2), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]   # no .tmp or .old left behind
    os.replace(folder, folder.with_name("checkpoint.old"))   # the moment after the old one moved aside
    assert checkpoint.load(folder, model, opt)[0].step == 2
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load(tmp_path / "elsewhere", model, opt)


def test_a_state_with_fields_this_version_does_not_know_is_refused_naming_them(tmp_path):
    model, opt = _model_and_opt(0)
    folder = tmp_path / "checkpoint"
    checkpoint.save(folder, model, opt, RunState(step=3, flops=30.0), {})
    fields = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**fields, "logged_step": 3}))
    with pytest.raises(ValueError, match=r"\['logged_step'\] are not a checkpoint of this train.py"):
        checkpoint.read_state(folder)

"""experiments/train.py's train_loop lifted out: on the tiny model, with no ledger, no run folder and no
config object. The reference is a hand-written AdamW loop on the full logits' cross-entropy
(torch.nn.functional, not the chunked loss the loop uses), drawing the batches the loop's docstring
promises: each epoch a permutation seeded by (seed, epoch), taken batch_size windows at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lora
import qwen_min
from experiments.lib import errors
from experiments.lib.science import data, llmtime
from experiments.lib.science.lotka_volterra import generate_dataset
from experiments.lib.training.state import RunState
from experiments.train import Hooks, train_loop

CONTEXT = 32


@pytest.fixture(scope="module")
def windows(tiny_ckpt) -> data.Windows:
    """The first ten training windows (32 tokens each) of two generated systems' LLMTIME text."""
    trajectories = generate_dataset(2, seed=2)[0][:, :20]
    alpha = llmtime.fit_alpha(trajectories)
    texts = [llmtime.encode(t, alpha=alpha, decimals=2) for t in trajectories]
    w = data.training_windows(texts, qwen_min.load_tokenizer(tiny_ckpt), context_length=CONTEXT, stride=CONTEXT // 2)
    assert len(w.input_ids) >= 10 and w.input_ids.shape[1] == CONTEXT
    return w.head(10)


def _model_and_opt(ckpt, lr: float) -> tuple[qwen_min.Qwen2, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = qwen_min.from_pretrained(ckpt, dtype=torch.float32)
    lora.apply_lora(model, rank=4)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def _full_logits_loss(model: qwen_min.Qwen2, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the scored labels, from the whole [B, T, V] logits."""
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _batches(n_windows: int, batch_size: int, seed: int, steps: int) -> list[np.ndarray]:
    out, epoch, position = [], 0, 0
    while len(out) < steps:
        if position + batch_size > n_windows:
            epoch, position = epoch + 1, 0
        out.append(np.random.default_rng([seed, epoch]).permutation(n_windows)[position:position + batch_size])
        position += batch_size
    return out


def test_the_loop_runs_alone_and_the_loss_falls(tiny_ckpt, windows):
    model, opt = _model_and_opt(tiny_ckpt, lr=1e-2)
    with torch.no_grad():
        before = _full_logits_loss(model, windows.input_ids, windows.labels).item()
    state = RunState()
    stopped = train_loop(model, opt, windows, state, max_steps=24, batch_size=4, seed=0, lr_of=lambda step: 1e-2)
    with torch.no_grad():
        after = _full_logits_loss(model, windows.input_ids, windows.labels).item()
    assert not stopped and state.step == 24 and state.tokens == 24 * 4 * CONTEXT
    assert (state.epoch, state.position) == (11, 8)   # two batches of 4 an epoch of 10 windows: 24 in 12 epochs
    assert before > 11.0 and after < before - 0.2, (before, after)   # random weights: near ln(151936) = 11.93


def test_the_loop_is_adamw_on_the_mean_cross_entropy_of_its_batches(tiny_ckpt, windows):
    lrs = [1e-3, 2e-3, 3e-3, 3e-3, 1e-3]
    model, opt = _model_and_opt(tiny_ckpt, lr=0.0)
    train_loop(model, opt, windows, RunState(), max_steps=len(lrs), batch_size=4, seed=3, lr_of=lrs.__getitem__)

    ref, ref_opt = _model_and_opt(tiny_ckpt, lr=0.0)
    for lr, batch in zip(lrs, _batches(len(windows.input_ids), 4, seed=3, steps=len(lrs)), strict=True):
        for g in ref_opt.param_groups:
            g["lr"] = lr
        _full_logits_loss(ref, windows.input_ids[batch], windows.labels[batch]).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert trained.keys() == want.keys() and any("lora_B" in n for n in trained)
    assert all(torch.allclose(trained[n], want[n], atol=1e-6) for n in want)
    assert any(want[n].abs().max() > 1e-3 for n in want if "lora_B" in n)   # (the steps moved the adapters)


class Recorder(Hooks):
    """Every call the loop makes to its hooks, in order; the evaluation after step ``stop_at`` asks it to stop."""

    def __init__(self, stop_at: int) -> None:
        self.calls: list[tuple] = []
        self.stop_at = stop_at

    def before_step(self, state, scored):
        self.calls.append(("before_step", state.step, scored))

    def on_step(self, state, loss, lr, *, tokens_per_s, scored_tokens):
        self.calls.append(("on_step", state.step, lr, scored_tokens))

    def evaluate(self, model, state, lr):
        self.calls.append(("evaluate", state.step, model.training))
        return state.step >= self.stop_at

    def after_step(self, state, *, stopping):
        self.calls.append(("after_step", state.step, stopping))


def test_hooks_see_each_step_and_an_evaluation_stops_the_loop(tiny_ckpt, windows):
    model, opt = _model_and_opt(tiny_ckpt, lr=1e-3)
    hooks, state = Recorder(stop_at=4), RunState()
    stopped = train_loop(model, opt, windows, state, max_steps=10, batch_size=2, seed=1, lr_of=lambda s: 0.5 * s,
                         eval_every=2, hooks=hooks)
    assert stopped and state.step == 4
    scored = [int((windows.labels[b] != -100).sum()) for b in _batches(10, 2, seed=1, steps=4)]
    step = [[("before_step", k, scored[k]), ("on_step", k + 1, 0.5 * k, scored[k])] for k in range(4)]
    assert hooks.calls == [*step[0], ("after_step", 1, False),
                           *step[1], ("evaluate", 2, True), ("after_step", 2, False),
                           *step[2], ("after_step", 3, False),
                           *step[3], ("evaluate", 4, True), ("after_step", 4, True)]


def test_a_loss_that_is_not_finite_stops_the_loop(tiny_ckpt, windows):
    # a NaN learning rate makes the first step's update NaN: the second step's loss is the first not finite
    model, opt = _model_and_opt(tiny_ckpt, lr=1e-3)
    state = RunState()
    with pytest.raises(errors.Diverged, match="step 2: the training loss is nan"):
        train_loop(model, opt, windows, state, max_steps=5, batch_size=2, seed=0, lr_of=lambda s: float("nan"))
    assert state.step == 2

"""Splits without leaks, alpha from train only, token windows, forecast prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.data import forecast_examples, split_systems, training_windows, window_starts
from experiments.llmtime import EncodingConfig, decode, encode, fit_alpha
from experiments.lotka_volterra import generate_dataset


def test_splits_are_disjoint_complete_and_seeded():
    s = split_systems(1000, seed=3)
    assert [len(s[k]) for k in ("train", "val", "test")] == [700, 150, 150]
    allidx = np.concatenate(list(s.values()))
    assert len(set(allidx.tolist())) == 1000 and set(allidx.tolist()) == set(range(1000))
    again = split_systems(1000, seed=3)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    assert not np.array_equal(s["train"], split_systems(1000, seed=4)["train"])
    with pytest.raises(ValueError, match="summing to 1"):
        split_systems(10, fractions=(0.5, 0.5, 0.5))


def test_alpha_depends_on_training_systems_only():
    traj, _, _ = generate_dataset(60, seed=0)
    s = split_systems(60, seed=0)
    alpha = fit_alpha(traj[s["train"]])
    changed = traj.copy()
    changed[s["val"]] *= 7.0
    changed[s["test"]] = 0.0
    assert fit_alpha(changed[s["train"]]) == alpha


def test_window_starts_cover_everything():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(3, 4, 2) == [0]


def test_windows_shift_labels_and_never_score_padding(tokenizer_dir):
    from qwen_min import Tokenizer

    tok = Tokenizer(tokenizer_dir)
    traj, _, _ = generate_dataset(3, seed=0)
    alpha = fit_alpha(traj)
    texts = [encode(x[:n], alpha=alpha) for x, n in zip(traj, (100, 30, 5), strict=True)]
    w = training_windows(texts, tok, context_length=128, stride=64)
    assert w.input_ids.shape[1] == 128
    scored = w.labels != -100
    assert not (w.labels[scored] == tok.pad_id).any()
    assert (w.input_ids[w.attention_mask == 0] == tok.pad_id).all()
    # label t is token t + 1 of the same window, wherever both are real
    both = w.attention_mask[:, 1:].bool()
    assert torch.equal(w.labels[:, :-1][both], w.input_ids[:, 1:][both])
    assert (w.labels[:, -1] == -100).all()
    # the short series (5 steps, < 128 tokens) is one padded window holding its whole text
    short = tok.encode(texts[2])
    row = [i for i in range(len(w.input_ids)) if w.attention_mask[i].sum() == len(short)]
    assert row and w.input_ids[row[0], :len(short)].tolist() == short


def test_forecast_prompts_end_on_a_separator_and_targets_align():
    traj, _, _ = generate_dataset(4, seed=1)
    enc = EncodingConfig(alpha=fit_alpha(traj))
    ex = forecast_examples(traj, np.array([2, 0]), enc, context_steps=50, horizon=20)
    assert [e.system for e in ex] == [2, 0]
    for e in ex:
        assert e.prompt.endswith(";") and e.prompt.count(";") == 50
        back, _ = decode(e.prompt, alpha=enc.alpha)
        assert back.shape == (50, 2)
        assert np.array_equal(e.target, traj[e.system, 50:70])
    with pytest.raises(ValueError, match="must fit"):
        forecast_examples(traj, np.array([0]), enc, context_steps=90, horizon=20)

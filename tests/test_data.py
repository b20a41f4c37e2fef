"""Splits without leaks, alpha from train only, token windows, forecast prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.lib.science.data import (
    forecast_examples,
    load_splits,
    save_splits,
    split_systems,
    training_windows,
    window_starts,
)
from experiments.lib.science.llmtime import EncodingConfig, decode, encode, fit_alpha
from experiments.lib.science.lotka_volterra import generate_dataset


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
    for n in range(0, 12):   # any n and fractions: sizes add up, nothing shared
        for fr in [(0.7, 0.15, 0.15), (0.0, 0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (1.0, 0.0, 0.0)]:
            parts = split_systems(n, fr, seed=n)
            assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(n))


def test_splits_saved_and_checked(tmp_path):
    s = split_systems(50, seed=1)
    path = save_splits(tmp_path / "splits.json", s)
    back = load_splits(path, n_systems=50)
    assert all(np.array_equal(s[k], back[k]) for k in ("train", "val", "test"))
    (tmp_path / "bad.json").write_text('{"train": [0, 1, 2], "val": [2], "test": [3]}')
    with pytest.raises(ValueError, match="two splits"):
        load_splits(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="outside"):
        load_splits(path, n_systems=10)


def test_alpha_depends_on_training_systems_only():
    traj, _, _ = generate_dataset(60, seed=0)
    s = split_systems(60, seed=0)
    alpha = fit_alpha(traj[s["train"]])
    changed = traj.copy()
    changed[s["val"]] *= 7.0
    changed[s["test"]] = 0.0
    assert fit_alpha(changed[s["train"]]) == alpha
    # ... while a change to the training systems does move it, so the check above is not vacuous
    changed[s["train"][:20]] *= 3.0
    assert fit_alpha(changed[s["train"]]) != alpha


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


def test_windows_from_token_ids_cover_every_token_once_scored():
    # distinct ids, so a token's id tells its position: the check needs no knowledge of window_starts
    n, L = 45, 8
    ids = list(range(1000, 1000 + n))
    for stride in (1, 3, L - 1, None, L):
        w = training_windows([ids], context_length=L, stride=stride, pad_id=-1)
        assert (w.attention_mask == 1).all()   # 45 tokens > 8: no window needs padding
        scored = set()
        for row, lab in zip(w.input_ids.tolist(), w.labels.tolist(), strict=True):
            assert row == list(range(row[0], row[0] + L))          # a contiguous piece of the series
            assert lab == row[1:] + [-100]
            scored |= set(lab[:-1])
        if stride != L:   # overlapping windows: every next token is a target
            assert scored == set(ids[1:])
        else:             # back to back: the first token of each later window is input only
            assert scored == set(ids[1:]) - {1000 + k for k in range(L, n - L + 1, L)}
    short = training_windows([[5, 6, 7]], context_length=6, pad_id=0)
    assert short.input_ids.tolist() == [[5, 6, 7, 0, 0, 0]]
    assert short.labels.tolist() == [[6, 7, -100, -100, -100, -100]]
    assert short.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0]]
    # a pad id that is also a real token: it is scored where it is real, never where it pads
    same = training_windows([[5, 0, 7]], context_length=5, pad_id=0)
    assert same.labels.tolist() == [[0, 7, -100, -100, -100]]
    with pytest.raises(ValueError, match="stride"):
        training_windows([ids], context_length=L, stride=L + 1, pad_id=0)
    with pytest.raises(ValueError, match="pad_id"):
        training_windows([ids], context_length=L)
    with pytest.raises(ValueError, match="tokenizer"):
        training_windows(["0.1,0.2"], context_length=L, pad_id=0)


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
        whole = encode(traj[e.system, :70], alpha=enc.alpha, decimals=enc.decimals) + ";"
        assert e.prompt + e.target_text == whole and e.target_text.count(";") == 20
    with pytest.raises(ValueError, match="must fit"):
        forecast_examples(traj, np.array([0]), enc, context_steps=90, horizon=20)


def test_prompt_and_target_tokens_join_exactly(tokenizer_dir):
    # the prompt ends on ';' so its tokens followed by the target's are the tokens of the whole text
    from qwen_min import Tokenizer

    tok = Tokenizer(tokenizer_dir)
    traj, _, _ = generate_dataset(3, seed=4)
    enc = EncodingConfig(alpha=fit_alpha(traj))
    for e in forecast_examples(traj, np.arange(3), enc, context_steps=40, horizon=30):
        assert tok.encode(e.prompt) + tok.encode(e.target_text) == tok.encode(e.prompt + e.target_text)

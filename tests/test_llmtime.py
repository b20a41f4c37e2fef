"""LLMTIME encoding: exact round trips, a decoder that never raises nor misaligns, the real tokenizer."""

from __future__ import annotations

import random

import numpy as np
import pytest

from experiments.llmtime import decode, encode, fit_alpha
from experiments.lotka_volterra import generate_dataset


def test_format():
    assert encode(np.array([[0.25, 1.5], [0.27, 1.47]]), alpha=1.0, decimals=2) == "0.25,1.50;0.27,1.47"
    assert encode(np.array([[5.0, 10.0]]), alpha=0.5, decimals=1) == "10.0,20.0"


@pytest.mark.parametrize("decimals", [1, 2, 3])
def test_round_trip_generated(decimals):
    traj, _, _ = generate_dataset(20, seed=0)
    alpha = fit_alpha(traj[:14])
    for x in traj:
        back, report = decode(encode(x, alpha=alpha, decimals=decimals), alpha=alpha)
        assert report.malformed == 0 and back.shape == x.shape
        assert np.max(np.abs(back - x)) <= alpha * 0.5 * 10.0**-decimals * (1 + 1e-9)


def test_round_trip_random_including_large_values():
    rng = np.random.default_rng(1)
    alpha = 0.37
    x = np.concatenate([rng.uniform(0, 10 * alpha, (50, 2)), rng.uniform(10 * alpha, 1e4 * alpha, (50, 2))])
    back, report = decode(encode(x, alpha=alpha, decimals=2), alpha=alpha)
    assert report.malformed == 0
    assert np.max(np.abs(back - x)) <= alpha * 0.5e-2 * (1 + 1e-9)


def test_alpha_maps_the_percentile_to_ten():
    values = np.arange(1, 101, dtype=float)
    assert fit_alpha(values, percentile=90) == pytest.approx(np.percentile(values, 90) / 10)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        fit_alpha(np.zeros(10))


def _corrupt(text: str, rng: random.Random) -> str:
    ops = ["drop_sep", "double_sep", "extra_digits", "stray", "truncate", "empty", "swap_sep"]
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(ops)
        if op == "empty":
            return ""
        if not text:
            return text
        i = rng.randrange(len(text))
        if op == "drop_sep":
            seps = [j for j, c in enumerate(text) if c in ",;"]
            if seps:
                j = rng.choice(seps)
                text = text[:j] + text[j + 1:]
        elif op == "double_sep":
            text = text[:i] + rng.choice(",;") + text[i:]
        elif op == "extra_digits":
            text = text[:i] + "".join(rng.choice("0123456789.") for _ in range(rng.randint(1, 5))) + text[i:]
        elif op == "stray":
            text = text[:i] + rng.choice(["a", " ", "-", "+", "e", "\n", "nan", "∞", "..", "1e5"]) + text[i:]
        elif op == "truncate":
            text = text[:i]
        elif op == "swap_sep":
            text = text.replace(";", ",", 1) if rng.random() < 0.5 else text.replace(",", ";", 1)
    return text


def test_decoder_survives_corruption_and_keeps_alignment():
    rng = random.Random(0)
    x = np.random.default_rng(0).uniform(0, 5, (30, 2))
    clean = encode(x, alpha=1.0)
    for _ in range(3000):
        text = _corrupt(clean, rng)
        arr, report = decode(text, alpha=1.0)  # never raises
        segments = text.split(";")
        if text.endswith(";") or segments == [""]:
            segments = segments[:-1]
        assert arr.shape == (len(segments), 2)
        assert report.n_steps == len(segments)
        for i, seg in enumerate(segments):   # segment i is at row i: parsed, or NaN, never shifted
            fields = seg.split(",")
            ok = len(fields) == 2 and all(f and f.replace(".", "", 1).lstrip("-").isdigit() and f.count(".") <= 1
                                          and not f.endswith(".") and not f.startswith(".") and f.isascii()
                                          for f in fields)
            if ok:
                assert arr[i].tolist() == [float(f) for f in fields]
            else:
                assert np.isnan(arr[i]).all() and i in report.malformed_steps
        assert report.malformed == int(np.isnan(arr).any(axis=1).sum())
        assert report.last_cut_off == (bool(segments) and not text.endswith(";"))


def test_one_token_per_character_with_the_real_tokenizer(tokenizer_dir):
    from qwen_min import Tokenizer

    tok = Tokenizer(tokenizer_dir)
    traj, _, _ = generate_dataset(5, seed=2)
    alpha = fit_alpha(traj)
    for x in traj:
        text = encode(x, alpha=alpha) + ";"
        ids = tok.encode(text)
        assert len(ids) == len(text)
        assert [tok.decode([i]) for i in ids] == list(text)

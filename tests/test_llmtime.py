"""LLMTIME encoding: exact round trips, a decoder that never raises nor misaligns, the real tokenizer."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from experiments.lib.science.llmtime import EncodingConfig, decode, encode, fit_alpha
from experiments.lib.science.lotka_volterra import generate_dataset


def test_format():
    assert encode(np.array([[0.25, 1.5], [0.27, 1.47]]), alpha=1.0, decimals=2) == "0.25,1.50;0.27,1.47"
    assert encode(np.array([[5.0, 10.0]]), alpha=0.5, decimals=1) == "10.0,20.0"
    assert encode(np.array([[3.14159]]), alpha=1.0, decimals=0) == "3"
    assert encode(np.array([[-0.001, -2.0]]), alpha=1.0) == "0.00,-2.00"   # no "-0.00"
    assert encode(np.zeros((0, 2)), alpha=1.0) == ""
    for bad in (dict(alpha=0.0), dict(alpha=-1.0), dict(alpha=1.0, decimals=-1)):
        with pytest.raises(ValueError):
            encode(np.ones((2, 2)), **bad)
    with pytest.raises(ValueError, match="finite"):
        encode(np.array([[np.nan, 1.0]]), alpha=1.0)


@pytest.mark.parametrize("decimals", [1, 2, 3])
def test_round_trip_generated(decimals):
    traj, _, _ = generate_dataset(20, seed=0)
    alpha = fit_alpha(traj[:14])
    for x in traj:
        text = encode(x, alpha=alpha, decimals=decimals)
        for strict in (None, decimals):
            back, report = decode(text, alpha=alpha, decimals=strict)
            assert report.malformed == 0 and back.shape == x.shape
            assert np.max(np.abs(back - x)) <= alpha * 0.5 * 10.0**-decimals * (1 + 1e-9)
        assert decode(text, alpha=alpha, decimals=decimals)[1].last_cut_off is False


def test_round_trip_random_including_large_values():
    rng = np.random.default_rng(1)
    alpha = 0.37
    x = np.concatenate([rng.uniform(0, 10 * alpha, (50, 2)), rng.uniform(10 * alpha, 1e4 * alpha, (50, 2))])
    rng.shuffle(x)
    back, report = decode(encode(x, alpha=alpha, decimals=2), alpha=alpha, decimals=2)
    assert report.malformed == 0 and back.shape == x.shape
    assert np.max(np.abs(back - x)) <= alpha * 0.5e-2 * (1 + 1e-9)


def test_alpha_maps_the_percentile_to_ten():
    values = np.arange(1, 101, dtype=float)
    assert fit_alpha(values, percentile=90) == pytest.approx(90.1 / 10)   # numpy's linear interpolation
    assert fit_alpha(values, 50, 5) == pytest.approx(50.5 / 5)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        fit_alpha(np.zeros(10))
    with pytest.raises(ValueError, match="finite"):
        fit_alpha(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="percentile"):
        fit_alpha(values, percentile=0)


def test_encoding_config_round_trips_through_json(tmp_path):
    enc = EncodingConfig(alpha=0.123456789, decimals=3, percentile=95.0)
    path = enc.save(tmp_path / "encoding.json")
    assert json.loads(path.read_text()) == {"alpha": 0.123456789, "decimals": 3, "percentile": 95.0}
    assert EncodingConfig.load(path) == enc
    for bad in (dict(alpha=0.0), dict(alpha=float("nan")), dict(alpha=1.0, decimals=1.5)):
        with pytest.raises(ValueError):
            EncodingConfig(**bad)


def _corrupt(text: str, rng: random.Random) -> str:
    ops = ["drop_sep", "double_sep", "extra_digits", "stray", "truncate", "empty", "swap_sep", "huge"]
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
            text = text[:i] + rng.choice(["a", " ", "-", "--", "+", "e", "\n", "nan", "inf", "∞", "..", "1e5", "٣",
                                          "²", "\x00", "<|endoftext|>"]) + text[i:]
        elif op == "huge":   # so many digits that the number overflows to inf
            text = text[:i] + "9" * 400 + text[i:]
        elif op == "truncate":
            text = text[:i]
        elif op == "swap_sep":
            text = text.replace(";", ",", 1) if rng.random() < 0.5 else text.replace(",", ";", 1)
    return text


def _field_value(f: str, decimals: int | None) -> float | None:
    """The format's definition, written out without regular expressions: [-]digits[.digits]."""
    body = f[1:] if f.startswith("-") else f
    int_part, dot, frac = body.partition(".")
    digits = set("0123456789")
    if not int_part or not set(int_part) <= digits or (dot and (not frac or not set(frac) <= digits)):
        return None
    if decimals is not None and len(frac) != decimals:
        return None
    if decimals is not None and ((len(int_part) > 1 and int_part[0] == "0") or (f.startswith("-") and float(f) == 0)):
        return None   # strict: encode never writes a leading zero or a negative zero
    return float(f)


@pytest.mark.parametrize("decimals", [None, 2])
def test_decoder_survives_corruption_and_keeps_alignment(decimals):
    rng = random.Random(0)
    alpha = 0.7
    x = np.random.default_rng(0).uniform(0, 5, (30, 2))
    clean = encode(x, alpha=alpha)
    for _ in range(3000):
        text = _corrupt(clean, rng)
        arr, report = decode(text, alpha=alpha, decimals=decimals)  # never raises
        segments = text.split(";")
        if text.endswith(";") or segments == [""]:
            segments = segments[:-1]
        assert arr.shape == (len(segments), 2)
        assert report.n_steps == len(segments)
        bad = []
        for i, seg in enumerate(segments):   # segment i is at row i: parsed, or NaN, never shifted
            fields = seg.split(",")
            values = [_field_value(f, decimals) for f in fields] if len(fields) == 2 else [None]
            if all(v is not None and math.isfinite(v * alpha) for v in values):
                assert arr[i].tolist() == [v * alpha for v in values]
            else:
                bad.append(i)
                assert np.isnan(arr[i]).all()
        assert report.malformed_steps == bad and report.malformed == len(bad)
        unterminated = bool(segments) and not text.endswith(";")
        assert report.last_cut_off == (unterminated and (decimals is None or bad[-1:] == [len(segments) - 1]))


def test_every_truncation_is_detected_with_decimals():
    x = np.random.default_rng(3).uniform(0, 40, (12, 2))
    full = encode(x, alpha=1.0) + ";"
    want, _ = decode(full, alpha=1.0, decimals=2)
    for k in range(len(full) + 1):
        prefix = full[:k]
        arr, report = decode(prefix, alpha=1.0, decimals=2)
        n_done = prefix.count(";")
        assert np.array_equal(arr[:n_done], want[:n_done])   # complete steps untouched
        partial = prefix.rsplit(";", 1)[-1]
        if partial:   # a step in progress: complete only if the full text has ';' right after it
            complete = full[k] == ";"
            assert arr.shape[0] == n_done + 1
            assert report.last_cut_off == (not complete)
            assert (np.array_equal(arr[-1], want[n_done]) if complete else np.isnan(arr[-1]).all())
        else:
            assert arr.shape[0] == n_done and not report.last_cut_off


def test_decoder_edge_cases():
    assert decode("", alpha=1.0)[0].shape == (0, 2)
    arr, report = decode(";;", alpha=1.0)
    assert arr.shape == (2, 2) and np.isnan(arr).all() and report.malformed_steps == [0, 1]
    arr, report = decode("1.00,2.00,3.00;4.00,5.00;", alpha=2.0)
    assert np.isnan(arr[0]).all() and arr[1].tolist() == [8.0, 10.0] and not report.last_cut_off
    arr, _ = decode("1.00;2.00;", alpha=1.0, n_vars=1)
    assert arr.tolist() == [[1.0], [2.0]]


def test_one_token_per_character_with_the_real_tokenizer(tokenizer_dir):
    from qwen_min import Tokenizer

    tok = Tokenizer(tokenizer_dir)
    traj, _, _ = generate_dataset(5, seed=2)
    alpha = fit_alpha(traj)
    big = np.random.default_rng(4).uniform(0, 1e4 * alpha, (20, 2))   # numbers of up to 5 digits
    for x, decimals in [(t, 2) for t in traj] + [(big, 2), (big, 3), (big, 0)]:
        text = encode(x, alpha=alpha, decimals=decimals) + ";"
        ids = tok.encode(text)
        assert len(ids) == len(text)
        assert [tok.decode([i]) for i in ids] == list(text)

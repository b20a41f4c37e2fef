"""Forecasting with the language model: FLOPs as counted equal the matmuls that ran, the plan bounds
them (run to the token limit, equals them), decoding keeps steps in place, the token limit and the alphabet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import flops
import qwen_min
from experiments.lib.budget import planning
from experiments.lib.science import forecasting, llmtime
from experiments.lib.science.lotka_volterra import generate_dataset


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32), qwen_min.load_tokenizer(tiny_ckpt)


def _prompts(lengths: tuple[int, ...]) -> tuple[list[str], llmtime.EncodingConfig]:
    traj, _, _ = generate_dataset(len(lengths), seed=0)
    enc = llmtime.EncodingConfig(alpha=llmtime.fit_alpha(traj))
    return [llmtime.encode(x[:n], alpha=enc.alpha) + ";" for x, n in zip(traj, lengths, strict=True)], enc


@pytest.mark.parametrize("samples, temperature", [(1, 0.0), (3, 1.0)])
def test_generation_flops_equal_the_matmuls_that_ran(tiny, samples, temperature):
    model, tok = tiny
    # prompts of different lengths in one batch (left padding), and a batch of one
    prompts, enc = _prompts((10, 7, 10))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        run = forecasting.forecast(model, tok, prompts, 4, enc, batch_size=2, num_samples=samples,
                                   temperature=temperature)
    assert run.matmul_2mnp == fc.get_total_flops()   # torch's own count of every matmul executed
    assert run.values.shape == (3, samples, 4, 2)
    assert [c["padded"] for c in run.calls] == [True, False]
    assert all(len(t) == samples for t in run.texts)


@pytest.mark.parametrize("samples, temperature", [(1, 0.0), (2, 1.0)])
def test_the_plan_bounds_what_forecasting_spends_and_equals_it_run_to_the_limit(tiny, tiny_ckpt, samples,
                                                                                temperature):
    model, tok = tiny
    prompts, enc = _prompts((12, 5, 9, 12, 3))
    shape = planning.meta_model(qwen_min.load_config(tiny_ckpt))
    lengths = [len(tok.encode(p)) for p in prompts]
    calls = forecasting.planned_calls(lengths, prompts, 3, batch_size=2, num_samples=samples, vocab=13,
                                      sampled=temperature > 0)
    assert [(c["batch"], c["prompt_len"], c["padded"]) for c in calls] == [(2, lengths[0], True),
                                                                          (2, lengths[3], True), (1, lengths[4], False)]
    planned = planning.calls_flops(shape, calls)
    kw = dict(batch_size=2, num_samples=samples, temperature=temperature)
    stopped = forecasting.forecast(model, tok, prompts, 3, enc, **kw)
    to_limit = forecasting.forecast(model, tok, prompts, 3, enc, to_limit=True, **kw)
    assert stopped.flops <= planned
    assert to_limit.calls == calls and to_limit.flops == pytest.approx(planned, rel=1e-12)
    # the same forecasts: rows only run on past the horizon
    np.testing.assert_array_equal(to_limit.values, stopped.values)
    assert all(a[:len(b)] == b for x, y in zip(to_limit.texts, stopped.texts, strict=True)
               for a, b in zip(x, y, strict=True))


def test_max_new_tokens_is_the_longest_prompt_step_plus_room_per_step():
    # steps "1.00,2.00" (9 characters) and "10.00,3.00" (10): 10 + 2 to spare + the ';' = 13 per step
    assert forecasting.max_new_tokens(["1.00,2.00;10.00,3.00;", "1.00,2.00;"], 4) == 4 * 13
    assert forecasting.max_new_tokens(["1.00,2.00;"], 1) == 12


def test_decode_forecast_keeps_steps_in_place():
    enc = llmtime.EncodingConfig(alpha=2.0)
    values, bad = forecasting.decode_forecast("1.00,2.00;x;3.00,4.00;5.00,6.00;7", 3, enc)
    assert bad.tolist() == [False, True, False]
    assert np.array_equal(values[[0, 2]], [[2.0, 4.0], [6.0, 8.0]]) and np.isnan(values[1]).all()
    values, bad = forecasting.decode_forecast("1.00,2.00;", 3, enc)   # stopped early: missing steps are NaN
    assert bad.tolist() == [False, True, True] and np.isnan(values[1:]).all()


def test_decode_forecast_is_strict_about_the_encoding():
    enc = llmtime.EncodingConfig(alpha=1.0, decimals=2)
    text = ("1.00,2.00;"      # fine
            "123,2.00;"       # no decimal point: 1.23 written as 123, never read as 123
            "1.2,2.00;"       # one decimal short
            "1.000,2.00;"     # one decimal too many
            "01.00,2.00;"     # a leading zero encode never writes
            "-0.00,2.00;"     # a negative zero encode never writes
            ",2.00;"          # an empty field
            "1.00,2.00,3.00;"  # an extra field
            "4.00,5.00;"      # fine, still at its own index
            "6.00,7.0")       # the last step, cut off by the token limit
    values, bad = forecasting.decode_forecast(text, 10, enc)
    assert bad.tolist() == [False] + [True] * 7 + [False, True]
    assert values[0].tolist() == [1.0, 2.0] and values[8].tolist() == [4.0, 5.0]
    # a complete-looking last step without its ';' is cut off too: the next digit could have followed
    values, bad = forecasting.decode_forecast("1.00,2.00;3.00,4.00", 2, enc)
    assert bad.tolist() == [False, True]
    # decimals 0: integers are the encoding; "3." or "3.0" are not
    values, bad = forecasting.decode_forecast("3,4;3.,4;3.0,4;", 3, llmtime.EncodingConfig(alpha=1.0, decimals=0))
    assert bad.tolist() == [False, True, True]


def test_alphabet_is_thirteen_single_tokens(tiny):
    _, tok = tiny
    ids = forecasting.alphabet_ids(tok)
    assert len(set(ids)) == 13 and [tok.decode([i]) for i in ids] == list("0123456789,.;")


@pytest.mark.parametrize(("padded", "sampled", "vocab"), [(False, False, 13), (True, True, None)])
def test_generation_flops_in_closed_form_equal_every_decode_step_counted(tiny_ckpt, padded, sampled, vocab):
    # the closed form (a decode step's cost is affine in the cached length) against the counter, step by step
    shape = planning.meta_model(qwen_min.load_config(tiny_ckpt))
    call = {"batch": 3, "prompt_len": 17, "steps": 40, "num_samples": 2, "vocab": vocab, "sampled": sampled,
            "padded": padded}
    reports = [flops.count(shape, batch=3, seq_len=17, mode="prefill", vocab=vocab, sampling=sampled, padded=padded)]
    reports += [flops.count(shape, batch=6, seq_len=1, past_len=17 + t - 1, mode="decode", vocab=vocab,
                            sampling=sampled, padded=padded) for t in range(1, 40)]
    total, matmul = forecasting.generation_flops(shape, **call)
    assert total == pytest.approx(sum(r.total for r in reports), rel=1e-12)
    assert matmul == pytest.approx(sum(r.matmul_2mnp for r in reports), rel=1e-12)

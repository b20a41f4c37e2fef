"""Forecasting with the language model: FLOPs as counted equal what ran; the script end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import qwen_min
from experiments import llm_forecast, llmtime
from experiments.lotka_volterra import generate_dataset


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32), qwen_min.load_tokenizer(tiny_ckpt)


@pytest.mark.parametrize("samples, temperature", [(1, 0.0), (3, 1.0)])
def test_generation_flops_equal_the_matmuls_that_ran(tiny, samples, temperature):
    model, tok = tiny
    traj, _, _ = generate_dataset(3, seed=0)
    enc = llmtime.EncodingConfig(alpha=llmtime.fit_alpha(traj))
    # prompts of different lengths in one batch (left padding), and a batch of one
    prompts = [llmtime.encode(x[:n], alpha=enc.alpha) + ";" for x, n in zip(traj, (10, 7, 10), strict=True)]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        run = llm_forecast.forecast(model, tok, prompts, 4, enc, batch_size=2, num_samples=samples,
                                    temperature=temperature)
    assert run.matmul_2mnp == fc.get_total_flops()   # torch's own count of every matmul executed
    assert run.flops > run.matmul_2mnp / 2           # and the total (m*p*(2n-1) + elementwise) is consistent
    assert run.values.shape == (3, samples, 4, 2)
    assert [c["padded"] for c in run.calls] == [True, False]
    assert all(len(t) == samples for t in run.texts)


def test_decode_forecast_keeps_steps_in_place():
    enc = llmtime.EncodingConfig(alpha=2.0)
    values, bad = llm_forecast.decode_forecast("1.00,2.00;x;3.00,4.00;5.00,6.00;7", 3, enc)
    assert bad == 1
    assert np.array_equal(values[[0, 2]], [[2.0, 4.0], [6.0, 8.0]]) and np.isnan(values[1]).all()
    values, bad = llm_forecast.decode_forecast("1.00,2.00;", 3, enc)   # stopped early: missing steps are NaN
    assert bad == 2 and np.isnan(values[1:]).all()


def test_alphabet_is_thirteen_single_tokens(tiny):
    _, tok = tiny
    ids = llm_forecast.alphabet_ids(tok)
    assert len(set(ids)) == 13 and [tok.decode([i]) for i in ids] == list("0123456789,.;")

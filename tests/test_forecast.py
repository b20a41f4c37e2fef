"""Forecasting with the language model: FLOPs as counted equal what ran; the script end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import qwen_min
from experiments.lib import forecasting as llm_forecast
from experiments.lib import llmtime
from experiments.lib.lotka_volterra import generate_dataset


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


def test_forecast_script_end_to_end(tmp_path, tiny_ckpt, monkeypatch):
    import h5py

    from experiments import forecast, train
    from experiments.lib import baselines, common
    from experiments.lib.lotka_volterra import generate_dataset, save_h5
    from flops import Ledger

    monkeypatch.setattr(baselines, "ODE_STEPS", 20)  # the fit's quality is tested in test_baselines.py
    traj, time_, params = generate_dataset(30, seed=4)
    data = save_h5(tmp_path / "lv.h5", traj, time_, params)
    base = ["--model", str(tiny_ckpt), "--data", str(data), "--ledger", str(tmp_path / "ledger.jsonl"),
            "--dtype", "fp32", "--device", "cpu"]
    train.main(base + ["--out", str(tmp_path / "run"), "--max-systems", "2", "--context-length", "128",
                       "--batch-size", "2", "--lr", "0.3", "--max-steps", "6", "--eval-every", "0",
                       "--val-systems", "2", "--train-lm-head-bias"])
    out = tmp_path / "fc"
    rep = forecast.main(base + ["--out", str(out), "--adapter", str(tmp_path / "run" / "adapter"),
                                "--max-systems", "3", "--context-steps", "20", "--horizon", "4", "--samples", "2"])
    models = {"untrained", "trained", "untrained_median", "trained_median", "persistence", "linear_ar", "ode_fit"}
    assert set(rep["summary"]) == models
    for m in models:
        assert rep["summary"][m]["systems"] == 3 and rep["summary"][m]["horizon"] == 4
    assert "trained_vs_untrained" in rep["paired"]
    # the test systems of the trained run's own split
    assert rep["systems"] == json.loads((tmp_path / "run" / "splits.json").read_text())["test"][:3]
    with h5py.File(out / "forecasts.h5") as f:
        assert f["truth"].shape == (3, 4, 2) and f["trained/forecast"].shape == (3, 4, 2)
        assert f["trained/samples"].shape == (3, 2, 4, 2)
        assert np.array_equal(f["truth"][()], traj[rep["systems"], 20:24])
    for png in ("examples.png", "error_vs_horizon.png"):
        assert (out / png).stat().st_size > 1000
    # ledger: one entry per model and mode, each equal to the counter's figure for the calls that ran
    entries = [e for e in Ledger(tmp_path / "ledger.jsonl").entries() if e.kind == "forecast"]
    assert len(entries) == 4
    import lora

    config = qwen_min.QwenConfig.from_json(tiny_ckpt / "config.json")
    plain, adapted = common.meta_model(config), common.meta_model(config)
    lora.apply_lora(adapted, rank=4, train_lm_head_bias=True)   # the trained run's adapter
    assert sorted((e.config["model"], e.config["mode"]) for e in entries) == [
        ("trained", "greedy"), ("trained", "samples"), ("untrained", "greedy"), ("untrained", "samples")]
    for e in entries:
        shape = adapted if e.config["model"] == "trained" else plain
        expected = sum(llm_forecast.generation_flops(shape, **call)[0] for call in e.config["calls"])
        assert e.flops == pytest.approx(expected, rel=1e-12)
        assert e.tokens > 0


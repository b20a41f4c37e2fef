"""docs/flops.md's worked example, recomputed by hand and checked against the counter.

The formulas below are the page's own, written out term by term from the cost table (a matmul
(m x n) @ (n x p) costs m*p*(2n - 1); exp 10; a softmax row of n 14n - 2; ...), not read from
``flops``: the test asserts that the counter agrees with them, and that the page quotes exactly
these figures, so neither the counter nor the page can drift from the derivation.

The example: Qwen2.5-0.5B with LoRA rank 4 on q_proj and v_proj (base frozen), one training step of
4 windows of 256 tokens (1,020 positions scored: each window's last has no next token), and one
greedy forecast of 500 new tokens after a 500-token prompt, decoding constrained to the 13 LLMTIME
characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import flops
import lora
from qwen_min import Qwen2, QwenConfig
from tests.conftest import QWEN25_05B

PAGE = Path(__file__).resolve().parents[1] / "docs" / "flops.md"

# Qwen2.5-0.5B (config.json), and the example's sizes
D, L, H, HKV, F, V = 896, 24, 14, 2, 4864, 151936
HD = D // H                 # 64, head_dim
DQ, DKV = H * HD, HKV * HD  # 896 and 128: q_proj's and k_proj/v_proj's output widths
R = 4                       # LoRA rank, on q_proj and v_proj
B, T = 4, 256               # the training step: 4 windows of 256 tokens
SCORED = B * (T - 1)        # 1,020: a window's last position has no next token to predict
P, K, VOCAB = 500, 500, 13  # the forecast: prompt tokens, new tokens, allowed tokens


def mm(m: int, n: int, p: int) -> int:
    """(m x n) @ (n x p): m*p outputs of n multiplications and n - 1 additions."""
    return m * p * (2 * n - 1)


NORM = 4 * D + 12           # RMSNorm of one row: x^2, mean, + eps, rsqrt (11), * rsqrt, * gain
ROTARY = 7 * HD // 2        # per head and token: x*cos, rotate_half (neg on half), *sin, add = 3.5 hd
SILU = 14                   # z / (1 + e^-z): neg, exp (10), +1, inverse, mul


def softmax(n: int) -> int:
    return (n - 1) + n + 10 * n + (n - 1) + n          # max, subtract, exp, sum, divide = 14n - 2


def lora_forward(N: int, d_in: int, d_out: int) -> int:
    """A, then B, then the scaling, then the add to the base output."""
    return mm(N, d_in, R) + mm(N, R, d_out) + N * d_out + N * d_out


def layer_forward(N: int, batch: int, tq: int, s: int, masked: bool) -> int:
    """One decoder layer over N = batch * tq new tokens attending to s keys each."""
    proj = (mm(N, D, DQ) + N * DQ + lora_forward(N, D, DQ)          # q_proj: base, bias, LoRA
            + mm(N, D, DKV) + N * DKV                               # k_proj
            + mm(N, D, DKV) + N * DKV + lora_forward(N, D, DKV)     # v_proj
            + mm(N, DQ, D))                                         # o_proj, no bias
    rotary = N * (H + HKV) * ROTARY
    attention = batch * H * (mm(tq, HD, s) + tq * s * (2 if masked else 1) + tq * softmax(s) + mm(tq, s, HD))
    mlp = 2 * mm(N, D, F) + N * F * SILU + N * F + mm(N, F, D)
    return 2 * N * NORM + proj + rotary + attention + 2 * N * D + mlp


@dataclass
class TrainStep:
    layer: int          # one layer's forward
    head: int           # final norm + lm_head
    loss: int           # log_softmax, pick, sum, mean
    forward: int
    budget: int         # what the ledger charges: 3 x forward
    backward_layer0: int
    backward_layer: int  # each of layers 1..23
    backward_head: int   # final norm, lm_head's input gradient, the loss's gradient
    backward: int
    actual: int          # forward + backward: what MFU divides by


def train_step() -> TrainStep:
    N, S = B * T, T
    layer = layer_forward(N, B, T, S, masked=True)
    head = N * NORM + mm(SCORED, D, V)                  # only scored positions reach the output layer
    loss = SCORED * (14 * V + 8) + 2 * SCORED + 1
    forward = L * layer + head + loss

    # Backward with a frozen base: a weight gradient only for LoRA's A and B; an input gradient only
    # where something upstream is trainable. In layer 0 nothing before the first LoRA A is, so the
    # input norm, k_proj and the base q/v matmuls compute no gradient there.
    def lora_weight_grads(N: int, d_in: int, d_out: int) -> int:
        return mm(D, N, R) + mm(N, d_out, R) + mm(R, N, d_out) + 2 * (N * d_out + N * d_out)
        #      dA = x^T dA_out   d(A x) = dY B   dB = (A x)^T dY     scaling and add, 2 x forward

    def after_qkv(N: int, k_grad: bool) -> int:
        """Everything from rotary on, the same in every layer but for k's gradients."""
        rot = 2 * N * H * ROTARY + (2 * N * HKV * ROTARY if k_grad else 0)
        scores = B * H * mm(T, S, HD) + ((B * H * mm(HD, T, S) + B * (H - HKV) * S * HD) if k_grad else 0)
        elementwise = 2 * B * H * (2 * T * S + T * softmax(S))   # scale, mask, softmax: 2 x forward
        weighted = B * H * mm(T, HD, S) + B * H * mm(S, T, HD) + B * (H - HKV) * S * HD
        o = mm(N, D, DQ)
        mlp = 2 * mm(N, F, D) + 2 * (N * F * SILU + N * F) + mm(N, D, F)
        return rot + scores + elementwise + weighted + o + 2 * (2 * N * D) + 2 * N * NORM + mlp

    backward_layer0 = lora_weight_grads(N, D, DQ) + lora_weight_grads(N, D, DKV) + after_qkv(N, k_grad=False)
    backward_layer = (2 * N * NORM                                           # input norm
                      + mm(N, DQ, D) + 2 * N * DQ + mm(N, R, D)              # q: base dX, bias, A's dX
                      + lora_weight_grads(N, D, DQ)
                      + 2 * (mm(N, DKV, D) + 2 * N * DKV)                    # k and v: base dX, bias
                      + mm(N, R, D) + lora_weight_grads(N, D, DKV)           # v's LoRA
                      + after_qkv(N, k_grad=True))
    backward_head = 2 * N * NORM + mm(SCORED, V, D) + SCORED * (softmax(V) + 1) + SCORED * D
    backward = backward_layer0 + (L - 1) * backward_layer + backward_head
    return TrainStep(layer, head, loss, forward, 3 * forward, backward_layer0, backward_layer, backward_head,
                     backward, forward + backward)


@dataclass
class Forecast:
    prefill: int
    decode_base: int     # a decode step's cost without the part that grows with the cache
    decode_slope: int    # what one more cached position adds to a decode step
    total: int


def forecast() -> Forecast:
    head = NORM + mm(1, D, VOCAB) + (VOCAB - 1)        # the last position only: norm, 13 logits, argmax
    prefill = L * layer_forward(P, 1, P, P, masked=True) + (P - 1) * NORM + head
    # (the final norm runs over all P positions; only the last reaches the output layer)
    # A decode step: one token attending to s = (cached + 1) keys, no mask. Its attention is
    # H * (s*(2hd - 1) + s + (14s - 2) + hd*(2s - 1)) = H * (270 s - 66) per layer, so it is affine in s.
    slope = L * H * ((2 * HD - 1) + 1 + 14 + 2 * HD)
    base = L * (layer_forward(1, 1, 1, 1, masked=False) - H * ((2 * HD - 1) + 1 + 14 + 2 * HD)) + head
    keys = range(P + 1, P + K)                          # decode steps 1..K-1 see P+1 .. P+K-1 keys
    total = prefill + sum(base + slope * s for s in keys)
    return Forecast(prefill, base, slope, total)


@pytest.fixture(scope="module")
def shape() -> Qwen2:
    with torch.device("meta"):
        model = Qwen2(QwenConfig(**QWEN25_05B))
        lora.apply_lora(model, rank=R, targets=("q_proj", "v_proj"))
    return model


def test_the_sizes_are_qwen25_05b():
    c = QwenConfig(**QWEN25_05B)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.head_dim) == (D, L, H, HKV, F, V, HD)


def test_training_step_by_hand_equals_the_counter(shape):
    hand = train_step()
    r = flops.count(shape, batch=B, seq_len=T, mode="train", scored_tokens=SCORED)
    assert r.by_layer["0"] == 3 * hand.layer and r.by_layer["23"] == 3 * hand.layer
    assert r.by_module["lm_head"] + r.by_module["norm"] == 3 * hand.head
    assert r.by_module["loss"] == 3 * hand.loss
    assert r.forward == hand.forward
    assert r.total == hand.budget
    layer0 = sum(t.backward for t in r.terms if t.layer == 0)
    layer5 = sum(t.backward for t in r.terms if t.layer == 5)
    assert layer0 == hand.backward_layer0
    assert layer5 == hand.backward_layer
    assert r.backward_actual == hand.backward
    assert r.train_actual == hand.actual


def test_forecast_by_hand_equals_the_counter(shape):
    hand = forecast()
    prefill = flops.count(shape, batch=1, seq_len=P, mode="prefill", vocab=VOCAB)
    assert prefill.total == hand.prefill
    steps = [flops.count(shape, batch=1, seq_len=1, past_len=P + t, mode="decode", vocab=VOCAB).total
             for t in range(K - 1)]
    assert steps[0] == hand.decode_base + hand.decode_slope * (P + 1)
    assert steps[-1] == hand.decode_base + hand.decode_slope * (P + K - 1)
    assert prefill.total + sum(steps) == hand.total


def test_the_page_quotes_these_figures():
    text = PAGE.read_text(encoding="utf-8")
    t, f = train_step(), forecast()
    figures = {"layer forward": t.layer, "output layer": t.head, "loss": t.loss, "forward": t.forward,
               "budget (3x)": t.budget, "backward, layer 0": t.backward_layer0,
               "backward, layers 1-23": t.backward_layer, "backward, output": t.backward_head,
               "backward": t.backward, "forward + backward": t.actual, "prefill": f.prefill,
               "decode base": f.decode_base, "decode slope": f.decode_slope, "forecast": f.total}
    missing = {k: f"{v:,}" for k, v in figures.items() if f"{v:,}" not in text}
    assert not missing, f"docs/flops.md does not quote {missing}"

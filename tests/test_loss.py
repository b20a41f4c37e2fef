"""The chunked cross-entropy against F.cross_entropy on the full logits (values and every gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwen_min import chunked_cross_entropy


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_full_cross_entropy_and_gradients(with_bias, reduction):
    torch.manual_seed(0)
    B, T, D, V = 3, 11, 16, 50
    head = nn.Linear(D, V, bias=with_bias, dtype=torch.float64)
    hidden = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, :4] = -100
    labels[2, -1] = -100

    ours = chunked_cross_entropy(hidden, head, labels, chunk_size=7, reduction=reduction)
    (ours * 1.7).backward()  # a non-unit incoming gradient
    mine = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if with_bias else [])
    hidden.grad = None
    head.zero_grad()

    ref = F.cross_entropy(head(hidden).reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction=reduction)
    (ref * 1.7).backward()
    theirs = [hidden.grad, head.weight.grad] + ([head.bias.grad] if with_bias else [])
    assert torch.allclose(ours.double(), ref, rtol=1e-6)
    for a, b in zip(mine, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_frozen_head_bf16_gradient_matches_autograd():
    torch.manual_seed(1)
    head = nn.Linear(32, 300, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(2, 20, 32, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 300, (2, 20))
    chunked_cross_entropy(hidden, head, labels, chunk_size=8).backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    F.cross_entropy(head(hidden).float().reshape(-1, 300), labels.reshape(-1)).backward()
    assert head.weight.grad is None
    scale = hidden.grad.float().abs().max().item()
    assert (ours.float() - hidden.grad.float()).abs().max().item() <= 1e-2 * scale  # bf16 rounding


def test_nothing_scored_gives_zero():
    head = nn.Linear(4, 7)
    loss = chunked_cross_entropy(torch.randn(1, 3, 4), head, torch.full((1, 3), -100))
    assert loss.item() == 0.0


def test_extreme_logits_stay_exact():
    # A label whose probability underflows fp32 (-log p = 200 nats): the loss must still be exact.
    head = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[100.0, 0.0], [0.0, 0.0], [-100.0, 0.0]]))
    hidden = torch.tensor([[[1.0, 0.0]]])
    loss = chunked_cross_entropy(hidden, head, torch.tensor([[2]]))
    ref = F.cross_entropy(head(hidden)[0].double(), torch.tensor([2]))
    assert abs(loss.item() - ref.item()) < 1e-4 and loss.item() > 199


def test_fp32_bias_on_bf16_head():
    # The LoRA lm_head bias is fp32 on a bf16 weight: the loss adds it in fp32, like an fp32 reference.
    torch.manual_seed(2)
    weight = (torch.randn(40, 8) * 0.3).bfloat16()
    head = nn.Linear(8, 40, bias=False, dtype=torch.bfloat16)
    head.weight = nn.Parameter(weight, requires_grad=False)
    head.bias = nn.Parameter(torch.randn(40) * 1e-3)
    hidden = torch.randn(1, 6, 8).bfloat16()
    labels = torch.randint(0, 40, (1, 6))
    loss = chunked_cross_entropy(hidden, head, labels)
    loss.backward()
    ref_bias = head.bias.detach().clone().requires_grad_(True)
    ref = F.cross_entropy((hidden[0] @ weight.t()).float() + ref_bias, labels[0])
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.allclose(head.bias.grad, ref_bias.grad, atol=1e-6)

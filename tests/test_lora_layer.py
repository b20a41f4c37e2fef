"""lora/layer.py: LoRALinear against PEFT's lora.Linear and fp64 references: forward and gradient
precision with a bf16 base, a fresh adapter's no-op start, merging and unmerging."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lora
from tests.conftest import (
    PEFT_TOL,
    copy_lora_into_peft,
    hf_model,
    maxdiff,
    ours_from,
    peft_lora,
    random_ids,
    randomize_lora,
)


def test_bf16_base_fp32_adapter_matches_peft_layer_and_keeps_fp32_precision():
    """A bf16 base with fp32 A, B: ours equals PEFT's lora.Linear bit for bit, and the only bf16
    rounding is the final one (an fp64 reference, rounded once, agrees to within one bf16 step)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(64, 48, bias=True, dtype=torch.bfloat16)

    holder = Holder()
    base = nn.Linear(64, 48, bias=True, dtype=torch.bfloat16)
    base.load_state_dict(holder.q_proj.state_dict())
    ours = lora.LoRALinear(base, rank=4, alpha=8)
    with torch.no_grad():
        ours.lora_B.weight.normal_(0, 0.02)
    peft_model = get_peft_model(holder, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    theirs = peft_model.base_model.model.q_proj
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    assert ours.lora_A.weight.dtype == ours.lora_B.weight.dtype == torch.float32
    assert ours.base_layer.weight.dtype == torch.bfloat16

    x = torch.randn(3, 10, 64).to(torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, theirs(x))

    # fp64 truth: base in bf16 (as the frozen model computes it), adapter exactly, one rounding.
    base_out = base(x).double()
    A, B = ours.lora_A.weight.double(), ours.lora_B.weight.double()
    truth = base_out + 2.0 * (x.double() @ A.T @ B.T)
    ref = truth.to(torch.bfloat16)
    ulp = torch.finfo(torch.bfloat16).eps * truth.abs().clamp(min=1e-3)
    assert ((y.double() - ref.double()).abs() <= ulp + 1e-12).all()
    # Sharper, on a zero base so the adapter is all there is: one rounding of the exact product
    # (within half a bf16 step, u = 2^-8), where an adapter run in bf16 rounds x A, then B, again.
    zero = nn.Linear(64, 48, bias=False, dtype=torch.bfloat16)
    nn.init.zeros_(zero.weight)
    only = lora.LoRALinear(zero, rank=4, alpha=8)
    with torch.no_grad():
        only.lora_A.weight.copy_(ours.lora_A.weight)
        only.lora_B.weight.copy_(ours.lora_B.weight)
    exact = 2.0 * (x.double() @ A.T @ B.T)
    u = torch.finfo(torch.bfloat16).eps / 2
    rel_ours = ((only(x).double() - exact).abs() / exact.abs()).max().item()
    naive = 2.0 * ((x @ A.T.to(torch.bfloat16)) @ B.T.to(torch.bfloat16))
    rel_naive = ((naive.double() - exact).abs() / exact.abs()).max().item()
    print(f"bf16 base: adapter output max relative error vs fp64, ours {rel_ours:.3g} (u = {u:.3g}), "
          f"all-bf16 adapter path {rel_naive:.3g}")
    assert rel_ours <= u * (1 + 1e-3) < rel_naive

    # The adapter gradient is an fp32 computation: it matches fp64 to fp32 precision.
    g = torch.randn(y.shape).to(torch.bfloat16)
    (y.float() * g.float()).sum().backward()
    gA = 2.0 * (B.T @ (g.double().reshape(-1, 48).T @ x.double().reshape(-1, 64)))
    assert ours.lora_A.weight.grad.dtype == torch.float32
    rel = maxdiff(ours.lora_A.weight.grad, gA) / gA.abs().max().item()
    print(f"bf16 base: dL/dA relative error vs fp64 = {rel:.3g}")
    assert rel <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fresh_lora_leaves_logits_bit_identical(tiny_ckpt, dtype, bias):
    model = ours_from(tiny_ckpt, dtype)
    ids = random_ids()
    with torch.no_grad():
        before = model(ids)
        lora.apply_lora(model, rank=8, targets=lora.LINEAR_TARGETS, train_lm_head_bias=bias)
        after = model(ids)
    assert after.dtype == dtype
    assert torch.equal(before, after)
    layer = model.layers[0].self_attn.q_proj
    assert not layer.lora_B.weight.any()
    # A drawn as nn.Linear's default: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1 / math.sqrt(layer.in_features)
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound


def test_merge_unmerge_fp32_and_peft_merged_weights(tiny_ckpt):
    ours = ours_from(tiny_ckpt)
    lora.apply_lora(ours, rank=4, alpha=8)
    randomize_lora(ours)
    W0 = {n: m.base_layer.weight.detach().clone() for n, m in lora.lora_layers(ours).items()}
    ids = random_ids()
    with torch.no_grad():
        unmerged = ours(ids)
        assert len(lora.merge_lora(ours)) == 4
        merged = ours(ids)
    diff = maxdiff(merged, unmerged)
    print(f"merged vs unmerged logits, fp32: max |diff| = {diff:.3g}")
    assert diff <= PEFT_TOL

    # PEFT's merge_and_unload of the same adapters gives the same weights.
    theirs = peft_lora(hf_model(tiny_ckpt), 4, 8, ("q_proj", "v_proj"))
    copy_lora_into_peft(ours, theirs)
    plain = theirs.merge_and_unload()
    for name, layer in lora.lora_layers(ours).items():
        assert maxdiff(layer.base_layer.weight, plain.get_submodule("model." + name).weight) <= 1e-6, name

    lora.unmerge_lora(ours)
    worst = max(maxdiff(m.base_layer.weight, W0[n]) for n, m in lora.lora_layers(ours).items())
    print(f"merge -> unmerge, fp32: max |W - W0| = {worst:.3g}")
    assert worst <= 1e-6
    with torch.no_grad():
        assert maxdiff(ours(ids), unmerged) <= 1e-6


def test_merge_unmerge_bf16_within_bf16_rounding(tiny_ckpt):
    ours = ours_from(tiny_ckpt, torch.bfloat16)
    lora.apply_lora(ours, rank=4)
    randomize_lora(ours)
    layers = lora.lora_layers(ours)
    W0 = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    lora.merge_lora(ours)
    Wm = {}
    for n, m in layers.items():  # merged = (W + BA in fp32), rounded once
        Wm[n] = m.base_layer.weight.detach().clone()
        assert torch.equal(Wm[n], (W0[n].float() + m.delta_weight().detach()).bfloat16())
    lora.unmerge_lora(ours)
    # Two roundings, each within half a bf16 step of its result: |W1 - W0| <= u (|Wm| + |W1|), u = 2^-8.
    u = torch.finfo(torch.bfloat16).eps / 2
    for n, m in layers.items():
        W1 = m.base_layer.weight.float()
        err = (W1 - W0[n].float()).abs()
        assert (err <= u * (Wm[n].float().abs() + W1.abs())).all(), n
        assert (err == 0).float().mean() > 0.5  # most weights come back exactly

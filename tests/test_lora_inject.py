"""lora/inject.py: LoRA put into a Qwen2 (against PEFT on transformers' Qwen2, the oracle), what is
frozen and trained, the lm_head bias, taking LoRA out again, parameter counts and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora
import qwen_min
from tests.conftest import (
    PEFT_TOL,
    QWEN25_05B,
    copy_lora_into_peft,
    hf_config,
    hf_model,
    maxdiff,
    meta_qwen05,
    ours_from,
    peft_lora,
    random_ids,
    randomize_lora,
)

CASES = [  # checkpoint, rank, alpha, targets
    ("tiny_ckpt", 4, 8, ("q_proj", "v_proj")),
    ("tiny_untied_ckpt", 3, 5, lora.LINEAR_TARGETS),
]


@pytest.mark.parametrize(("ckpt", "rank", "alpha", "targets"), CASES)
def test_logits_and_grads_match_peft(ckpt, rank, alpha, targets, request):
    path = request.getfixturevalue(ckpt)
    ours = ours_from(path)
    wrapped = lora.apply_lora(ours, rank=rank, alpha=alpha, targets=targets)
    n_layers = ours.config.num_hidden_layers
    assert len(wrapped) == n_layers * len(targets)
    randomize_lora(ours)
    theirs = peft_lora(hf_model(path), rank, alpha, targets)
    copy_lora_into_peft(ours, theirs)

    ids = random_ids()
    a, b = ours(ids), theirs(input_ids=ids).logits
    diff = maxdiff(a, b)
    print(f"{ckpt} r={rank} alpha={alpha} {len(targets)} targets: logits max |diff| vs PEFT = {diff:.3g}")
    assert diff <= PEFT_TOL

    # Same loss -> same LoRA gradients (relative to their size).
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    (a * w).sum().backward()
    (b * w).sum().backward()
    hf = theirs.base_model.model
    worst = 0.0
    for name, layer in lora.lora_layers(ours).items():
        target = hf.get_submodule("model." + name)
        for mine, peft_p in ((layer.lora_A.weight, target.lora_A["default"].weight),
                             (layer.lora_B.weight, target.lora_B["default"].weight)):
            worst = max(worst, maxdiff(mine.grad, peft_p.grad) / peft_p.grad.abs().max().item())
    print(f"{ckpt}: LoRA grads, worst max |diff| / max |grad| vs PEFT = {worst:.3g}")
    assert worst <= 1e-4


@pytest.mark.parametrize("bias", [False, True])
def test_only_lora_gets_grads_and_base_is_bit_identical_after_a_step(tiny_ckpt, bias):
    model = ours_from(tiny_ckpt)
    lora.apply_lora(model, rank=4, dropout=0.1, train_lm_head_bias=bias)
    model.train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and n != "lm_head.bias"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"layers.{i}.self_attn.{t}.lora_{w}.weight" for i in range(2) for t in ("q_proj", "v_proj")
                for w in "AB"} | ({"lm_head.bias"} if bias else set())
    assert trainable == expected

    ids = random_ids((2, 16))
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected
    # Even an optimizer handed every parameter, with weight decay, moves only the trained ones.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before_B = model.layers[0].self_attn.q_proj.lora_B.weight.detach().clone()
    opt.step()
    after = dict(model.named_parameters())
    for n, p in base.items():
        assert torch.equal(after[n], p), n
    assert not torch.equal(model.layers[0].self_attn.q_proj.lora_B.weight, before_B)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_chunked_loss_sees_lora_and_bias(tiny_ckpt):
    """qwen_min's fused loss reads lm_head.weight / lm_head.bias directly: with LoRA and the bias it
    gives the loss and bias gradient of plain cross-entropy on our logits."""
    model = ours_from(tiny_ckpt)
    lora.apply_lora(model, rank=4, train_lm_head_bias=True)
    randomize_lora(model)
    ids = random_ids((2, 16))
    labels = ids.roll(-1, 1)
    fused = qwen_min.chunked_cross_entropy(model.hidden(ids), model.lm_head, labels, chunk_size=7)
    fused.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(ids)
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    plain.backward()
    assert abs(fused.item() - plain.item()) <= 1e-5
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert maxdiff(grads[n], p.grad) <= 1e-5 * p.grad.abs().max().item() + 1e-9, n


def test_bias_only_rank0(tiny_ckpt):
    ours = ours_from(tiny_ckpt)
    ids = random_ids()
    with torch.no_grad():
        before = ours(ids)
    assert lora.apply_lora(ours, rank=0, train_lm_head_bias=True) == []
    assert lora.trainable_parameters(ours) == {"lora_A": 0, "lora_B": 0, "lm_head_bias": 151936, "other": 0,
                                               "total": 151936}
    with torch.no_grad():
        assert torch.equal(ours(ids), before)
        lora.lm_head_bias(ours).copy_(torch.linspace(-1, 1, 151936))
        want = before + torch.linspace(-1, 1, 151936)
        assert maxdiff(ours(ids), want) <= PEFT_TOL

    nothing = ours_from(tiny_ckpt)
    assert lora.apply_lora(nothing, rank=0) == []
    assert lora.trainable_parameters(nothing)["total"] == 0


def test_remove_lora(tiny_ckpt, tmp_path):
    ids = random_ids()
    ours = ours_from(tiny_ckpt)
    with torch.no_grad():
        base = ours(ids)
    lora.apply_lora(ours, rank=4, train_lm_head_bias=True)
    randomize_lora(ours)
    with torch.no_grad():
        adapted = ours(ids)
    names = lora.remove_lora(ours)  # merge=True: keeps what was learnt, bias included
    assert len(names) == 4 and not lora.lora_layers(ours)
    assert type(ours.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert maxdiff(ours(ids), adapted) <= PEFT_TOL
    assert lora.trainable_parameters(ours)["total"] == 0

    plain = ours_from(tiny_ckpt)
    lora.apply_lora(plain, rank=4, train_lm_head_bias=True)
    randomize_lora(plain)
    lora.remove_lora(plain, merge=False)  # throws everything away
    assert type(plain.lm_head) is nn.Linear and plain.lm_head.bias is None
    assert plain.lm_head.weight is plain.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(plain(ids), base)
    qwen_min.save_pretrained(plain, tmp_path / "plain")  # a plain Qwen2 again
    lora.apply_lora(plain, rank=2)  # and LoRA can be applied afresh


@pytest.mark.parametrize(("rank", "expected"), [(2, 135_168), (4, 270_336), (8, 540_672)])
def test_trainable_parameters_qwen25_05b(rank, expected):
    # Per layer: q_proj A [r, 896] + B [896, r]; v_proj A [r, 896] + B [128, r] (2 KV heads x 64),
    # so 24 layers * r * (3 * 896 + 128) in all: the expected figures.
    d, kv, layers = 896, 2 * 64, 24

    model = meta_qwen05()
    lora.apply_lora(model, rank=rank)
    counts = lora.trainable_parameters(model)
    assert counts == {"lora_A": layers * rank * 2 * d, "lora_B": layers * rank * (d + kv), "lm_head_bias": 0,
                      "other": 0, "total": expected}

    model = meta_qwen05()
    lora.apply_lora(model, rank=rank, train_lm_head_bias=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert lora.trainable_parameters(model)["total"] == expected + 151_936


def test_trainable_parameters_agree_with_peft_on_meta():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        hf = Qwen2ForCausalLM(hf_config(**QWEN25_05B))
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=4, target_modules=list(lora.LINEAR_TARGETS),
                                               task_type="CAUSAL_LM"))
    model = meta_qwen05()
    lora.apply_lora(model, rank=4, targets=lora.LINEAR_TARGETS)
    assert lora.trainable_parameters(model)["total"] == peft_model.get_nb_trainable_parameters()[0]


def test_apply_lora_bad_input(tiny_ckpt):
    model = meta_qwen05()
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) 'qproj'.*q_proj, k_proj, v_proj"):
        lora.apply_lora(model, targets=("qproj", "v_proj"))
    with pytest.raises(ValueError, match="unknown LoRA target.*'lm_head'"):
        lora.apply_lora(model, targets="lm_head")
    for rank in (-1, 2.5, True, "4"):
        with pytest.raises(ValueError, match=f"LoRA rank must be a non-negative integer.*got {rank!r}"):
            lora.apply_lora(model, rank=rank)
    with pytest.raises(ValueError, match="LoRA alpha must be a positive number, got -1"):
        lora.apply_lora(model, alpha=-1)
    with pytest.raises(ValueError, match=r"LoRA dropout must be in \[0, 1\), got 1.5"):
        lora.apply_lora(model, dropout=1.5)
    with pytest.raises(ValueError, match="rank 4 with no targets"):
        lora.apply_lora(model, targets=())
    assert not lora.lora_layers(model)  # nothing was changed by the refused calls
    assert all(p.requires_grad for p in model.parameters())
    model = meta_qwen05()
    lora.apply_lora(model)
    with pytest.raises(ValueError, match="already applied.*remove_lora"):
        lora.apply_lora(model)

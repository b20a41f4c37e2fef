"""qwen_min.fastpath: each inference device computes what the plain model computes, and every swap
is undone on the way out (nested use included)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import qwen_min
from qwen_min import KVCache
from qwen_min.fastpath import (
    can_prepack,
    fast_inference,
    folded_decode_attend,
    inplace_swiglu,
    prepack,
    prepacked_layers,
    reused_output,
)
from qwen_min.model import MLP, Attention
from tests.conftest import left_padded


def _swaps(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Every instance attribute that shadows a method: what fastpath sets and must remove."""
    return [(name, attr) for name, m in model.named_modules() for attr in ("forward", "attend") if attr in vars(m)]


def _decode(model: qwen_min.Qwen2, ids: torch.Tensor, mask: torch.Tensor, steps: torch.Tensor,
            fast: bool) -> torch.Tensor:
    """Logits of a prefill, then of one-token steps against the KV cache, each [B, 1, V]."""
    B, T = ids.shape
    cache = KVCache(model.config, B, T + steps.shape[1], dtype=model.embed_tokens.weight.dtype)
    full_mask = torch.cat([mask, torch.ones_like(steps)], 1)
    with torch.no_grad(), fast_inference(model) if fast else contextlib.nullcontext():
        out = [model(ids, attention_mask=mask, cache=cache)]
        out += [model(steps[:, t:t + 1], attention_mask=full_mask[:, :T + t + 1], cache=cache)
                for t in range(steps.shape[1])]
    return torch.cat(out, 1)


# bf16: a differently ordered sum may round a logit (|logit| < 2 here) one bf16 step, 2^-7, away
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)])
def test_folded_decode_attention_equals_plain(tiny_untied_ckpt, dtype, tol):
    """One-token steps with the query heads folded onto their KV head (8 query heads on 2 here)
    give the plain attention's logits to rounding; the prefill takes the plain path, bit for bit."""
    model = qwen_min.from_pretrained(tiny_untied_ckpt, dtype=dtype)
    assert model.config.num_attention_heads == 4 * model.config.num_key_value_heads
    ids, mask = left_padded([9, 14, 3], seed=8)
    steps = torch.randint(0, 151643, (3, 6), generator=torch.Generator().manual_seed(9))
    plain, fast = _decode(model, ids, mask, steps, False), _decode(model, ids, mask, steps, True)
    T = ids.shape[1]
    assert torch.equal(plain[:, :T], fast[:, :T])  # T > 1 takes the plain path inside fast_inference
    assert (plain[:, T:].float() - fast[:, T:].float()).abs().max().item() <= tol
    assert not _swaps(model)


def test_folded_attend_against_explicit_gqa():
    """The folded call against softmax(q k^T / sqrt(hd) + mask) v written out, with k and v
    repeated over each group of query heads and a padded row."""
    attn = Attention(qwen_min.QwenConfig(vocab_size=10, hidden_size=48, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=6, num_key_value_heads=2))
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, hd = 2, 6, 2, 7, 8
    q, k, v = (torch.randn(shape, generator=g) for shape in ((B, H, 1, hd), (B, Hkv, S, hd), (B, Hkv, S, hd)))
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[1, ..., :3] = False
    kr, vr = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ kr.transpose(-1, -2)) / hd**0.5
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vr                # [B, H, 1, hd]
    for m in (mask, None):
        want = expected if m is not None else (scores.softmax(-1) @ vr)
        assert torch.allclose(folded_decode_attend(attn, q, k, v, m), want, atol=1e-6)
        assert torch.allclose(attn.attend(q, k, v, m), want, atol=1e-6)


def test_inplace_swiglu_is_bit_identical_and_plain_under_grad():
    mlp = MLP(qwen_min.QwenConfig(vocab_size=10, hidden_size=32, intermediate_size=96, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2))
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(inplace_swiglu(mlp, x), mlp(x))
        mlp.bfloat16()
        assert torch.equal(inplace_swiglu(mlp, x.bfloat16()), mlp(x.bfloat16()))
        mlp.float()
    # with grad enabled it must leave autograd's saved tensors intact: same output, same gradients
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    inplace_swiglu(mlp, xa).square().sum().backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    mlp(xb).square().sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, mlp.parameters(), strict=True))


def test_reused_output_is_bit_identical_and_reuses_its_buffer():
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(1000, 64, generator=g).to(dtype)
        head = reused_output(weight, rows=4)
        h1, h2 = (torch.randn(4, 64, generator=g).to(dtype) for _ in range(2))
        a = head(h1)
        assert torch.equal(a, F.linear(h1, weight))
        b = head(h2)
        assert torch.equal(b, F.linear(h2, weight)) and b.data_ptr() == a.data_ptr()


def test_prepacked_weights_are_bit_identical_and_undone(tiny_ckpt):
    import lora

    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    lora.apply_lora(model, rank=2)
    torch.nn.init.normal_(model.layers[0].self_attn.q_proj.lora_B.weight)  # adapters that do something
    if not can_prepack(model.lm_head.weight):
        pytest.skip("this CPU has no oneDNN bf16 support: generate uses plain F.linear here")
    ids, mask = left_padded([9, 5, 9], seed=5)
    step = torch.randint(0, 151643, (3, 1), generator=torch.Generator().manual_seed(6))
    full_mask = torch.cat([mask, torch.ones_like(step)], 1)

    def decode_step(packed: bool) -> torch.Tensor:
        cache = KVCache(model.config, 3, 10, dtype=torch.bfloat16)
        with torch.no_grad():
            model.hidden(ids, attention_mask=mask, cache=cache)
            if not packed:
                return model.lm_head(model.hidden(step, attention_mask=full_mask, cache=cache))
            with prepacked_layers(model, rows=3):
                h = model.hidden(step, attention_mask=full_mask, cache=cache)
            return prepack(model.lm_head.weight, rows=3)(h)

    plain, packed = decode_step(False), decode_step(True)
    assert torch.equal(plain, packed)
    assert not _swaps(model)
    with prepacked_layers(model, rows=3):  # nested (a stop callback that generates, say)
        with prepacked_layers(model, rows=3):
            pass
        assert "forward" in vars(model.layers[0].mlp.gate_proj)  # the inner exit left the outer's
    assert not _swaps(model)
    q = model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.dtype == torch.float32 and q.base_layer.weight.dtype == torch.bfloat16


def test_fast_inference_swaps_per_instance_nests_and_undoes_on_error(tiny_ckpt):
    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    other = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    packable = can_prepack(model.lm_head.weight)
    with fast_inference(model):
        outer = set(_swaps(model))
        assert outer == {(f"layers.{i}.{n}", a) for i in range(2) for n, a in (("self_attn", "attend"),
                                                                               ("mlp", "forward"))}
        assert not _swaps(other)  # another instance of the same classes keeps the plain path
        with fast_inference(model, rows=4):
            inner = set(_swaps(model))
            assert (outer < inner) if packable else (outer == inner)  # + the prepacked linears
        assert set(_swaps(model)) == outer  # the inner exit undid only its own swaps
    assert not _swaps(model)
    with pytest.raises(RuntimeError, match="boom"), fast_inference(model, rows=4):
        raise RuntimeError("boom")
    assert not _swaps(model)
    qwen_min.generate(model, torch.tensor([[1, 2, 3]]), 3)  # generate opts in, and leaves nothing behind
    assert not _swaps(model)

"""qwen_min.fastpath: each inference device computes what the plain model computes, and every swap
is undone on the way out (nested use included)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import qwen_min
from qwen_min import KVCache, fastpath
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


# ---------------------------------------------------------------------------------------------
# Which devices apply where: chosen by device and dtype, the GPU selection tested without a GPU


def test_devices_for_cuda_is_the_plain_path():
    for device in (torch.device("cuda"), torch.device("cuda", 1), "cuda:0"):
        for dtype in (torch.bfloat16, torch.float32):
            d = fastpath.devices_for(device, dtype, bf16_kernels=True)
            assert not (d.folded_decode or d.inplace_swiglu or d.prepack or d.reused_logits)
            assert d.stop_check_every == fastpath.ACCELERATOR_STOP_CHECK_EVERY > 1


def test_devices_for_cpu_prepacks_bf16_only_with_bf16_kernels():
    for kernels in (True, False):
        d = fastpath.devices_for(torch.device("cpu"), torch.bfloat16, bf16_kernels=kernels)
        assert d.folded_decode and d.inplace_swiglu and d.reused_logits and d.stop_check_every == 1
        assert d.prepack is kernels
        assert not fastpath.devices_for("cpu", torch.float32, bf16_kernels=kernels).prepack
    assert fastpath.devices_for("cpu", torch.bfloat16).prepack is fastpath.cpu_has_bf16_kernels()


def test_cpu_bf16_kernels_need_avx512_bf16_or_amx():
    assert not fastpath.cpu_has_bf16_kernels(frozenset({"avx2", "fma"}))
    assert not fastpath.cpu_has_bf16_kernels(frozenset({"avx2", "avx512f", "avx512bw", "avx512vl"}))
    mkldnn_bf16 = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert fastpath.cpu_has_bf16_kernels(frozenset({"avx512f", "avx512_bf16"})) is mkldnn_bf16
    flags = fastpath.cpu_flags()
    if flags and not ({"avx512_bf16", "amx_bf16"} & flags):  # e.g. this AVX2 machine: no prepacking
        assert not fastpath.cpu_has_bf16_kernels()
        assert not can_prepack(torch.zeros(2, 2, dtype=torch.bfloat16))


def test_meta_devices_and_planning_need_no_gpu_nor_cpu_flags(monkeypatch):
    """Planning builds the model on the meta device: no CUDA call, no look at the CPU, no swaps."""
    from experiments.lib.budget import planning
    from experiments.lib.science import forecasting

    def forbidden(*_, **__):
        raise AssertionError("planning touched the hardware")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("synchronize", "current_device", "init", "get_device_name"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    monkeypatch.setattr(fastpath, "cpu_flags", forbidden)
    monkeypatch.setattr(fastpath, "cpu_has_bf16_kernels", forbidden)
    assert fastpath.devices_for(torch.device("meta"), torch.bfloat16) == fastpath.Devices()
    shape = planning.meta_model(qwen_min.QwenConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    num_key_value_heads=2))
    assert fastpath.model_devices(shape) == fastpath.Devices()
    with fast_inference(shape, rows=4):
        assert not _swaps(shape)
    total, _ = forecasting.generation_flops(shape, batch=2, prompt_len=10, steps=5, num_samples=1, vocab=13,
                                            sampled=False, padded=True)
    assert total > 0


def test_fast_inference_takes_the_devices_it_is_given(tiny_ckpt):
    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)
    with fast_inference(model, rows=4, devices=fastpath.devices_for("cuda", torch.float32)):
        assert not _swaps(model)
    with fast_inference(model, rows=4, devices=fastpath.Devices(inplace_swiglu=True)):
        assert set(_swaps(model)) == {(f"layers.{i}.mlp", "forward") for i in range(2)}
    assert not _swaps(model)


class _HostReads:
    """Counts the reads of a tensor's value from the host (each a sync on an accelerator)."""

    def __init__(self, monkeypatch) -> None:
        self.n = 0
        for name in ("__bool__", "item", "tolist", "__int__", "__index__", "__float__", "cpu", "numpy"):
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, **kw):
                self.n += 1
                return _original(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("stopping", [False, True])
def test_generate_with_the_gpu_devices_gives_the_same_and_reads_the_device_rarely(tiny_ckpt, monkeypatch, stopping):
    """generate with the CUDA selection (plain path, stop check every 16 steps), run on the CPU:
    the same tokens, lengths and logprobs as the CPU path, and besides its set-up and its result it
    reads a device value once per 16 steps (the CPU path: every step)."""
    import importlib

    gen = importlib.import_module("qwen_min.generate")  # (the package's name `generate` is the function)
    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)
    ids, mask = left_padded([7, 12, 12], seed=4)
    free = qwen_min.generate(model, ids, 6, attention_mask=mask)
    kw = dict(attention_mask=mask, return_logprobs=True)
    if stopping:  # every row stops by step 6: the rest are padding, and a finished batch may run on
        eos = [int(t) for t in free.tokens[:, -1]]
        kw |= dict(eos_token_id=eos, pad_token_id=-1)
    want = qwen_min.generate(model, ids, 40, **kw)
    monkeypatch.setattr(gen, "model_devices", lambda m: fastpath.devices_for("cuda", torch.float32))
    reads = _HostReads(monkeypatch)
    got = qwen_min.generate(model, ids, 40, **kw)
    monkeypatch.undo()
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert torch.allclose(got.logprobs, want.logprobs, atol=1e-5)
    # set-up: the attention mask's all() and, with eos ids, the default pad; the end: lengths.max()
    assert reads.n <= 2 + 40 // fastpath.ACCELERATOR_STOP_CHECK_EVERY + 1, reads.n
    # the work that ran is reported, so it is charged: the CPU path stops with the last row, the
    # accelerator path at the next check (16 steps) or the limit
    assert want.steps == want.tokens.shape[1]
    every = fastpath.ACCELERATOR_STOP_CHECK_EVERY
    assert got.steps == (min(40, -(-want.steps // every) * every) if stopping else 40)

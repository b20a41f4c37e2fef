"""Generation against transformers' generate (greedy token identity) and against full recomputation."""

from __future__ import annotations

import pytest
import torch

import qwen_min
from qwen_min.generate import sample_next


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)


def _left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), 151643, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(0, 151643, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids, mask


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "tiny_untied_ckpt"])
def test_greedy_batched_left_padded_equals_transformers(ckpt, request):
    from transformers import Qwen2ForCausalLM

    path = request.getfixturevalue(ckpt)
    ours = qwen_min.from_pretrained(path, dtype=torch.float32)
    theirs = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = _left_padded([5, 17, 11, 17])
    out = qwen_min.generate(ours, ids, 40, attention_mask=mask)
    ref = theirs.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                          eos_token_id=None, pad_token_id=151643)[:, ids.shape[1]:]
    assert out.tokens.shape == (4, 40)
    assert torch.equal(out.tokens, ref)


def test_greedy_bf16_equals_transformers(tiny_ckpt):
    """bf16 exercises the CPU decode path (folded GQA attention, prepacked weights, argmax on bf16)."""
    from transformers import Qwen2ForCausalLM

    ours = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    theirs = Qwen2ForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.bfloat16).eval()
    ids, mask = _left_padded([12, 30, 21, 30], seed=7)
    out = qwen_min.generate(ours, ids, 40, attention_mask=mask)
    ref = theirs.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                          eos_token_id=None, pad_token_id=151643)[:, ids.shape[1]:]
    assert torch.equal(out.tokens, ref)


def test_logprobs_and_tokens_equal_full_recompute(model):
    ids, mask = _left_padded([6, 9], seed=3)
    out = qwen_min.generate(model, ids, 12, attention_mask=mask, return_logprobs=True)
    full = torch.cat([ids, out.tokens], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(out.tokens)], dim=1)
    with torch.no_grad():
        logits = model(full, attention_mask=full_mask)[:, ids.shape[1] - 1:-1]
    assert torch.equal(logits.argmax(-1), out.tokens)
    expected = logits.log_softmax(-1).gather(-1, out.tokens[..., None]).squeeze(-1)
    assert (expected - out.logprobs).abs().max().item() <= 1e-4


def test_per_row_stop_and_eos(model):
    ids, mask = _left_padded([8, 8, 8], seed=1)
    free = qwen_min.generate(model, ids, 20, attention_mask=mask)
    # Stop row 1 as soon as it has produced 3 tokens, and make row 0's 5th token an eos.
    eos = int(free.tokens[0, 4])
    stop = lambda toks: torch.tensor([False, toks.shape[1] >= 3, False])  # noqa: E731
    out = qwen_min.generate(model, ids, 20, attention_mask=mask, stop=stop, eos_token_id=eos, pad_token_id=-1)
    first_eos_0 = int((free.tokens[0] == eos).nonzero()[0])
    assert out.lengths[0] == first_eos_0 + 1
    assert out.lengths[1] == 3
    assert torch.equal(out.tokens[1, :3], free.tokens[1, :3]) and (out.tokens[1, 3:] == -1).all()
    # an unaffected row is unchanged unless it met eos too
    row2_eos = (free.tokens[2] == eos).nonzero()
    n2 = int(row2_eos[0]) + 1 if len(row2_eos) else 20
    assert torch.equal(out.tokens[2, :n2], free.tokens[2, :n2])


def test_constrained_decoding_only_emits_allowed_tokens(model):
    ids, mask = _left_padded([10, 4], seed=2)
    allowed = [15, 16, 17, 18, 11, 13, 26]  # digits 0-3 and , . ; in the Qwen vocabulary
    out = qwen_min.generate(model, ids, 25, attention_mask=mask, allowed_token_ids=allowed)
    assert torch.isin(out.tokens, torch.tensor(allowed)).all()
    # ... and each choice is the argmax over the allowed logits of the full model
    full = torch.cat([ids, out.tokens], 1)
    with torch.no_grad():
        logits = model(full, attention_mask=torch.cat([mask, torch.ones_like(out.tokens)], 1))
    sub = logits[:, ids.shape[1] - 1:-1][..., allowed]
    assert torch.equal(torch.tensor(allowed)[sub.argmax(-1)], out.tokens)


def test_sampling_is_seeded_and_samples_share_the_prefill(model):
    ids, mask = _left_padded([7, 12], seed=4)
    kw = dict(attention_mask=mask, temperature=1.0, top_k=50, top_p=0.9, num_samples=3)
    a = qwen_min.generate(model, ids, 15, generator=torch.Generator().manual_seed(0), **kw)
    b = qwen_min.generate(model, ids, 15, generator=torch.Generator().manual_seed(0), **kw)
    assert a.tokens.shape == (6, 15) and torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens[0], a.tokens[1])  # different samples of one prompt
    # Rows 0-2 continue prompt 0: their first token is drawn from the same prefill distribution,
    # which must equal prompt 0's last-position logits.
    one = qwen_min.generate(model, ids[:1, -7:], 1, return_logprobs=True, temperature=1.0,
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = model(ids[:1, -7:])[0, -1].log_softmax(-1)
    assert abs(one.logprobs[0, 0].item() - lp[one.tokens[0, 0]].item()) < 1e-5


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, temperature=1.0, top_k=1, generator=g).item() == 3 for _ in range(20))
    # top_p: softmax of [0,1,2,3] is [.032,.087,.237,.644]; p=0.7 keeps {3, 2}
    draws = {sample_next(logits, temperature=1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    assert sample_next(logits).item() == 3


def test_prepacked_weights_are_bit_identical_and_undone(tiny_ckpt):
    import lora
    from qwen_min.generate import can_prepack, prepack, prepacked_layers
    from qwen_min.model import KVCache

    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    lora.apply_lora(model, rank=2)
    torch.nn.init.normal_(model.layers[0].self_attn.q_proj.lora_B.weight)  # adapters that do something
    if not can_prepack(model.lm_head.weight):
        pytest.skip("this CPU has no oneDNN bf16 support: generate uses plain F.linear here")
    ids, mask = _left_padded([9, 5, 9], seed=5)
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
    assert not any("forward" in vars(m) for m in model.modules())  # the swap is undone
    with prepacked_layers(model, rows=3):  # nested (a stop callback that generates, say)
        with prepacked_layers(model, rows=3):
            pass
        assert "forward" in vars(model.layers[0].mlp.gate_proj)  # the inner exit left the outer's
    assert not any("forward" in vars(m) for m in model.modules())
    q = model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.dtype == torch.float32 and q.base_layer.weight.dtype == torch.bfloat16

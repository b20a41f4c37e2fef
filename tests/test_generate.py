"""Generation against transformers' generate (greedy token identity) and against full recomputation."""

from __future__ import annotations

import pytest
import torch

import qwen_min
from qwen_min.generate import sample_next
from tests.conftest import hf_model, left_padded


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "tiny_untied_ckpt"])
def test_greedy_batched_left_padded_equals_transformers(ckpt, request):
    path = request.getfixturevalue(ckpt)
    ours, theirs = qwen_min.from_pretrained(path, dtype=torch.float32), hf_model(path)
    ids, mask = left_padded([5, 17, 11, 17])
    out = qwen_min.generate(ours, ids, 40, attention_mask=mask)
    ref = theirs.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                          eos_token_id=None, pad_token_id=151643)[:, ids.shape[1]:]
    assert out.tokens.shape == (4, 40)
    assert torch.equal(out.tokens, ref)


def test_greedy_bf16_equals_transformers(tiny_ckpt):
    """bf16 exercises generate's CPU fast path (qwen_min.fastpath: folded GQA attention, in-place SwiGLU,
    prepacked weights, reused output buffer) and argmax on bf16 logits."""
    ours, theirs = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.bfloat16), hf_model(tiny_ckpt, torch.bfloat16)
    ids, mask = left_padded([12, 30, 21, 30], seed=7)
    out = qwen_min.generate(ours, ids, 40, attention_mask=mask)
    ref = theirs.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                          eos_token_id=None, pad_token_id=151643)[:, ids.shape[1]:]
    assert torch.equal(out.tokens, ref)


def test_logprobs_and_tokens_equal_full_recompute(model):
    ids, mask = left_padded([6, 9], seed=3)
    out = qwen_min.generate(model, ids, 12, attention_mask=mask, return_logprobs=True)
    full = torch.cat([ids, out.tokens], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(out.tokens)], dim=1)
    with torch.no_grad():
        logits = model(full, attention_mask=full_mask)[:, ids.shape[1] - 1:-1]
    assert torch.equal(logits.argmax(-1), out.tokens)
    expected = logits.log_softmax(-1).gather(-1, out.tokens[..., None]).squeeze(-1)
    assert (expected - out.logprobs).abs().max().item() <= 1e-4


def test_per_row_stop_and_eos(model):
    ids, mask = left_padded([8, 8, 8], seed=1)
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
    ids, mask = left_padded([10, 4], seed=2)
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
    ids, mask = left_padded([7, 12], seed=4)
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

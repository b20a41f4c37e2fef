"""Batched, KV-cached text generation: greedy or sampled, per-row stopping, constrained decoding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from qwen_min.fastpath import fast_inference, model_devices, reused_output
from qwen_min.model import KVCache, Qwen2


@dataclass
class Generation:
    """What ``generate`` returns.

    tokens   [B', N]  the new tokens (B' = B * num_samples; rows of one prompt are adjacent);
                      after a row stops, its remaining places hold ``pad_token_id``
    lengths  [B']     tokens generated per row, the stopping token included
    logprobs [B', N]  (only if asked) log-probability of each chosen token under the model's
                      distribution at temperature 1 over the allowed vocabulary (all of it, or
                      ``allowed_token_ids``); 0 in padded places
    steps             the tokens chosen per row, the work done: N, or more where stopping is checked only
                      every few steps (on CUDA), so the FLOP count charges what ran
    """

    tokens: Tensor
    lengths: Tensor
    logprobs: Tensor | None = None
    steps: int = 0


def sample_next(logits: Tensor, *, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Choose one token per row from logits [B, V]: argmax at temperature 0, else sample (in fp32).

    top_k keeps the k largest logits; top_p keeps the smallest set of tokens whose probabilities
    sum to at least top_p (the most likely token is always kept).
    """
    if temperature == 0.0:
        # The first maximal index, as argmax, and the same in any float dtype (bf16 -> fp32 is
        # exact); on CPU, max().indices has the quicker bf16 kernel.
        return logits.max(-1).indices
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Qwen2,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop: Callable[[Tensor], Tensor] | None = None,
    allowed_token_ids: Sequence[int] | Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    num_samples: int = 1,
    return_logprobs: bool = False,
) -> Generation:
    """Continue each prompt of input_ids [B, T] by up to ``max_new_tokens`` tokens.

    Prompts of different lengths are left-padded, with attention_mask [B, T] marking real tokens.
    A row stops after producing an ``eos_token_id``, or when ``stop(tokens_so_far [B', t])`` returns
    True for it (e.g. "50 semicolons produced"); generation ends when every row has stopped.
    ``allowed_token_ids`` restricts decoding to those tokens and then only computes their logits.
    ``num_samples`` > 1 draws that many continuations per prompt from one shared prefill.
    Runs under ``qwen_min.fastpath.fast_inference`` with the devices that pay where the model is
    (``fastpath.devices_for``): on a CPU, among others, oneDNN-prepacked copies of the weights for the
    decoding steps where it has bf16 kernels (one extra copy of the weights while it runs); on CUDA
    the plain path. The decode loop never reads a device value except to ask whether every row has
    stopped, which on an accelerator it asks every ``ACCELERATOR_STOP_CHECK_EVERY`` steps (so a
    finished batch may run a few steps more; their tokens are padding, the result is the same).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples > 1 and temperature == 0.0:
        raise ValueError("num_samples > 1 needs temperature > 0 (greedy samples would all be equal)")
    B, T = input_ids.shape
    device = input_ids.device
    devices = model_devices(model)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                       device=device, dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)

    # The output layer, restricted to the allowed tokens when decoding is constrained.
    weight, bias = model.lm_head.weight, model.lm_head.bias
    allowed = None
    if allowed_token_ids is not None:
        allowed = torch.as_tensor(allowed_token_ids, device=device, dtype=torch.long)
        weight = weight[allowed]
        bias = bias[allowed] if bias is not None else None

    def next_logits(ids: Tensor, mask: Tensor | None, cache: KVCache, head: Callable[..., Tensor]) -> Tensor:
        h = model.hidden(ids, attention_mask=mask, cache=cache)[:, -1]      # [B', D]
        logits = head(h)                                                    # [B', V or |allowed|]
        # Kept in the model's dtype unless a bias must be added in fp32: greedy decoding takes
        # the argmax as is. (On CPU a fresh [64, 151936] fp32 copy per step costs more page
        # faults than the output layer's arithmetic.)
        return logits if bias is None else logits.float() + bias.float()

    cache = KVCache(model.config, B, T + max_new_tokens, dtype=model.embed_tokens.weight.dtype, device=device)
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        mask = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=device)
        mask[:, :T] = attention_mask
    # The prompt goes through with the plain weights (many rows: oneDNN's reorder is amortised).
    with fast_inference(model, devices=devices):
        logits = next_logits(input_ids, None if mask is None else mask[:, :T], cache, lambda h: F.linear(h, weight))
    if num_samples > 1:  # one prefill, then every sample continues from a copy of its prompt's cache
        cache = cache.repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        mask = None if mask is None else mask.repeat_interleave(num_samples, dim=0)
    rows = B * num_samples

    tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, max_new_tokens, device=device) if return_logprobs else None
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    # The decoding steps, a few rows each, also use prepacked weights (where they pay), and on a CPU
    # their output layer writes into one reused buffer.
    head = reused_output(weight, rows) if devices.reused_logits else (lambda h: F.linear(h, weight))
    every = devices.stop_check_every
    with fast_inference(model, rows if max_new_tokens > 1 else None, devices=devices):
        for t in range(max_new_tokens):
            choice = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            chosen = allowed[choice] if allowed is not None else choice
            token = torch.where(done, pad, chosen)
            tokens[:, t] = token
            if logprobs is not None:
                lp = logits.float().log_softmax(-1).gather(-1, choice[:, None]).squeeze(-1)
                logprobs[:, t] = torch.where(done, 0.0, lp)
            lengths += (~done).long()
            done |= torch.isin(token, eos)
            if stop is not None:
                done |= stop(tokens[:, : t + 1])
            if t + 1 == max_new_tokens or ((t + 1) % every == 0 and bool(done.all())):
                break
            # Stopped rows keep running (a batch moves together) on their own valid choice; their
            # outputs are discarded. Feeding `pad` could be an id outside the vocabulary.
            logits = next_logits(chosen[:, None], None if mask is None else mask[:, : T + t + 1], cache, head)
    n = int(lengths.max())
    return Generation(tokens[:, :n], lengths, logprobs[:, :n] if logprobs is not None else None, steps=t + 1)

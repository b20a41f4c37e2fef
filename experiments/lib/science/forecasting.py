"""Forecasting with the language model: prompts in, LLMTIME text out, numbers back.

The prompt is the encoding of the first C time steps ending with ';'. The model continues it, KV-
cached, until every row has written H more ';' (or a token limit; with ``to_limit``, always to the
token limit, so that what it costs is known before it runs: see ``planned_calls``). Decoding is by default
constrained to the LLMTIME alphabet (digits, ',', '.', ';'), which makes every token a character of
a number or a separator, and lets the output layer compute 13 logits instead of 151,936.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

import flops
import qwen_min
from experiments.lib.science import llmtime
from qwen_min import Qwen2, Tokenizer

ALPHABET = list("0123456789,.;")


def alphabet_ids(tokenizer: Tokenizer) -> list[int]:
    """The token ids of the LLMTIME characters (each is one token in the Qwen vocabulary)."""
    ids = [tokenizer.encode(c) for c in ALPHABET]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the tokenizer splits an LLMTIME character into several tokens: {ids}")
    return [i[0] for i in ids]


def semicolons_per_token(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """[V] how many ';' each token's text holds (unconstrained decoding may emit ';' inside longer tokens)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        text = tokenizer.decode([i])
        if ";" in text:
            counts[i] = text.count(";")
    return counts


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ids [B, T], attention_mask [B, T], padded on the left so every row ends together."""
    T = max(len(x) for x in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, T - len(x):] = torch.tensor(x)
        mask[i, T - len(x):] = 1
    return ids, mask


def max_new_tokens(prompts: Sequence[str], horizon: int) -> int:
    """The token limit of forecasting ``horizon`` steps after ``prompts`` (one token per character):
    per step, the longest step seen in the prompts with two characters to spare (a number may grow
    by a digit), and its ';'."""
    longest_step = max(len(s) for p in prompts for s in p.rstrip(";").split(";"))
    return horizon * (longest_step + 2 + 1)


def planned_calls(prompt_tokens: Sequence[int], prompts: Sequence[str], horizon: int, *, batch_size: int,
                  num_samples: int, vocab: int | None, sampled: bool) -> list[dict]:
    """The ``generate`` calls ``forecast`` makes for ``prompts`` (``prompt_tokens``: their lengths in
    tokens), each with every row running to its token limit: exactly the calls made with
    ``to_limit`` and constrained decoding, an upper bound of the calls made without."""
    calls = []
    for start in range(0, len(prompts), batch_size):
        lengths = prompt_tokens[start:start + batch_size]
        calls.append({"batch": len(lengths), "prompt_len": max(lengths),
                      "steps": max_new_tokens(prompts[start:start + batch_size], horizon), "num_samples": num_samples,
                      "vocab": vocab, "sampled": sampled, "padded": min(lengths) != max(lengths)})
    return calls


@dataclass
class ForecastRun:
    values: np.ndarray            # (N, S, H, 2) in original units; NaN where a step was malformed or missing
    malformed: np.ndarray         # (N, S, H) True where that step was malformed or missing
    texts: list[list[str]]        # the generated text, per system and sample
    flops: float = 0.0            # what the forward passes cost by the counter, for the ledger
    matmul_2mnp: float = 0.0      # its matmul part, 2mnp convention (to check against FlopCounterMode)
    tokens_generated: int = 0
    calls: list[dict] = field(default_factory=list)  # (batch, prompt_len, steps, samples) of every generate call


def generation_flops(model: Qwen2, *, batch: int, prompt_len: int, steps: int, num_samples: int,
                     vocab: int | None, sampled: bool, padded: bool) -> tuple[float, float]:
    """(total, matmul part in the 2mnp convention) of one ``generate`` call as it ran, by the counter:
    a prefill of batch x prompt_len, then steps - 1 single-token forwards of batch x num_samples rows,
    the t-th attending to prompt_len + t cached positions; the output layer over ``vocab`` rows (the
    allowed tokens) and, when sampling, the softmax over them. ``padded``: an attention mask with
    padding was applied (left-padded prompts of different lengths)."""
    prefill = flops.count(model, batch=batch, seq_len=prompt_len, mode="prefill", vocab=vocab, sampling=sampled,
                          padded=padded)
    rows = batch * num_samples

    def decode(past: int) -> tuple[float, float]:
        r = flops.count(model, batch=rows, seq_len=1, past_len=past, mode="decode", vocab=vocab, sampling=sampled,
                        padded=padded)
        return r.total, r.matmul_2mnp

    n = steps - 1                       # decode steps, attending to prompt_len .. prompt_len + n - 1 positions
    if n <= 3:
        parts = [decode(prompt_len + t) for t in range(n)]
        return prefill.total + sum(p[0] for p in parts), prefill.matmul_2mnp + sum(p[1] for p in parts)
    # A decode step's cost is affine in the cached length (attention over one more key per step), so the
    # n steps sum in closed form: n * first + slope * n (n - 1) / 2, checked on three points (a planned
    # study prices tens of thousands of decode steps; counting each one took minutes).
    (a0, m0), (a1, m1), (a2, m2) = decode(prompt_len), decode(prompt_len + 1), decode(prompt_len + 2)
    if a2 - a1 != a1 - a0 or m2 - m1 != m1 - m0:  # not affine: count every step
        parts = [decode(prompt_len + t) for t in range(n)]
        return prefill.total + sum(p[0] for p in parts), prefill.matmul_2mnp + sum(p[1] for p in parts)
    pairs = n * (n - 1) // 2
    return prefill.total + n * a0 + (a1 - a0) * pairs, prefill.matmul_2mnp + n * m0 + (m1 - m0) * pairs


@torch.no_grad()
def forecast(model: Qwen2, tokenizer: Tokenizer, prompts: list[str], horizon: int,
             encoding: llmtime.EncodingConfig, *, batch_size: int = 16, num_samples: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, constrained: bool = True, seed: int = 0,
             device: torch.device | str = "cpu", progress=None, to_limit: bool = False,
             on_call: Callable[[dict, float], None] | None = None) -> ForecastRun:
    """Forecast ``horizon`` steps after each prompt; greedy when temperature is 0, else num_samples draws.

    Generation stops once every row of a call has written its ``horizon`` steps, unless ``to_limit``:
    then every call runs to its token limit (``planned_calls``; the steps after the horizon are
    ignored), which costs more but exactly what was planned. The forecasts are the same either way.

    Generated text is decoded strictly with ``encoding`` (see ``decode_forecast``). ``on_call(call,
    flops)`` runs after every ``generate`` call with its shape and its FLOPs by the counter, so the
    caller can book work as it is spent.
    """
    allowed = alphabet_ids(tokenizer) if constrained else None
    semi = torch.zeros(model.config.vocab_size, dtype=torch.long)
    semi_id = tokenizer.encode(";")[0]
    if constrained:
        semi[semi_id] = 1
    else:
        semi = semicolons_per_token(tokenizer, model.config.vocab_size)
    semi = semi.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    N = len(prompts)
    S = num_samples
    values = np.full((N, S, horizon, 2), np.nan)
    malformed = np.zeros((N, S, horizon), dtype=bool)
    texts: list[list[str]] = [[] for _ in range(N)]
    run = ForecastRun(values, malformed, texts)
    encoded = [tokenizer.encode(p) for p in prompts]
    # the calls as planned (each row to its token limit); the ``steps`` of each are what actually ran
    planned = planned_calls([len(x) for x in encoded], prompts, horizon, batch_size=batch_size, num_samples=S,
                            vocab=len(allowed) if allowed else None, sampled=temperature > 0)
    for start, limit in zip(range(0, N, batch_size), planned, strict=True):
        chunk = encoded[start:start + batch_size]
        ids, mask = left_pad(chunk, tokenizer.pad_id)
        out = qwen_min.generate(
            model, ids.to(device), limit["steps"],
            attention_mask=mask.to(device),
            temperature=temperature, top_p=top_p, generator=generator if temperature > 0 else None,
            stop=None if to_limit else (lambda toks: semi[toks].sum(-1) >= horizon), allowed_token_ids=allowed,
            eos_token_id=tokenizer.eos_ids, pad_token_id=tokenizer.pad_id, num_samples=S)
        call = limit | {"steps": out.steps}   # (what ran: on CUDA a few steps past the last row's stop)
        run.calls.append(call)
        total, mm = generation_flops(model, **call)
        run.flops += total
        run.matmul_2mnp += mm
        run.tokens_generated += int(out.lengths.sum())
        if on_call is not None:
            on_call(call, total)
        for r in range(out.tokens.shape[0]):
            i, s = start + r // S, r % S
            text = tokenizer.decode(out.tokens[r, : int(out.lengths[r])].tolist(), skip_special_tokens=True)
            texts[i].append(text)
            values[i, s], malformed[i, s] = decode_forecast(text, horizon, encoding)
        if progress is not None:
            progress.update(len(chunk))
    return run


def decode_forecast(text: str, horizon: int, encoding: llmtime.EncodingConfig) -> tuple[np.ndarray, np.ndarray]:
    """The first ``horizon`` steps of generated text in original units, (H, 2), and which of them are
    malformed or missing, (H,) bool; NaN rows there.

    Strict: a step counts only if a ';' ends it (the last step before a token limit or an end-of-text
    token is cut off, hence malformed), and its fields must be written exactly as ``llmtime.encode``
    writes them with the encoding's decimals. Step i is row i whatever happened to the others.
    """
    complete = text.split(";")[:-1][:horizon]   # the part after the last ';' never ended
    arr, _ = llmtime.decode("".join(s + ";" for s in complete), alpha=encoding.alpha, n_vars=2,
                            decimals=encoding.decimals)
    out = np.full((horizon, 2), np.nan)
    out[: len(arr)] = arr
    return out, np.isnan(out).any(axis=1)

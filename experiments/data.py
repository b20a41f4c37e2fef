"""Splits by system, token windows for training, and forecast prompts.

Systems (not time steps) are split, so no trajectory is seen in two splits. Training windows are
cut from each system's encoded series in tokens: ``context_length`` tokens, every ``stride``
tokens, and a last window flush with the end so every token is covered. A series shorter than a
window is right-padded; with causal attention a real token never attends to the padding after it,
and padded positions are never scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from experiments import llmtime


def split_systems(n: int, *, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint, sorted system indices {"train", "val", "test"}, a seeded permutation cut by fractions."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
    n_train = n - n_val - n_test
    return {"train": np.sort(order[:n_train]), "val": np.sort(order[n_train:n_train + n_val]),
            "test": np.sort(order[n_train + n_val:])}


@dataclass
class Windows:
    input_ids: torch.Tensor       # [N, L]
    labels: torch.Tensor          # [N, L]: labels[:, t] = input_ids[:, t + 1]; -100 = not scored
    attention_mask: torch.Tensor  # [N, L]: 1 real token, 0 padding (on the right)


def window_starts(n_tokens: int, context_length: int, stride: int) -> list[int]:
    """Window starts covering every token: 0, stride, 2*stride, ... and one flush with the end."""
    if n_tokens <= context_length:
        return [0]
    starts = list(range(0, n_tokens - context_length + 1, stride))
    if starts[-1] != n_tokens - context_length:
        starts.append(n_tokens - context_length)
    return starts


def training_windows(texts: list[str], tokenizer, *, context_length: int, stride: int | None = None,
                     pad_id: int | None = None) -> Windows:
    """Token windows of every text (``tokenizer`` is a ``qwen_min.Tokenizer``)."""
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}")
    stride = stride or context_length
    if stride < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    pad = tokenizer.pad_id if pad_id is None else pad_id
    rows, masks = [], []
    for ids in tokenizer.encode_batch(texts) if texts else []:
        for s in window_starts(len(ids), context_length, stride):
            chunk = ids[s:s + context_length]
            if len(chunk) < 2:
                continue
            rows.append(chunk + [pad] * (context_length - len(chunk)))
            masks.append([1] * len(chunk) + [0] * (context_length - len(chunk)))
    if not rows:
        empty = torch.zeros(0, context_length, dtype=torch.long)
        return Windows(empty, empty.clone(), empty.clone())
    input_ids = torch.tensor(rows, dtype=torch.long)
    attention_mask = torch.tensor(masks, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    # position t predicts token t + 1, where both are real tokens
    real_next = attention_mask[:, 1:].bool()
    labels[:, :-1] = torch.where(real_next, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], -100))
    return Windows(input_ids, labels, attention_mask)


@dataclass
class ForecastExample:
    system: int
    prompt: str           # the first C steps, ending with ';'
    target: np.ndarray    # (H, 2) the next H steps, original units


def forecast_examples(trajectories: np.ndarray, systems: np.ndarray, encoding: llmtime.EncodingConfig, *,
                      context_steps: int, horizon: int) -> list[ForecastExample]:
    """Prompt = encode(first C steps) + ';' (it ends on a separator, never inside a number)."""
    T = trajectories.shape[1]
    if context_steps < 1 or horizon < 1 or context_steps + horizon > T:
        raise ValueError(f"context_steps {context_steps} + horizon {horizon} must fit in the {T} time steps")
    return [ForecastExample(int(i), llmtime.encode(trajectories[i, :context_steps], alpha=encoding.alpha,
                                                   decimals=encoding.decimals) + ";",
                            trajectories[i, context_steps:context_steps + horizon].copy())
            for i in systems]

"""Splits by system, token windows for training, and forecast prompts.

Systems (not time steps) are split, so no trajectory is seen in two splits; the indices are saved
with each run (save_splits/load_splits). Training windows are cut from each system's encoded series
(text, or token ids) in tokens: ``context_length`` tokens, every ``stride``
tokens, and a last window flush with the end so every token is covered. A series shorter than a
window is right-padded; with causal attention a real token never attends to the padding after it,
and padded positions are never scored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from experiments.lib import files
from experiments.lib.science import llmtime


def split_systems(n: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), *,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint, sorted system indices {"train", "val", "test"}, a seeded permutation cut by fractions.

    Whole systems are split (never time steps of one system), so nothing about a test trajectory
    is seen in training. Cut points are rounded cumulative fractions, so the sizes always add to n.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    a = round(n * fractions[0])
    b = max(a, round(n * (fractions[0] + fractions[1])))
    return {"train": np.sort(order[:a]), "val": np.sort(order[a:b]), "test": np.sort(order[b:])}


def save_splits(path: str | os.PathLike, splits: dict[str, np.ndarray]) -> Path:
    """splits.json: the system indices of each split, so a run's test systems can be found again."""
    return files.write_text(path, json.dumps({k: np.asarray(v).tolist() for k, v in splits.items()}, indent=2) + "\n")


def load_splits(path: str | os.PathLike, n_systems: int | None = None) -> dict[str, np.ndarray]:
    """Read splits.json back, checking the splits are disjoint and (given n_systems) in range."""
    splits = {k: np.asarray(v, dtype=np.int64) for k, v in json.loads(Path(path).read_text()).items()}
    every = np.concatenate([v for v in splits.values()]) if splits else np.zeros(0, dtype=np.int64)
    if len(np.unique(every)) != len(every):
        raise ValueError(f"{path}: a system appears in two splits")
    if n_systems is not None and len(every) and (every.min() < 0 or every.max() >= n_systems):
        raise ValueError(f"{path}: indices outside the {n_systems} systems of the data")
    return splits


@dataclass
class Windows:
    input_ids: torch.Tensor       # [N, L]
    labels: torch.Tensor          # [N, L]: labels[:, t] = input_ids[:, t + 1]; -100 = not scored
    attention_mask: torch.Tensor  # [N, L]: 1 real token, 0 padding (on the right)

    def head(self, n: int) -> Windows:
        """The first ``n`` windows (e.g. the fixed validation subset scored at every evaluation)."""
        return Windows(self.input_ids[:n], self.labels[:n], self.attention_mask[:n])


def window_starts(n_tokens: int, context_length: int, stride: int) -> list[int]:
    """Window starts covering every token: 0, stride, 2*stride, ... and one flush with the end."""
    if n_tokens <= context_length:
        return [0]
    starts = list(range(0, n_tokens - context_length + 1, stride))
    if starts[-1] != n_tokens - context_length:
        starts.append(n_tokens - context_length)
    return starts


def training_windows(texts: Sequence[str] | Sequence[Sequence[int]], tokenizer=None, *, context_length: int,
                     stride: int | None = None, pad_id: int | None = None) -> Windows:
    """Token windows of every series, given as texts (tokenized with ``tokenizer``, a
    ``qwen_min.Tokenizer``) or as token id lists (then no tokenizer is needed, but ``pad_id`` is).

    labels are already shifted: labels[:, t] = input_ids[:, t + 1] where both are real tokens, and
    -100 at the last position and wherever position t + 1 is padding, so the loss never scores the
    pad token. Padding is on the right and marked 0 in attention_mask.

    Because a window's last position has no target, windows must overlap by at least one token for
    every next token of a series to be a target: the default stride is context_length - 1 (each
    transition scored exactly once); stride = context_length leaves the first token of each later
    window unscored as a target (1 in context_length).
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}")
    stride = stride or context_length - 1
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}] so no token is skipped, "
                         f"got {stride}")
    series = list(texts)
    if any(isinstance(x, str) for x in series):
        if tokenizer is None:
            raise ValueError("training_windows: texts need a tokenizer")
        series = tokenizer.encode_batch([str(x) for x in series]) if series else []
    pad = pad_id if pad_id is not None else getattr(tokenizer, "pad_id", None)
    if pad is None:
        raise ValueError("training_windows: give pad_id or a tokenizer that has one")
    rows, masks = [], []
    for ids in series:
        ids = [int(i) for i in ids]
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
    target_text: str      # their encoding, ending with ';': prompt + target_text encodes the first C + H steps


def forecast_examples(trajectories: np.ndarray, systems: Sequence[int], encoding: llmtime.EncodingConfig, *,
                      context_steps: int, horizon: int) -> list[ForecastExample]:
    """Prompt = encode(first C steps) + ';', so it ends on a separator and never inside a number;
    the target is the next H steps, as numbers and as the text a perfect model would continue with."""
    T = trajectories.shape[1]
    if context_steps < 1 or horizon < 1 or context_steps + horizon > T:
        raise ValueError(f"context_steps {context_steps} + horizon {horizon} must fit in the {T} time steps")
    def enc(values: np.ndarray) -> str:
        return llmtime.encode(values, alpha=encoding.alpha, decimals=encoding.decimals) + ";"

    out = []
    for i in systems:
        if not 0 <= int(i) < len(trajectories):
            raise ValueError(f"system {i} is outside the {len(trajectories)} systems")
        x = trajectories[int(i)]
        target = x[context_steps:context_steps + horizon].copy()
        out.append(ForecastExample(int(i), enc(x[:context_steps]), target, enc(target)))
    return out

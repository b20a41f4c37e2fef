"""A model that writes numbers, for the tests: a Qwen2 whose generation is scripted, and the
figures of what it writes derived by hand.

A tiny random checkpoint writes no number (its continuations are ';;;;'), so the way from generated
text to decoded forecasts, the fill rule and the metrics would otherwise only ever see the fill.
``NumberWriter`` is the real model (its weights, KV cache, LoRA layers, FLOP count) except for the
last hidden state of each generation step: that is replaced by a vector whose logits over the
LLMTIME alphabet single out the next character of a scripted continuation. So ``qwen_min.generate``,
the constrained decoding, the stop rule, the tokenizer, ``forecasting.forecast`` and every script
above them run as they do for a real model, on text that decodes.

What it writes is a pure function of the prompt's text: ``continuation(prompt, who, sample,
horizon)`` (``who``: "untrained" while every LoRA B is zero, else "trained"; ``sample``: None for
greedy, else the sample's index). A test computes the same texts from the prompts it encodes itself,
decodes them with its own parser and derives every figure with numpy (the ``hand_*`` functions),
never with the library's metrics.

Training and cross-entropy evaluation (``hidden`` without a KV cache) are the real model's.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch

import lora
import qwen_min
from qwen_min import Qwen2

ALPHABET = "0123456789,.;"
SCALE = 1000.0   # the scripted character's logit; every other allowed one gets 0 (lm_head bias aside)


# ---------------------------------------------------------------------------------------------
# What it writes


def _steps(prompt: str) -> list[tuple[float, float]]:
    """The prompt's time steps as numbers in encoded units ("0.93,2.37;1.04,2.94;" -> [(0.93, 2.37), ...])."""
    return [(float(a), float(b)) for a, b in (s.split(",") for s in prompt.rstrip(";").split(";"))]


def continuation(prompt: str, who: str, sample: int | None, horizon: int) -> str:
    """The text written after ``prompt`` (an LLMTIME prompt ending with ';'): ``horizon`` steps.

    From the prompt's last step (a, b), in encoded units, step h = 1..horizon:
      untrained  (a + 0.05 h, b): drifts away; step h malformed (one decimal) where (h + len) % 5 == 0
      trained    (0.98^h a, b + 0.02 h): step h malformed (an empty field) where (h + len) % 4 == 1;
                 prompts of odd length stop writing numbers after horizon - 2 steps (the rest
                 are empty steps: malformed)
      samples    the greedy text of the same model with step h >= 2 shifted by 0.03 (s + 1) (h - 1)
                 in prey, and step s + 2 malformed (no decimal point); every sample shares step 1 with
                 greedy (its first character comes from the shared prefill)
    """
    a, b = _steps(prompt)[-1]
    n = len(prompt)
    out = []
    for h in range(1, horizon + 1):
        if who == "untrained":
            x, y = a + 0.05 * h, b
            bad = (h + n) % 5 == 0
        else:
            x, y = 0.98 ** h * a, b + 0.02 * h
            bad = (h + n) % 4 == 1
            if n % 2 == 1 and h > horizon - 2:
                out.append("")
                continue
        if sample is not None and h >= 2:
            x += 0.03 * (sample + 1) * (h - 1)
            if h == sample + 2:
                out.append(f"{round(x):d},{y:.2f}")
                continue
        if bad:
            out.append(f"{x:.1f},{y:.2f}" if who == "untrained" else f",{y:.2f}")
        else:
            out.append(f"{x:.2f},{y:.2f}")
    return "".join(s + ";" for s in out)


Writer = Callable[[str, str, int | None], str]


class NumberWriter(Qwen2):
    """A Qwen2 whose generated characters are scripted (see the module docstring). Made from a loaded
    model by ``NumberWriter.adopt``; ``written`` maps (prompt, who, sample) to the text it wrote."""

    writer: Writer
    tokenizer: qwen_min.Tokenizer
    written: dict[tuple[str, str, int | None], str]

    @classmethod
    def adopt(cls, model: Qwen2, writer: Writer, tokenizer: qwen_min.Tokenizer,
              written: dict | None = None) -> NumberWriter:
        """``model`` itself, now a NumberWriter (its class swapped: every weight, tie and attribute the
        loader set stays as it is, so LoRA, adapters and the FLOP counter see the same model)."""
        model.__class__ = cls
        model.writer, model.tokenizer = writer, tokenizer
        model.written = {} if written is None else written
        model._ids = {c: tokenizer.encode(c) for c in ALPHABET}
        assert all(len(i) == 1 for i in model._ids.values()), model._ids
        model._ids = {c: i[0] for c, i in model._ids.items()}
        return model

    def _who(self) -> str:
        trained = any(bool(layer.lora_B.weight.any()) for layer in lora.lora_layers(self).values())
        return "trained" if trained else "untrained"

    def _direction(self, chars: list[str]) -> torch.Tensor:
        """[len(chars), D] hidden states whose logits over the alphabet are SCALE for each char, 0 for the
        other twelve: the least-squares solution through the alphabet's rows of the output layer."""
        W = self.lm_head.weight[list(self._ids.values())].float()             # [13, D]
        pinv = torch.linalg.pinv(W)                                            # [D, 13]
        onehot = torch.zeros(len(chars), len(ALPHABET))
        onehot[torch.arange(len(chars)), [ALPHABET.index(c) for c in chars]] = SCALE
        return (onehot @ pinv.T).to(self.lm_head.weight.dtype)

    def hidden(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        if cache is None:   # training, cross-entropy: the real model
            return super().hidden(input_ids, attention_mask=attention_mask, positions=positions, cache=cache)
        prefill = cache.length == 0
        h = super().hidden(input_ids, attention_mask=attention_mask, positions=positions, cache=cache)
        rows, T = input_ids.shape
        if prefill:   # a new generate call: the prompts (left padding dropped) and whether an adapter has learnt
            keep = (attention_mask[:, :T] if attention_mask is not None else torch.ones_like(input_ids)).bool()
            self._prompts = [self.tokenizer.decode(r[k].tolist()) for r, k in zip(input_ids, keep, strict=True)]
            self._state, self._texts, self._call = self._who(), None, 0
        B = len(self._prompts)
        if self._texts is None and not prefill:   # the first decode step shows the rows per prompt
            S = rows // B
            self._texts = [self._write(self._prompts[r // S], None if S == 1 else r % S) for r in range(rows)]
        texts = self._texts or [self._write(p, None) for p in self._prompts]
        c = self._call
        chars = [t[c] if c < len(t) else ";" for t in texts]
        self._call += 1
        h = h.clone()
        h[:, -1] = self._direction(chars)
        return h

    def _write(self, prompt: str, sample: int | None) -> str:
        text = self.writer(prompt, self._state, sample)
        assert set(text) <= set(ALPHABET), text
        self.written[(prompt, self._state, sample)] = text
        return text


# ---------------------------------------------------------------------------------------------
# The figures by hand: a test's own encoder, parser, fill rule and statistics (numpy only)

FIELD = re.compile(r"[0-9]+\.[0-9]{2}")


def hand_prompt(series: np.ndarray, alpha: float) -> str:
    """(C, 2) values -> the LLMTIME prompt: each value / alpha with two decimals, ',' and ';'."""
    return "".join(f"{a / alpha:.2f},{b / alpha:.2f};" for a, b in series)


def hand_decode(text: str, horizon: int, alpha: float) -> np.ndarray:
    """(H, 2) values * alpha of the first ``horizon`` ';'-ended steps; NaN where a step is not two
    fields of digits, a point and two decimals, or was never written."""
    out = np.full((horizon, 2), np.nan)
    for h, step in enumerate(text.split(";")[:-1][:horizon]):
        fields = step.split(",")
        if len(fields) == 2 and all(FIELD.fullmatch(f) for f in fields):
            out[h] = [float(f) * alpha for f in fields]
    return out


def hand_fill(pred: np.ndarray, last: np.ndarray) -> np.ndarray:
    """(H, 2) with each NaN step replaced by the last valid step before it, or ``last`` (2,)."""
    out, current = pred.copy(), last.copy()
    for h in range(len(pred)):
        if np.isfinite(pred[h]).all():
            current = pred[h]
        out[h] = current
    return out


def hand_mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard error (sd with ddof 1 over sqrt(n)) of per-system figures."""
    x = np.asarray(x, dtype=float)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))


def hand_scores(pred: np.ndarray, truth: np.ndarray, last: np.ndarray) -> dict:
    """The figures of forecasts (N, H, 2) NaN where malformed, by hand: per-system filled-in MAE over
    all steps, the first 10 and each horizon block (h1_10, h11_25), coverage, relative score."""
    N, H, _ = truth.shape
    err = np.abs(np.stack([hand_fill(pred[i], last[i]) for i in range(N)]) - truth)
    out = {"per_system": err.mean(axis=(1, 2)), "coverage": float(np.isfinite(pred).all(-1).mean()),
           "malformed": int((~np.isfinite(pred).all(-1)).sum())}
    out["mae"], out["mae_se"] = hand_mean_se(out["per_system"])
    out["h1_10"] = hand_mean_se(err[:, :10].mean(axis=(1, 2)))[0]
    if H > 10:
        out["h11_25"] = hand_mean_se(err[:, 10:25].mean(axis=(1, 2)))[0]
    persistence = np.abs(last[:, None] - truth).mean(axis=(1, 2))
    out["relative"] = float(np.exp(np.mean(np.log(out["per_system"] / persistence))))
    out["errors"] = err
    return out


def hand_paired(a: np.ndarray, b: np.ndarray, truth: np.ndarray, last: np.ndarray) -> dict:
    """a - b system by system (filled-in MAE): mean, SE, systems a beats, median, and the h1_10 block's
    mean, systems a beats there and median."""
    ea, eb = hand_scores(a, truth, last), hand_scores(b, truth, last)
    d = ea["per_system"] - eb["per_system"]
    mean, se = hand_mean_se(d)
    block = (ea["errors"][:, :10] - eb["errors"][:, :10]).mean(axis=(1, 2))
    return {"mae_diff": mean, "se": se, "better": int((d < 0).sum()), "median": float(np.median(d)), "per_system": d,
            "h1_10": float(block.mean()), "h1_10_better": int((block < 0).sum()),
            "h1_10_median": float(np.median(block))}


def hand_forecasts(series: np.ndarray, alpha: float, context: int, horizon: int, who: str,
                   sample: int | None = None) -> tuple[list[str], np.ndarray]:
    """The texts the writer writes after each system's prompt (cut at the horizon's ';') and their
    values decoded by hand, (N, H, 2)."""
    texts, values = [], []
    for s in series:
        text = continuation(hand_prompt(s[:context], alpha), who, sample, horizon)
        text = "".join(x + ";" for x in text.split(";")[:horizon])
        texts.append(text)
        values.append(hand_decode(text, horizon, alpha))
    return texts, np.stack(values)


def written_for(written: dict, series: np.ndarray, alpha: float, context: int, who: str) -> bool:
    """Whether the writer was asked for every one of these systems' prompts by ``who``."""
    return all((hand_prompt(s[:context], alpha), who, None) in written for s in series)


__all__ = ["NumberWriter", "continuation", "hand_decode", "hand_fill", "hand_forecasts", "hand_mean_se", "hand_paired",
           "hand_prompt", "hand_scores", "written_for"]

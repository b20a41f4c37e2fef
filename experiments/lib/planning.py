"""FLOPs of training runs, evaluations and forecasts, from the model's config alone.

Every script plans what it will spend and checks it against the ledger before it loads any
weights: the counter needs only the model's structure, which the config gives (the model is built
on the meta device, where tensors have shapes and no memory).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

import flops
import lora
import qwen_min
from experiments.lib import forecasting
from qwen_min import Qwen2, QwenConfig, Tokenizer


def meta_model(config: QwenConfig) -> Qwen2:
    """The model's structure without memory, for the FLOP counter."""
    with torch.device("meta"):
        return Qwen2(config)


@dataclass
class TrainPlan:
    step: float       # one optimizer step, every position scored (an upper bound)
    eval: float       # one evaluation: the validation subset, and the validation forecasts (their token limit)
    full_eval: float  # the final evaluation of the whole validation split
    steps: int        # optimizer steps still to run
    evals: int        # evaluations of the validation subset among them
    total: float      # what is left of the run as configured: those steps and evaluations, on every rank


def train_plan(args: argparse.Namespace, n_val_windows: int, world: int = 1, *, from_step: int = 0,
               forecast: tuple[int, int, int] | None = None) -> tuple[TrainPlan, Qwen2]:
    """FLOPs of a train.py run as configured, from optimizer step ``from_step`` on (a resumed run),
    and the LoRA-wrapped model structure they were counted on: every step left, every evaluation
    among them (at step 0 with --eval-at-start, then every --eval-every steps), and the final full evaluation
    (evaluations run on every rank). ``forecast``: (prompts, prompt tokens, token limit) of the
    validation forecasts each evaluation makes, in one greedy generate call."""
    shape = meta_model(qwen_min.load_config(args.model, revision=args.revision))
    lora.apply_lora(shape, rank=args.rank, alpha=args.lora_alpha, targets=tuple(args.targets),
                    train_lm_head_bias=args.train_lm_head_bias)
    L = args.context_length
    step = flops.count(shape, batch=args.batch_size, seq_len=L, mode="train").total
    subset = min(args.eval_windows, n_val_windows)
    evaluation = flops.count(shape, batch=subset, seq_len=L, mode="forward").total if subset else 0.0
    if forecast:
        n, prompt_len, new_tokens = forecast
        evaluation += forecast_flops(shape, n_prompts=n, prompt_len=prompt_len, new_tokens=new_tokens, batch_size=n,
                                     samples=0, vocab=len(forecasting.ALPHABET))
    full = flops.count(shape, batch=n_val_windows, seq_len=L, mode="forward").total
    steps = max(0, args.max_steps - from_step)
    every = args.eval_every
    # the evaluations at steps 0, every, 2 every, ... up to max_steps not yet run (a resumed run's
    # checkpoint at ``from_step`` was written after that step's evaluation)
    at_start = from_step == 0 and args.eval_at_start
    evals = args.max_steps // every - min(from_step, args.max_steps) // every + at_start if every else 0
    total = steps * step + world * (evals * evaluation + full)
    return TrainPlan(step, evaluation, full, steps, evals, total), shape


class ScoredCosts:
    """FLOPs of one training step, or one evaluation, at the number of tokens actually scored (the
    output layer runs only for those; a plan assumes every position is). Each distinct number of
    scored tokens is put to the counter once and remembered: the loop asks at every step."""

    def __init__(self, shape: Qwen2, batch_size: int, context_length: int) -> None:
        self.shape, self.batch_size, self.context_length = shape, batch_size, context_length
        self._train: dict[int, float] = {}
        self._eval: dict[tuple[int, int], float] = {}

    def train_step(self, scored: int) -> float:
        if scored not in self._train:
            self._train[scored] = flops.count(self.shape, batch=self.batch_size, seq_len=self.context_length,
                                              mode="train", scored_tokens=scored).total
        return self._train[scored]

    def evaluation(self, rows: int, scored: int) -> float:
        if (rows, scored) not in self._eval:
            self._eval[rows, scored] = flops.count(self.shape, batch=rows, seq_len=self.context_length,
                                                   mode="forward", scored_tokens=scored).total
        return self._eval[rows, scored]


def forecast_flops(shape: Qwen2, *, n_prompts: int, prompt_len: int, new_tokens: int, batch_size: int,
                   samples: int, vocab: int | None) -> float:
    """An upper bound of one model's forecasts: greedy, then (samples > 0) ``samples`` draws per
    prompt, in generate calls of ``batch_size`` prompts, every one padded to ``prompt_len`` tokens and
    every row running to the token limit ``new_tokens``."""
    total = 0.0
    for start in range(0, n_prompts, batch_size):
        n = min(batch_size, n_prompts - start)
        for S, sampled in [(1, False)] + ([(samples, True)] if samples else []):
            total += forecasting.generation_flops(shape, batch=n, prompt_len=prompt_len, steps=new_tokens,
                                                  num_samples=S, vocab=vocab, sampled=sampled, padded=True)[0]
    return total


def forecast_plan(args: argparse.Namespace, shape: Qwen2, tokenizer: Tokenizer, prompts: list[str]) -> float:
    """An upper bound of one model's forecasts as forecast.py's ``args`` make them."""
    return forecast_flops(shape, n_prompts=len(prompts), prompt_len=max(len(tokenizer.encode(p)) for p in prompts),
                          new_tokens=forecasting.max_new_tokens(prompts, args.horizon), batch_size=args.forecast_batch,
                          samples=args.samples, vocab=None if args.unconstrained else len(forecasting.ALPHABET))

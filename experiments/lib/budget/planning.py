"""FLOPs of training runs, evaluations and forecasts, before any weights are loaded.

Every script plans what it will spend and checks it against the ledger before it loads any
weights: the counter needs only the model's structure, which the config gives (the model is built
on the meta device, where tensors have shapes and no memory), and the work: the batches a run
will draw with the tokens each scores, its evaluations, its generate calls. Plans use the very
counts the runs charge (ScoredCosts, forecasting.planned_calls), so a plan is what a run spends
(generation run to its token limit) or bounds it (generation stopping at the horizon).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import flops
import lora
import qwen_min
from experiments.lib.run.config import ForecastConfig, TrainConfig
from experiments.lib.science import data, forecasting
from experiments.lib.training import schedule
from experiments.lib.training.state import RunState
from qwen_min import Qwen2, QwenConfig, Tokenizer


def meta_model(config: QwenConfig) -> Qwen2:
    """The model's structure without memory, for the FLOP counter."""
    with torch.device("meta"):
        return Qwen2(config)


@dataclass
class TrainPlan:
    costs: ScoredCosts  # the prices it was made with, which the run charges: the same counts
    step: float       # one optimizer step, on average over the steps left
    eval: float       # one evaluation: the validation subset, and the validation forecasts
    full_eval: float  # the final evaluation of the whole validation split
    steps: int        # optimizer steps still to run
    evals: int        # evaluations of the validation subset among them
    total: float      # what is left of the run as configured: those steps and evaluations, on every rank
    generation: float = 0.0   # the part of ``total`` that is the evaluations' forecasts, at their token limit


def train_plan(cfg: TrainConfig, train: data.Windows, val: data.Windows, world: int = 1, *,
               from_step: int = 0, forecast_calls: list[dict] | None = None) -> tuple[TrainPlan, Qwen2]:
    """FLOPs of a train.py run as configured, from optimizer step ``from_step`` on (a resumed run),
    and the LoRA-wrapped model structure they were counted on: every step left, on the very batches
    it will draw (the tokens each scores), every evaluation among them (at step 0 with
    --eval-at-start, then every --eval-every steps) and the final full evaluation, on every rank.
    ``forecast_calls``: the generate calls of the validation forecasts each evaluation makes.

    The loop charges the same counts (ScoredCosts), so the plan is what the run spends: exactly for
    its steps and cross-entropy evaluations, and for its forecasts at most (``generation``: priced at
    their token limit, spent exactly with --run-to-limit, less when they stop at the horizon)."""
    shape = meta_model(qwen_min.load_config(cfg.model, revision=cfg.revision))
    lora.apply_lora(shape, rank=cfg.rank, alpha=cfg.lora_alpha, targets=cfg.targets,
                    train_lm_head_bias=cfg.train_lm_head_bias)
    costs = ScoredCosts(shape, cfg.batch_size, train.input_ids.shape[1])   # (--context-length series: the data's)
    steps = sum(step_costs(costs, train, cfg.max_steps, cfg.seed)[from_step:])
    subset = val.head(cfg.eval_windows)
    evaluation = costs.evaluation(len(subset.input_ids), int((subset.labels != -100).sum())) if cfg.eval_every else 0.0
    generation = calls_flops(shape, forecast_calls or []) if cfg.eval_every else 0.0
    evaluation += generation
    full = costs.windows_loss(val.labels)
    n_steps = max(0, cfg.max_steps - from_step)
    every = cfg.eval_every
    # the evaluations at steps 0, every, 2 every, ... up to max_steps not yet run (a resumed run's
    # checkpoint at ``from_step`` was written after that step's evaluation)
    at_start = from_step == 0 and cfg.eval_at_start
    evals = cfg.max_steps // every - min(from_step, cfg.max_steps) // every + at_start if every else 0
    total = steps + world * (evals * evaluation + full)
    plan = TrainPlan(costs, steps / max(1, n_steps), evaluation, full, n_steps, evals, total,
                     world * evals * generation)
    return plan, shape


def step_costs(costs: ScoredCosts, train: data.Windows, n_steps: int, seed: int) -> list[float]:
    """FLOPs of each of the first ``n_steps`` optimizer steps, on the very batches the loop draws (the
    tokens each scores): what a run's steps cost, and what a step count is worked out from."""
    scored = (train.labels != -100).sum(1).numpy()          # [N] scored tokens of every training window
    walk, out = RunState(), []
    for _ in range(n_steps):                                # the batches the loop draws, in its order
        batch = schedule.next_batch(walk, len(scored), costs.batch_size, seed)
        walk.position += costs.batch_size
        out.append(costs.train_step(int(scored[batch].sum())))
    return out


class ScoredCosts:
    """FLOPs of one training step, or one evaluation, at the number of tokens actually scored (the
    output layer runs only for those; a plan assumes every position is). Each distinct number of
    scored tokens is put to the counter once and remembered: the loop asks at every step."""

    def __init__(self, shape: Qwen2, batch_size: int, context_length: int) -> None:
        self.shape, self.batch_size, self.context_length = shape, batch_size, context_length
        self.step_tokens = batch_size * context_length   # every position of every window of a step
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

    def windows_loss(self, labels: torch.Tensor) -> float:
        """evaluation.windows_loss over windows with these labels, in its batches of ``batch_size``."""
        return sum(self.evaluation(len(y), int((y != -100).sum())) for y in labels.split(self.batch_size))


def calls_flops(shape: Qwen2, calls: list[dict]) -> float:
    """FLOPs of these ``generate`` calls (forecasting.planned_calls) by the counter."""
    return sum(forecasting.generation_flops(shape, **call)[0] for call in calls)


def forecast_plan(cfg: ForecastConfig, shape: Qwen2, tokenizer: Tokenizer, prompts: list[str]) -> float:
    """One model's forecasts as forecast.py's config makes them: greedy, then --samples draws per
    prompt, in calls of --forecast-batch prompts. Exact with --run-to-limit (and constrained
    decoding); otherwise an upper bound (every row running to the token limit)."""
    lengths = [len(ids) for ids in tokenizer.encode_batch(prompts)]
    vocab = None if cfg.unconstrained else len(forecasting.ALPHABET)
    calls = forecasting.planned_calls(lengths, prompts, cfg.horizon, batch_size=cfg.forecast_batch, num_samples=1,
                                      vocab=vocab, sampled=False)
    if cfg.samples:
        calls += forecasting.planned_calls(lengths, prompts, cfg.horizon, batch_size=cfg.forecast_batch,
                                           num_samples=cfg.samples, vocab=vocab, sampled=True)
    return calls_flops(shape, calls)

"""The ledger's side of a training run, so train.py's loop and its evaluations are the model, LoRA
and the loss, with the accounting attached from outside (train.py's RunHooks call these).

Every price comes from ``planning.ScoredCosts``, the same counts the run was planned and reserved
with, so what is charged is what was planned: exactly for steps and cross-entropy evaluations, at
most for generation. Each charge also counts in ``state.flops`` (the run's own figure, checkpointed
with it). A data-parallel run's ranks all do the work; rank 0 charges ``world`` times one rank's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from experiments.lib.budget.booking import Booking
from experiments.lib.budget.planning import ScoredCosts, calls_flops
from experiments.lib.training.state import RunState


class RunAccounts:
    """``before_step``: a step the reservation cannot pay for is refused before it runs (a reservation
    is a ceiling). ``step_done``: the block where a finished step is charged and counted before the
    loop advances the state and writes its metrics row; SIGINT and SIGTERM wait for the whole block,
    so the ledger and metrics.jsonl agree, and a SIGKILL can lose a row but never a charge.
    ``settled``: a checkpoint's block, every pending step charged first. ``before_eval``: an
    evaluation refused before it runs; ``eval_loss_done`` and ``forecast_done``: its charges (kind
    ``eval``), its cross-entropy's and each generate call's. ``final_batch``: the charge of each
    batch of the final evaluation, which every rank runs."""

    def __init__(self, booking: Booking, costs: ScoredCosts, state: RunState, *, world: int = 1) -> None:
        self.booking, self.costs, self.state, self.world = booking, costs, state, world

    def before_step(self, scored: int) -> None:
        self.booking.ensure(self.costs.train_step(scored), f"step {self.state.step + 1}")

    @contextlib.contextmanager
    def step_done(self, scored: int) -> Iterator[None]:
        cost = self.costs.train_step(scored)   # (each count's price is remembered: no recount per step)
        with self.booking.held():
            self.state.flops += cost
            self.booking.step(cost, self.state.step + 1)
            yield

    @contextlib.contextmanager
    def settled(self) -> Iterator[None]:
        with self.booking.held():
            self.booking.flush()
            yield

    def held(self) -> contextlib.AbstractContextManager:
        """A block that SIGINT and SIGTERM wait for (a charge and the metrics row it pays for)."""
        return self.booking.held()

    def before_eval(self, rows: int, scored: int, calls: list[dict]) -> None:
        """Refuse an evaluation the reservation cannot pay for, before it runs: the cross-entropy of
        ``rows`` windows scoring ``scored`` tokens and the generate ``calls`` (priced at their token
        limit: at least what they spend), on every rank."""
        flops = self.costs.evaluation(rows, scored) + calls_flops(self.costs.shape, calls)
        self.booking.ensure(self.world * flops, f"the evaluation at step {self.state.step}")

    def eval_loss_done(self, rows: int, scored: int) -> None:
        """Charge an evaluation's cross-entropy of ``rows`` windows that scored ``scored`` tokens."""
        self.eval_done(self.costs.evaluation(rows, scored), rows * self.costs.context_length,
                       {"split": "val", "step": self.state.step, "windows": rows})

    def forecast_done(self, call: dict, flops: float) -> None:
        """Charge an evaluation's generate ``call`` (forecasting.planned_calls' terms), which spent ``flops``."""
        self.eval_done(flops, call["batch"] * call["steps"],
                       {"split": "val", "step": self.state.step, "forecast": call})

    def eval_done(self, flops: float, tokens: int, config: dict) -> None:
        """Charge one rank's finished evaluation work (its cross-entropy, or one generate call)."""
        with self.booking.held():  # the charge and the run's count of its FLOPs: both or neither
            self.state.flops += self.world * flops
            self.booking.charge(self.world * flops, kind="eval", tokens=self.world * tokens, config=config)

    def final_batch(self, of: int) -> Callable[[int, int], None]:
        def charge(rows: int, scored: int) -> None:
            self.eval_done(self.costs.evaluation(rows, scored), rows * self.costs.context_length,
                           {"split": "val", "step": self.state.step, "windows": rows, "of": of})
        return charge

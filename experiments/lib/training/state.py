"""What a training run carries from step to step: its state (steps, data position, early stopping's
bookkeeping, tokens and FLOPs: what a resumed run needs besides the tensors), the copy of the
trained weights early stopping keeps, and the refusal of a loss that is not finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from experiments.lib import errors


@dataclass
class RunState:
    """Everything a resumed run needs besides the tensors; saved as the checkpoint's state.json."""

    step: int = 0                 # optimizer steps taken
    epoch: int = 0                # data epoch, and ...
    position: int = 0             # ... windows of its permutation already used
    best_val: float = math.inf    # early stopping: the best validation score so far (--select-by),
    best_step: int = 0            # the step it was measured at,
    bad_evals: int = 0            # and evaluations since then without improvement
    best_scores: dict = field(default_factory=dict)  # every validation figure of that evaluation
    tokens: int = 0               # tokens trained on (every position of every window)
    flops: float = 0.0            # FLOPs of the steps and evaluations that led to this state
    # Nothing about the ledger: a checkpoint is written only once every FLOP in it is charged (see
    # budget/booking.py), so a resumed run owes nothing for the work before it, and what it re-runs it charges anew.

    def record_val(self, score: float, figures: dict | None = None) -> bool:
        """Early stopping's bookkeeping for one evaluation (lower ``score`` is better, ``figures`` all
        it measured); True when it is the best so far (keep this adapter)."""
        if score < self.best_val:
            self.best_val, self.best_step, self.bad_evals = score, self.step, 0
            self.best_scores = dict(figures or {})
            return True
        self.bad_evals += 1
        return False

    def out_of_patience(self, patience: int) -> bool:
        """``patience`` evaluations in a row without improvement (patience 0: never)."""
        return bool(patience) and self.bad_evals >= patience

    def advance(self, windows: int, tokens: int) -> None:
        """One optimizer step done over ``windows`` windows holding ``tokens`` tokens: the step count,
        the data position and the tokens trained on move on."""
        self.step, self.position = self.step + 1, self.position + windows
        self.tokens += tokens


def check_finite(loss: float, what: str, step: int) -> None:
    """A loss that is not finite stops the run (errors.Diverged: exit 1 with its message; train.py
    keeps the best adapter so far)."""
    if not math.isfinite(loss):
        raise errors.Diverged(f"step {step}: the {what} loss is {loss}")


def trainable_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights (adapters, bias) as they are now: early stopping keeps the best of these."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        if n in weights:
            p.copy_(weights[n])

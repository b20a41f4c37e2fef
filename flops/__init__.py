"""flops: the study's FLOP accounting.

    flops.count(model, batch=4, seq_len=512, mode="train")   -> FlopReport (total, breakdowns)
    flops.Ledger("runs/ledger.jsonl", budget=1e17)            -> reserve / charge / close, spent / remaining, reports
    python -m flops --model Qwen/Qwen2.5-0.5B-Instruct --seq-len 512 --batch 4 --lora-rank 4 --mode train
    python -m flops ledger [--settle] [--repair]

``primitives`` holds the cost table, ``counter`` the analytic formulas, ``verify`` the dispatch-mode
and FlopCounterMode checks, ``ledger`` the budget.
"""

from flops.counter import MODES, FlopReport, Term, count, format_report
from flops.ledger import (
    DEFAULT_BUDGET,
    DEFAULT_LEDGER,
    BudgetExceeded,
    Ledger,
    LedgerDamaged,
    LedgerEntry,
    Reservation,
    ReservationRecord,
)

__all__ = ["DEFAULT_BUDGET", "DEFAULT_LEDGER", "MODES", "BudgetExceeded", "FlopReport", "Ledger", "LedgerDamaged",
           "LedgerEntry", "Reservation", "ReservationRecord", "Term", "count", "format_report"]

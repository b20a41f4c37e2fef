"""flops: the study's FLOP accounting.

    flops.count(model, batch=4, seq_len=512, mode="train")   -> FlopReport (total, breakdowns)
    flops.Ledger(flops.DEFAULT_LEDGER, budget=flops.DEFAULT_BUDGET)
                                                             -> reserve / charge / close, spent / remaining
    flops.report_markdown(ledger), report_csv, summary       -> the ledger's reports
    python -m flops --model Qwen/Qwen2.5-0.5B-Instruct --context-length 512 --batch-size 4 --rank 4 --mode train
    python -m flops ledger [--settle] [--repair]

``primitives`` holds the cost table, ``counter`` the analytic formulas, ``verify`` the dispatch-mode
and FlopCounterMode checks, ``ledger`` the budget (``ledger_entries`` its lines, ``ledger_report`` its
reports, ``liveness`` whether a reservation's processes still run).
"""

from flops.counter import MODES, FlopReport, Term, count, format_report
from flops.ledger import (
    DEFAULT_BUDGET,
    DEFAULT_LEDGER,
    BudgetExceeded,
    Ledger,
    LedgerDamaged,
    LedgerError,
    LedgerWriteError,
    Reservation,
    ReservationExceeded,
)
from flops.ledger_entries import LedgerEntry, ReservationRecord
from flops.ledger_report import report_csv, report_markdown, summary

__all__ = ["DEFAULT_BUDGET", "DEFAULT_LEDGER", "MODES", "BudgetExceeded", "FlopReport", "Ledger", "LedgerDamaged",
           "LedgerEntry", "LedgerError", "LedgerWriteError", "Reservation", "ReservationExceeded", "ReservationRecord",
           "Term", "count", "format_report", "report_csv", "report_markdown", "summary"]

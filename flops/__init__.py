"""flops: the study's FLOP accounting.

    flops.count(model, batch=4, seq_len=512, mode="train")   -> FlopReport (total, breakdowns)
    flops.Ledger("runs/ledger.jsonl", budget=1e17)            -> check / append / spent / report
    python -m flops --model Qwen/Qwen2.5-0.5B-Instruct --seq-len 512 --batch 4 --lora-rank 4 --mode train

``primitives`` holds the cost table, ``counter`` the analytic formulas, ``verify`` the dispatch-mode
and FlopCounterMode checks, ``ledger`` the budget.
"""

from flops.counter import MODES, FlopReport, Term, count, format_report
from flops.ledger import DEFAULT_BUDGET, BudgetExceeded, Ledger, LedgerEntry

__all__ = ["DEFAULT_BUDGET", "MODES", "BudgetExceeded", "FlopReport", "Ledger", "LedgerEntry", "Term", "count",
           "format_report"]

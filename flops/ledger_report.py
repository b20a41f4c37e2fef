"""The FLOP ledger's reports: ``summary`` (plain data, ``python -m flops ledger --json``), ``report_csv``
(one row per charge) and ``report_markdown`` (charges per experiment and kind, reservations, what is left).

Each reads the ledger once (``Ledger.snapshot``): damaged lines are left out of every figure and listed.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from flops.ledger import Ledger
from flops.ledger_entries import LedgerEntry

COLUMNS = ("name", "kind", "tokens", "steps", "seconds", "flops", "percent_of_budget")


def _row(budget: float, name: str, kind: str, tokens: Any, steps: Any, seconds: Any, flops: float) -> dict[str, Any]:
    return {"name": name, "kind": kind, "tokens": tokens, "steps": steps, "seconds": seconds, "flops": flops,
            "percent_of_budget": 100 * flops / budget}


def _grouped(charges: list[LedgerEntry]) -> list[LedgerEntry]:
    """Charges summed per (name, kind), in order of first appearance."""
    groups: dict[tuple[str, str], LedgerEntry] = {}
    for e in charges:
        g = groups.setdefault((e.name, e.kind), LedgerEntry(name=e.name, kind=e.kind, flops=0.0))
        g.flops += e.flops
        g.tokens += e.tokens
        g.steps += e.steps
        g.seconds += e.seconds
    return list(groups.values())


def _by_kind(charges: list[LedgerEntry]) -> dict[str, float]:
    by_kind: dict[str, float] = {}
    for e in charges:
        by_kind[e.kind] = by_kind.get(e.kind, 0.0) + e.flops
    return by_kind


def summary(ledger: Ledger) -> dict[str, Any]:
    """Everything the reports show, as plain data."""
    state = ledger.snapshot()
    return {
        "ledger": str(ledger.path), "budget": ledger.budget, "spent": state.spent(), "reserved": state.reserved(),
        "remaining": ledger.left(state), "spent_by_kind": _by_kind(state.charges),
        "charges": [{"name": g.name, "kind": g.kind, "tokens": g.tokens, "steps": g.steps, "seconds": g.seconds,
                     "flops": g.flops} for g in _grouped(state.charges)],
        "reservations": [{"id": r.id, "name": r.name, "kind": r.kind, "planned": r.planned, "charged": r.charged,
                          "unspent": r.unspent, "status": r.status, "detail": r.detail(ledger.path),
                          "processes": r.processes, "line": r.line} for r in state.in_order()],
        "problems": list(ledger.problems),
    }


def report_csv(ledger: Ledger) -> str:
    """One row per charge, then TOTAL (charged), RESERVED (held by open reservations), REMAINING, and
    a "DAMAGED LINE" row naming each line that could not be read (left out of every figure)."""
    state, budget = ledger.snapshot(), ledger.budget
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    c = state.charges
    for e in c:
        w.writerow(_row(budget, e.name, e.kind, e.tokens, e.steps, e.seconds, e.flops))
    w.writerow(_row(budget, "TOTAL", "", sum(e.tokens for e in c), sum(e.steps for e in c),
                    sum(e.seconds for e in c), state.spent()))
    w.writerow(_row(budget, "RESERVED", "", "", "", "", state.reserved()))
    w.writerow(_row(budget, "REMAINING", "", "", "", "", ledger.left(state)))
    for d in state.damage:
        w.writerow({"name": f"DAMAGED LINE {d.line}: {d.reason}"})
    return buf.getvalue()


def report_markdown(ledger: Ledger) -> str:
    """Charges per experiment and kind, totals by kind, reservations, what is left, and any damage."""
    state = ledger.snapshot()
    pct = 100 / ledger.budget
    lines = ["| experiment | kind | tokens | steps | seconds | FLOPs | % of budget |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for g in _grouped(state.charges):
        lines.append(f"| {g.name} | {g.kind} | {g.tokens} | {g.steps} | {g.seconds:.1f} | {g.flops:.4e} | "
                     f"{g.flops * pct:.4f}% |")
    for kind, f in sorted(_by_kind(state.charges).items()):
        lines.append(f"| **all {kind}** | | | | | {f:.4e} | {f * pct:.4f}% |")
    c, spent, held, left = state.charges, state.spent(), state.reserved(), ledger.left(state)
    lines.append(f"| **TOTAL** | | {sum(e.tokens for e in c)} | {sum(e.steps for e in c)} | "
                 f"{sum(e.seconds for e in c):.1f} | {spent:.4e} | {spent * pct:.4f}% |")
    if state.reservations:
        lines += ["", "| reservation | experiment | kind | planned | charged | still held | status |",
                  "| --- | --- | --- | ---: | ---: | ---: | --- |"]
        for r in state.in_order():
            lines.append(f"| {r.id} | {r.name} | {r.kind} | {r.planned:.4e} | {r.charged:.4e} | "
                         f"{r.unspent:.4e} | {r.detail(ledger.path)} |")
    lines.append(f"\nBudget {ledger.budget:.4e} FLOPs; spent {spent:.4e} ({spent * pct:.4f}%); held by open "
                 f"reservations {held:.4e} ({held * pct:.4f}%); remaining {left:.4e} ({left * pct:.4f}%).")
    if state.damage:
        lines.append(f"\n**{len(state.damage)} damaged line(s)**: budget checks refuse until they are repaired "
                     f"(python -m flops ledger --ledger {ledger.path} --repair); the figures above leave them out.")
        lines += [f"- {p}" for p in ledger.problems]
    return "\n".join(lines) + "\n"


__all__ = ["COLUMNS", "report_csv", "report_markdown", "summary"]

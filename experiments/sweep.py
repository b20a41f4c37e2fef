"""The study's hyper-parameter search, planned against the FLOP budget before anything runs.

    python experiments/sweep.py --out runs/sweep --grid-steps 200 --final-steps 2000

Stage 1: learning rate x LoRA rank (1e-5, 5e-5, 1e-4 x 2, 4, 8) at context 512.
Stage 2: context length (128, 512, 768) at stage 1's best (lr, rank), with equal tokens per run.
Stage 3: one longer run at the best setting.
Every run's FLOPs are planned first (from the model's structure; no weights loaded). If the whole
sweep does not fit in what is left of the budget, the steps of every run are scaled down to fit
(--trim, the default) or the sweep is refused (--no-trim). Runs live in --out/<stage>_<setting>/;
a finished run (summary.json present) is skipped and an interrupted one resumed, so the command can
simply be run again. The summary table is printed and written as sweep_summary.{json,csv,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flops
from experiments import train
from experiments.lib import files, planning, runs, training

LRS = (1e-5, 5e-5, 1e-4)
RANKS = (2, 4, 8)
CONTEXTS = (128, 512, 768)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/sweep", help="folder for every run of the sweep")
    p.add_argument("--grid-steps", type=int, default=200, help="optimizer steps per stage-1 run at context 512")
    p.add_argument("--final-steps", type=int, default=2000, help="optimizer steps of the final run")
    p.add_argument("--lrs", type=float, nargs="+", default=LRS)
    p.add_argument("--ranks", type=int, nargs="+", default=RANKS)
    p.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    p.add_argument("--trim", action=argparse.BooleanOptionalAction, default=True,
                   help="scale every run's steps down to fit the budget (default), or refuse")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    # Everything else (--model, --data, --batch-size, --budget, --ledger, --device, ...) goes to train.py.
    return p.parse_known_args(argv)


def run_argv(base: list[str], out: Path, name: str, lr: float, rank: int, context: int, steps: int) -> list[str]:
    folder = out / name
    argv = base + ["--out", str(folder), "--name", f"{out.name}/{name}", "--lr", str(lr), "--rank", str(rank),
                   "--context-length", str(context), "--max-steps", str(steps)]
    if (folder / "checkpoint" / "state.json").is_file():
        argv.append("--resume")
    return argv


def planned_flops(argv: list[str]) -> tuple[float, float]:
    """(cost that scales with the steps, fixed cost of the final evaluation) of one train.py run."""
    args = runs.train_parser().parse_args(argv)
    _, _, val = training.prepare_windows(args, None)
    plan, _ = planning.train_plan(args, len(val.input_ids))
    return plan.total - plan.full_eval, plan.full_eval


def settings(args: argparse.Namespace) -> tuple[list, list, list]:
    """The runs of each stage as (lr, rank, context, steps). Stages 2 and 3 depend on results, so they
    are planned at the most expensive choice they could make (largest rank; the final run at the
    largest context), which bounds what they will cost."""
    grid = [(lr, r, 512, args.grid_steps) for lr in args.lrs for r in args.ranks]
    tokens_per_run = args.grid_steps * 512
    contexts = [(args.lrs[0], max(args.ranks), c, max(1, tokens_per_run // c)) for c in args.contexts]
    final = [(args.lrs[0], max(args.ranks), max(args.contexts), args.final_steps)]
    return grid, contexts, final


def plan_total(argv: list[str]) -> float:
    """FLOPs the whole sweep would spend untrimmed, ignoring the ledger."""
    args, base = parse_args(argv)
    out = Path(args.out)
    return sum(sum(planned_flops(run_argv(base, out, "plan", lr, r, c, n)))
               for stage in settings(args) for lr, r, c, n in stage)


def main(argv: list[str] | None = None) -> list[dict]:
    args, base = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    targs = runs.train_parser().parse_args(base)
    ledger = flops.Ledger(targs.ledger, budget=targs.budget)

    def stage_runs(stage: str, settings: list[tuple[float, int, int, int]]) -> list[tuple[str, list[str]]]:
        return [(f"{stage}_lr{lr:g}_r{rank}_ctx{ctx}",
                 run_argv(base, out, f"{stage}_lr{lr:g}_r{rank}_ctx{ctx}", lr, rank, ctx, steps))
                for lr, rank, ctx, steps in settings]

    def run_stage(runs: list[tuple[str, list[str]]]) -> list[dict]:
        results = []
        for name, rargv in runs:
            done = out / name / "summary.json"
            if done.is_file():
                print(f"[sweep] {name}: done before, skipped")
                results.append(json.loads(done.read_text()))
                continue
            print(f"[sweep] {name}: python experiments/train.py {' '.join(rargv)}", flush=True)
            results.append(train.main(rargv))
        return results

    # ---- plan the whole sweep up front, then trim the steps (not the fixed final evaluations) to fit
    grid, ctx_runs, final = settings(args)
    tokens_per_run = args.grid_steps * 512
    costs = [planned_flops(run_argv(base, out, "plan", lr, r, c, n)) for lr, r, c, n in grid + ctx_runs + final]
    variable, fixed = sum(c[0] for c in costs), sum(c[1] for c in costs)
    # What earlier invocations of this sweep already spent is in the ledger under its run names.
    spent = ledger.spent(prefix=f"{out.name}/")
    need = variable + fixed - spent
    left = ledger.remaining()
    scale = 1.0
    print(f"[sweep] planned {len(costs)} runs: {need:.3e} FLOPs; {left:.3e} left of the budget")
    if need > left:
        scale = (left - fixed + spent) / variable * 0.99
        if not args.trim or scale <= 0:
            raise SystemExit(f"the sweep needs {need:.3e} FLOPs but only {left:.3e} are left of "
                             f"{ledger.budget:.3e}: lower --grid-steps/--final-steps"
                             + (" or pass --trim" if scale > 0 else ""))
        print(f"[sweep] trimming every run's steps to {scale:.1%} to fit the budget")
    if args.dry_run:
        return []

    def steps(n: int) -> int:
        return max(1, int(n * scale))

    results = run_stage(stage_runs("grid", [(lr, r, c, steps(s)) for lr, r, c, s in grid]))
    best = min(results, key=lambda r: r["val_loss"])
    lr, rank = best["lr"], best["rank"]
    print(f"[sweep] best of the grid: lr {lr:g}, rank {rank} (val loss {best['val_loss']:.4f})")
    results += run_stage(stage_runs("context", [(lr, rank, c, steps(max(1, tokens_per_run // c)))
                                                for c in args.contexts]))
    ctx_best = min(results[len(grid):], key=lambda r: r["val_loss"])["context_length"]
    results += run_stage(stage_runs("final", [(lr, rank, ctx_best, steps(args.final_steps))]))

    # ---- summary
    fields = ["name", "lr", "rank", "context_length", "steps", "best_step", "val_loss", "flops"]
    rows = [{k: r.get(k) for k in fields} for r in results]
    with open(out / "sweep_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    files.write_json(out / "sweep_summary.json", rows)
    md = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    md += ["| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in fields) + " |"
           for r in rows]
    (out / "sweep_summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return results


if __name__ == "__main__":
    training.run_as_script(main)  # a run interrupted by a signal closes its reservation, then the sweep dies of it

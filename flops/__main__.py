"""python -m flops --model <repo-or-folder> --context-length 512 --batch-size 4 --rank 4 --mode train [--json]
python -m flops ledger [--ledger FILE] [--budget FLOPS] [--settle] [--repair [--yes]] [--json]

The flags are the training scripts' (``--batch-size``, ``--rank``, ``--targets``, ``--context-length``);
the older ``--batch``, ``--lora-rank``, ``--lora-targets a,b`` and ``--seq-len`` still work.

Counting needs only the shapes, so only ``config.json`` is read (from a local folder, a path to the
file itself, or a Hub repo id — just that one file is fetched or found in the cache) and the model
is built on the meta device: no weights are loaded and no memory is used.

``ledger`` shows the FLOP ledger (charges per experiment and kind, reservations, what is left) and
settles or repairs it; ``python -m flops ledger --help`` says how.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys

import torch

from flops.counter import MODES, count, format_report
from flops.ledger import DEFAULT_BUDGET, DEFAULT_LEDGER, Ledger, LedgerError
from flops.ledger_report import report_markdown, summary
from qwen_min import CheckpointError, ConfigError, Qwen2, QwenConfig, load_config


def build(config: QwenConfig, *, lora_rank: int = 0, targets: tuple[str, ...] = ("q_proj", "v_proj"),
          train_lm_head_bias: bool = False) -> Qwen2:
    """The model's structure on the meta device, LoRA-wrapped (base frozen) when lora_rank > 0."""
    with torch.device("meta"):
        model = Qwen2(config)
        if lora_rank > 0 or train_lm_head_bias:
            from lora import apply_lora

            apply_lora(model, rank=max(lora_rank, 1), targets=targets, train_lm_head_bias=train_lm_head_bias)
    return model


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The description as written, and every option's default."""


class UsageError(Exception):
    """A bad command line (exit 2, as argparse gives)."""


class Parser(argparse.ArgumentParser):
    """argparse, a bad command line raised as UsageError: one line from ``run``, not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (--help lists the options)")


USAGE = """python -m flops --model MODEL --context-length N [--batch-size B] [--rank R] [--mode MODE] [options]
       python -m flops ledger [--ledger FILE] [--settle] [--repair [--yes]] [--json] [options]"""


def count_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m flops", usage=USAGE, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="Hub repo id, checkpoint folder, or config.json path")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    p.add_argument("--context-length", "--seq-len", dest="context_length", type=int, required=True, metavar="N",
                   help="new tokens per row in this call (decode: 1, with --past-len)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="rows (sequences) per call")
    p.add_argument("--batch", dest="batch_size", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--past-len", type=int, default=0, help="cached positions (decode)")
    p.add_argument("--mode", choices=MODES, default="forward", help="what the call does")
    p.add_argument("--rank", "--lora-rank", dest="rank", type=int, default=0, metavar="R",
                   help="LoRA rank (0: no LoRA)")
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="linear layers LoRA wraps")
    p.add_argument("--lora-targets", dest="targets", type=lambda s: s.split(","), default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # (the older comma-separated form)
    p.add_argument("--train-lm-head-bias", action="store_true", help="also train a bias on the output layer")
    p.add_argument("--no-loss", action="store_true", help="forward/train without the cross-entropy")
    p.add_argument("--scored-tokens", type=int, default=None, help="tokens the loss scores (none given: all)")
    p.add_argument("--vocab", type=int, default=None, help="output rows computed (constrained decoding)")
    p.add_argument("--sampling", action="store_true", help="prefill/decode: sample instead of argmax")
    p.add_argument("--terms", action="store_true", help="with --json: every priced term")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    return p


def main(argv: list[str] | None = None) -> dict | int:
    """The FLOP count (a dict), or with ``ledger`` first the ledger command's exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ledger"]:
        return ledger_main(argv[1:])
    args = count_parser().parse_args(argv)
    config = load_config(args.model, revision=args.revision)
    model = build(config, lora_rank=args.rank, targets=tuple(args.targets), train_lm_head_bias=args.train_lm_head_bias)
    report = count(model, batch=args.batch_size, seq_len=args.context_length, mode=args.mode, past_len=args.past_len,
                   include_loss=False if args.no_loss else None, scored_tokens=args.scored_tokens,
                   vocab=args.vocab, sampling=args.sampling)
    d = report.to_dict(terms=args.terms)
    if args.json:
        json.dump(d, sys.stdout, indent=1)
        print()
    else:
        print(format_report(report))
    return d


LEDGER_HELP = """Show the FLOP ledger: charges grouped by experiment and kind, reservations (open, closed, or
settled after their process died) and what is left of the budget. Exits 1 while the ledger has damaged
lines (budget checks refuse until they are repaired), else 0.

--settle closes the open reservations whose processes are known to be dead, keeping what they charged
(a run's next reserve does the same). A reservation whose process ran on another machine,
container or boot cannot be judged from here; once you know it has ended, --settle-id ID settles it.
--repair moves damaged lines to <ledger>.damaged and keeps every other line byte for byte; it shows
them and asks first (--yes: do not ask)."""


def ledger_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m flops ledger", description=LEDGER_HELP, formatter_class=HelpFormatter)
    p.add_argument("--ledger", default=DEFAULT_LEDGER, help="ledger file")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="total FLOP budget")
    p.add_argument("--settle", action="store_true", help="settle the reservations of dead processes")
    p.add_argument("--settle-id", action="append", default=[], metavar="ID",
                   help="settle this reservation by hand (its process ran where it cannot be checked, and ended)")
    p.add_argument("--repair", action="store_true", help="move damaged lines to <ledger>.damaged")
    p.add_argument("--yes", action="store_true", help="with --repair: do not ask")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    return p


def ledger_main(argv: list[str]) -> int:
    args = ledger_parser().parse_args(argv)
    ledger = Ledger(args.ledger, budget=args.budget)
    status = 0
    say = functools.partial(print, file=sys.stderr)  # stdout holds only the report (JSON with --json)

    if args.repair:
        damaged = ledger.snapshot().damage
        if not damaged:
            say(f"{ledger.path}: no damaged lines")
        else:
            say(f"{ledger.path}: {len(damaged)} damaged line(s):")
            for d in damaged:
                say(f"  line {d.line}: {d.reason}\n    {d.raw[:200]!r}{' ...' if len(d.raw) > 200 else ''}")
            answer = "y" if args.yes else (input("move them to the side file? [y/N] ") if sys.stdin.isatty() else "")
            if answer.strip().lower() in ("y", "yes"):
                try:
                    moved = ledger.repair()
                except OSError as e:   # (the disk full, say: the ledger itself is replaced only by the last step)
                    side, tmp = f"{ledger.path}.damaged", f"{ledger.path}.repair-tmp"
                    raise LedgerError(f"--repair: writing {e.filename or side + ' or ' + tmp}: {e.strerror or e}; "
                                      f"{ledger.path} is unchanged ({tmp} may hold part of a copy: remove it; "
                                      f"{side} may hold the damaged lines twice after a second repair): free "
                                      f"space, then repair again") from e
                say(f"moved line(s) {', '.join(str(d.line) for d in moved)} to {ledger.path}.damaged")
            else:
                say("not repaired (pass --yes to repair without asking)")
                status = 1
    if args.settle:
        for r in ledger.settle():
            say(f"settled {r.id} ({r.name!r}): {r.charged:.4e} of {r.planned:.4e} FLOPs charged, the rest freed; "
                f"{r.reason}")
    for rid in args.settle_id:
        try:
            r = ledger.settle_by_hand(rid)
            say(f"settled {r.id} ({r.name!r}) by hand: {r.charged:.4e} of {r.planned:.4e} FLOPs charged")
        except (KeyError, ValueError) as e:
            say(f"not settled: {e.args[0]}")
            status = 1

    report = summary(ledger)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print(report_markdown(ledger), end="")
    return 1 if report["problems"] else status


def run(argv: list[str] | None = None) -> int:
    """``main`` as the command: its exit status; a ledger, config or checkpoint error (or a bad command
    line: 2) is one line on stderr, ``python -m flops: error: <message>`` (``--debug``: the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        result = main([a for a in argv if a != "--debug"])
    except (UsageError, LedgerError, CheckpointError, ConfigError) as e:
        if debug:
            raise
        print(f"python -m flops: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, UsageError) else 1
    except BrokenPipeError:   # (`| head` closed stdout: stop quietly, as a C tool killed by SIGPIPE would)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # (no second error at exit's flush)
        return 128 + signal.SIGPIPE
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(run())

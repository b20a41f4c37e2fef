"""Train LoRA adapters on Qwen2.5 to continue LLMTIME-encoded predator-prey series — the main job.

    python experiments/train.py                                    # defaults: Qwen2.5-0.5B-Instruct, generated data
    python experiments/train.py --model ./tiny-qwen --max-steps 50 --out runs/smoke
    torchrun --nproc-per-node 2 experiments/train.py ...           # data parallel (gloo on CPU, nccl on GPU)

A plain loop, top to bottom: plan the FLOPs and reserve them in the ledger (before any model work;
a resumed run reserves what is left), load, wrap q/v in LoRA, then step: forward, chunked
cross-entropy, backward, AdamW (warm-up, then a cosine decay to the last step), and the step's FLOPs
charged. At step 0 and every --eval-every steps an evaluation scores the fixed validation subset's
cross-entropy and forecasts --val-forecast-systems validation systems greedily, as forecast.py
does; the adapter kept is the one whose forecasts have the lowest filled-in MAE (the untrained
model, step 0, is a candidate), and every evaluation logs its paired difference to the untrained
model per horizon block. Every --checkpoint-every steps the adapter, optimizer, RNG states and data
position are written atomically. At the end the kept adapter is restored, scored on the whole
validation split and saved in PEFT's layout, with what decodes its forecasts again. The reservation
is closed on any exit (SIGINT and SIGTERM included), releasing what was not spent. A loss that is
not finite stops the run, keeping the last good checkpoint and the best adapter so far.

The defaults are a recipe that leaves the early dip (forecasts first get worse as the model
unlearns copying the prompt's cycle, then better): rank 4 on q/v, lr 1e-3 with 20 warm-up steps and
a cosine decay to 1e-4, 4 windows of 256 tokens a step, 600 steps.

Files in --out: train_args.json, splits.json, encoding.json, metrics.jsonl, metrics.csv, adapter/
(best adapter, with encoding.json, splits.json, data.json), checkpoint/ (for --resume), summary.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

import flops
import lora
import qwen_min
from experiments.lib import (
    checkpoint,
    cli,
    data,
    errors,
    files,
    metrics_log,
    parallel,
    planning,
    runs,
    training,
    validation,
)
from experiments.lib.booking import Booking, Interrupted
from experiments.lib.train_step import train_step
from experiments.lib.training import RunState
from experiments.lib.windows import prepare_windows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return runs.train_parser(__doc__).parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not args.rank and not args.train_lm_head_bias:
        raise errors.UsageError("nothing to train: --rank 0 without --train-lm-head-bias")
    if args.select_by != "loss" and not args.val_forecast_systems:
        raise errors.UsageError(f"--select-by {args.select_by} needs --val-forecast-systems > 0 (or --select-by loss)")
    dp = parallel.start_distributed(args.device, args.batch_size)  # torchrun: one process per rank
    out = runs.start_run(args, "train") if dp.main else Path(args.out)
    dp.barrier()
    runs.seed_everything(args.seed)

    # ---- data, and the FLOPs still to spend reserved in the ledger, before any model work
    tokenizer = qwen_min.load_tokenizer(args.model, revision=args.revision)
    run_data, train, val = prepare_windows(args, out if dp.main else None, tokenizer)
    forecasts = validation.forecast_set_of(args, run_data, tokenizer)
    at = checkpoint.read_state(out / "checkpoint").step if args.resume else 0
    plan, shape = planning.train_plan(args, train, val, dp.world, from_step=at,
                                      forecast_calls=forecasts and forecasts.calls)
    reservation = reserve(args, plan, at, dp.world) if dp.main else None
    with Booking(reservation, every=args.charge_every,
                 step_tokens=args.batch_size * args.context_length) as booking:
        try:
            return run(args, dp, out, run_data, train, val, forecasts, plan, shape, booking)
        except Interrupted as e:   # (the booking closes first; cli.run_as_script prints the note)
            e.note = interrupted_note(e, out, argv)
            raise


def run(args: argparse.Namespace, dp: parallel.Distributed, out: Path, run_data: runs.RunData, train: data.Windows,
        val: data.Windows, forecasts: validation.ForecastSet | None, plan: planning.TrainPlan, shape: qwen_min.Qwen2,
        booking: Booking) -> dict:
    """The run itself, once its FLOPs are reserved: load, train, evaluate, save."""
    # ---- model: the frozen base, LoRA on --targets, AdamW on what is trainable
    device, t_start = dp.device, time.time()
    model, tokenizer = runs.load_model(args, device)
    lora.apply_lora(model, rank=args.rank, alpha=args.lora_alpha, targets=tuple(args.targets),
                    dropout=args.lora_dropout, train_lm_head_bias=args.train_lm_head_bias)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    state, best, untrained = RunState(), {}, None  # best: the adapter of the best evaluation so far; empty: none yet
    if args.resume:
        state, best = checkpoint.load(out / "checkpoint", model, opt)
        untrained = checkpoint.load_untrained(out / "checkpoint")
    wandb_run = metrics_log.start_wandb(args) if args.wandb and dp.main else None
    log = metrics_log.MetricsLog(out, resume_step=state.step if args.resume else None, write=dp.main,
                                 wandb_run=wandb_run)
    costs = planning.ScoredCosts(shape, args.batch_size, args.context_length)
    accounts = StepAccounts(booking, costs, state, world=dp.world)
    evaluate = validation.Validator(val.head(args.eval_windows), forecasts, select_by=args.select_by,
                                    batch_size=args.batch_size, costs=costs, booking=booking, log=log,
                                    tokenizer=tokenizer, device=device, world=dp.world, best=best,
                                    untrained=untrained)

    # ---- the loop: batch, forward, loss, backward, step, log, evaluate, checkpoint. The ledger's
    # side of it is ``accounts`` alone (drop those lines, and the loop runs without a ledger).
    model.train()
    # Compiled, the elementwise chains (norms, rotary, SwiGLU, LoRA) fuse into fewer passes; the
    # matmuls are the same. Validation stays eager (no_grad would be a second compilation).
    hidden = torch.compile(model.hidden) if args.compile else model.hidden
    n_train, local = len(train.input_ids), args.batch_size // dp.world
    bar = tqdm(total=args.max_steps, initial=state.step, disable=not dp.main, desc="train", unit="step")
    t_step, stopped_early, lr_of = time.time(), False, training.schedule_of(args)
    try:
        if args.eval_every and args.eval_at_start and state.step == 0:  # the untrained model: a candidate
            evaluate(model, state, lr_of(0))
        while state.step < args.max_steps:
            batch = training.next_batch(state, n_train, args.batch_size, args.seed)   # the same after a resume
            rows = batch[dp.rank * local:(dp.rank + 1) * local]  # this rank's share
            ids, labels = train.input_ids[rows].to(device), train.labels[rows].to(device)
            # Each rank's loss is its share of the *global* mean: its sum / every rank's scored tokens.
            n_scored = int((train.labels[batch] != -100).sum())
            lr = lr_of(state.step)
            for g in opt.param_groups:
                g["lr"] = lr
            accounts.before_step(n_scored)
            loss_sum = train_step(hidden, model.lm_head, ids, labels, n_scored=n_scored)  # forward, loss, backward
            if dp.world > 1:
                loss_sum = parallel.sum_over_ranks(params, loss_sum)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss, now = loss_sum.item() / n_scored, time.time()
            tok_s, t_step = args.batch_size * args.context_length / max(now - t_step, 1e-9), now
            with accounts.step_done(n_scored):   # charged; a signal waits for the step and its metrics row too
                state.advance(args.batch_size, args.context_length)
                log(state, "train", loss, lr, tokens_per_s=tok_s, scored_tokens=n_scored)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}", flops=f"{state.flops:.2e}")
            bar.update()
            training.check_finite(loss, "training", state.step)

            if args.eval_every and state.step % args.eval_every == 0:
                evaluate(model, state, lr)  # charged and logged; keeps the best adapter so far
                stopped_early = state.out_of_patience(args.patience)
            if dp.main and (state.step % args.checkpoint_every == 0 or stopped_early
                            or state.step == args.max_steps):
                with accounts.settled():   # every FLOP charged before a checkpoint holds it
                    checkpoint.save(out / "checkpoint", model, opt, state, evaluate.best, evaluate.untrained)
            if stopped_early:
                break
    except Interrupted as e:
        e.step = state.step   # (for the note that says how to continue)
        bar.close()           # (ends the progress bar's line, so the note has its own)
        raise
    except training.Diverged as e:
        raise training.Diverged(keep_best(e, model, evaluate.best, state, out, run_data, args, dp)) from None
    bar.close()

    # ---- the best adapter (the final one if no evaluation ran), scored on the whole validation
    # split (charged batch by batch), saved in PEFT's layout
    training.load_trainable(model, evaluate.best)
    model.eval()
    val_loss, val_tokens = training.windows_loss(model, val.input_ids, val.labels, args.batch_size, device,
                                                 what="the validation split",
                                                 after_batch=accounts.final_batch(len(val.input_ids)))
    training.check_finite(val_loss, "validation", state.step)
    summary = {"name": args.name, "data": run_data.data_path, "rank": args.rank, "lr": args.lr,
               "context_length": args.context_length, "steps": state.step, "best_step": state.best_step,
               "select_by": args.select_by, "best_val": state.best_scores, "val_loss": val_loss,
               "val_tokens": val_tokens,
               "stopped_early": stopped_early, "trainable_parameters": lora.trainable_parameters(model),
               "step_flops_planned": plan.step, "flops": state.flops,
               "wall_s": time.time() - t_start}   # this invocation: load, loop, evaluations, final validation
    if dp.main:
        save_adapter(model, out, run_data, args)
        log(state, "val_full", val_loss, lr_of(max(0, state.step - 1)),
            scored_tokens=val_tokens)
        files.write_json(out / "summary.json", summary)
        print(json.dumps(summary, indent=1))
    if wandb_run:
        wandb_run.finish()
    dp.close()
    return summary


class StepAccounts:
    """The ledger's side of train.py's loop, so the loop itself is the model, LoRA and the loss.

    ``before_step``: a step the reservation cannot pay for is refused before it runs (a reservation
    is a ceiling). ``step_done``: the block where a finished step is charged and counted in
    ``state.flops`` before the loop advances the state and writes its metrics row; SIGINT and
    SIGTERM wait for the whole block, so the ledger and metrics.jsonl agree, and a SIGKILL can lose
    a row but never a charge. ``settled``: a checkpoint's block, every pending step charged first.
    ``final_batch``: the charge of each batch of the final evaluation, which every rank runs.
    """

    def __init__(self, booking: Booking, costs: planning.ScoredCosts, state: RunState, *, world: int) -> None:
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

    def final_batch(self, of: int) -> Callable[[int, int], None]:
        def charge(rows: int, scored: int) -> None:
            cost = self.world * self.costs.evaluation(rows, scored)
            self.state.flops += cost
            self.booking.charge(cost, kind="eval", tokens=rows * self.costs.context_length,
                                config={"split": "val", "step": self.state.step, "windows": rows, "of": of})
        return charge


def reserve(args: argparse.Namespace, plan: planning.TrainPlan, at: int, world: int) -> flops.Reservation:
    """Hold the FLOPs of what is left of the run (all of it, or from the resumed step ``at``), or refuse it."""
    reservation = runs.reserve(args, plan.total, kind="train", config={
        "rank": args.rank, "lr": args.lr, "context_length": args.context_length, "batch_size": args.batch_size,
        "from_step": at, "max_steps": args.max_steps, "world_size": world})
    print(f"plan: {plan.steps} steps x {plan.step:.3e} FLOPs (on average) + {plan.evals} evaluations x "
          f"{plan.eval:.3e} + the final one = {plan.total:.3e} FLOPs ({plan.total / args.budget:.2%} of the budget), "
          f"reserved", flush=True)
    return reservation


def save_adapter(model: qwen_min.Qwen2, out: Path, run_data: runs.RunData, args: argparse.Namespace) -> None:
    lora.save_adapter(model, out / "adapter", base_model_name_or_path=args.model)
    runs.save_adapter_files(out / "adapter", run_data)


def interrupted_note(e: Interrupted, out: Path, argv: list[str]) -> str:
    """One line after SIGINT/SIGTERM: the step reached and the command line that continues the run."""
    try:
        saved = checkpoint.read_state(out / "checkpoint").step
    except errors.ExperimentError:
        saved = None
    where = (f"the last checkpoint is step {saved}" if saved is not None else
             "no checkpoint was written yet, so the run starts again from step 0")
    again = argv if "--resume" in argv else [*argv, "--resume"]
    if saved is None:
        again = [a for a in again if a != "--resume"] + ["--overwrite"]
    at = f" at step {e.step}" if e.step is not None else " before the first step"
    return (f"{e}{at}: {where}; continue with: "
            f"python experiments/train.py {shlex.join(again)}")


def keep_best(e: training.Diverged, model: qwen_min.Qwen2, best: dict, state: RunState, out: Path,
              run_data: runs.RunData, args: argparse.Namespace, dp: parallel.Distributed) -> str:
    """After a loss that is not finite: the last checkpoint stays as it was (nothing was saved since);
    the best adapter so far is saved, if an evaluation found one. Returns the message to stop with."""
    msg = f"{e}: the run stops; {out / 'checkpoint'} keeps the last good checkpoint"
    if best and dp.main:
        training.load_trainable(model, best)
        save_adapter(model, out, run_data, args)
        msg += f"; {out / 'adapter'} holds the best adapter so far (step {state.best_step})"
    return msg + ("" if best else "; no evaluation had scored an adapter yet, so none is saved")


if __name__ == "__main__":
    sys.exit(cli.run_as_script(main))

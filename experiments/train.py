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

import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from tqdm import tqdm

import flops
import lora
import qwen_min
from experiments.lib import errors, files
from experiments.lib.budget import booking, planning
from experiments.lib.budget.accounts import RunAccounts
from experiments.lib.budget.booking import Booking
from experiments.lib.errors import Interrupted
from experiments.lib.run import checkpoint, cli, devices, folder, metrics_log, parallel, rundata
from experiments.lib.run.config import SELECT_BY, TrainConfig
from experiments.lib.run.metrics_log import MetricsLog
from experiments.lib.run.models import load_model
from experiments.lib.run.windows import forecast_set_of, prepare_windows
from experiments.lib.science import data
from experiments.lib.training import evaluation, schedule
from experiments.lib.training.evaluation import ForecastSet
from experiments.lib.training.state import RunState, check_finite, load_trainable, trainable_copy
from experiments.lib.training.step import train_step


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return cli.parse(TrainConfig, argv, __doc__)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    dp = parallel.start_distributed(cfg.device, cfg.batch_size)  # torchrun: one process per rank
    out = folder.start_run(cfg, "train") if dp.main else Path(cfg.out)
    dp.barrier()
    folder.seed_everything(cfg.seed)

    # ---- data, and the FLOPs still to spend reserved in the ledger, before any model work
    tokenizer = qwen_min.load_tokenizer(cfg.model, revision=cfg.revision)
    run_data, train, val = prepare_windows(cfg, out if dp.main else None, tokenizer)
    forecasts = forecast_set_of(cfg, run_data, tokenizer)
    at = checkpoint.read_state(checkpoint.folder(out)).step if cfg.resume else 0
    plan, shape = planning.train_plan(cfg, train, val, dp.world, from_step=at,
                                      forecast_calls=forecasts and forecasts.calls)
    reservation = reserve(cfg, plan, at, dp.world) if dp.main else None
    prepared = Prepared(run_data, train, val, forecasts, plan, shape)
    with Booking(reservation, every=cfg.charge_every,
                 step_tokens=cfg.batch_size * cfg.context_length) as booking:
        try:
            return run(cfg, dp, out, prepared, booking)
        except Interrupted as e:   # (the booking closes first; cli.run_as_script prints the note)
            e.note = interrupted_note(e, out, argv)
            raise


@dataclass
class Prepared:
    """What main() readies before any model work: the run's data, its training and validation
    windows, the validation forecasts, and the plan with the LoRA-wrapped structure it was priced on."""

    run_data: rundata.RunData
    train: data.Windows
    val: data.Windows
    forecasts: ForecastSet | None
    plan: planning.TrainPlan
    shape: qwen_min.Qwen2


def run(cfg: TrainConfig, dp: parallel.Distributed, out: Path, prepared: Prepared, booking: Booking) -> dict:
    """The run itself, once its FLOPs are reserved: load, train, evaluate, save."""
    run_data, train, val = prepared.run_data, prepared.train, prepared.val
    # ---- model: the frozen base, LoRA on --targets, AdamW on what is trainable
    device, t_start = dp.device, time.time()
    model, _ = load_model(cfg, device)
    lora.apply_lora(model, rank=cfg.rank, alpha=cfg.lora_alpha, targets=cfg.targets,
                    dropout=cfg.lora_dropout, train_lm_head_bias=cfg.train_lm_head_bias)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state, best, untrained = RunState(), {}, None  # best: the adapter of the best evaluation so far; empty: none yet
    if cfg.resume:
        state, best = checkpoint.load(checkpoint.folder(out), model, opt)
        untrained = checkpoint.load_untrained(checkpoint.folder(out))
    wandb_run = metrics_log.start_wandb(cfg) if cfg.wandb and dp.main else None
    log = metrics_log.MetricsLog(out, resume_step=state.step if cfg.resume else None, write=dp.main,
                                 wandb_run=wandb_run)
    costs = planning.ScoredCosts(prepared.shape, cfg.batch_size, cfg.context_length)
    accounts = RunAccounts(booking, costs, state, world=dp.world)
    evaluate = Validator(val.head(cfg.eval_windows), prepared.forecasts, select_by=cfg.select_by,
                                    accounts=accounts, log=log, best=best, untrained=untrained)

    # ---- the loop: batch, forward, loss, backward, step, log, evaluate, checkpoint. The ledger's
    # side of it is ``accounts`` alone (drop those lines, and the loop runs without a ledger).
    model.train()
    # Compiled, the elementwise chains (norms, rotary, SwiGLU, LoRA) fuse into fewer passes; the
    # matmuls are the same. Validation stays eager (no_grad would be a second compilation).
    hidden = torch.compile(model.hidden) if cfg.compile else model.hidden
    n_train, local = len(train.input_ids), cfg.batch_size // dp.world
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not dp.main, desc="train", unit="step")
    t_step, stopped_early, lr_of = time.time(), False, schedule.schedule_of(cfg)
    try:
        if cfg.eval_every and cfg.eval_at_start and state.step == 0:  # the untrained model: a candidate
            evaluate(model, state, lr_of(0))
        while state.step < cfg.max_steps:
            batch = schedule.next_batch(state, n_train, cfg.batch_size, cfg.seed)   # the same after a resume
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
            tok_s, t_step = cfg.batch_size * cfg.context_length / max(now - t_step, 1e-9), now
            with accounts.step_done(n_scored):   # charged; a signal waits for the step and its metrics row too
                state.advance(cfg.batch_size, cfg.context_length)
                log(state, "train", loss, lr, tokens_per_s=tok_s, scored_tokens=n_scored)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}", flops=f"{state.flops:.2e}")
            bar.update()
            check_finite(loss, "training", state.step)

            if cfg.eval_every and state.step % cfg.eval_every == 0:
                evaluate(model, state, lr)  # charged and logged; keeps the best adapter so far
                stopped_early = state.out_of_patience(cfg.patience)
            if dp.main and (state.step % cfg.checkpoint_every == 0 or stopped_early
                            or state.step == cfg.max_steps):
                with accounts.settled():   # every FLOP charged before a checkpoint holds it
                    checkpoint.save(checkpoint.folder(out), model, opt, state, evaluate.best, evaluate.untrained)
            if stopped_early:
                break
    except Interrupted as e:
        e.step = state.step   # (for the note that says how to continue)
        bar.close()           # (ends the progress bar's line, so the note has its own)
        raise
    except errors.Diverged as e:
        raise errors.Diverged(keep_best(e, model, evaluate.best, state, out, run_data, cfg, dp)) from None
    bar.close()

    # ---- the best adapter (the final one if no evaluation ran), scored on the whole validation
    # split (charged batch by batch), saved in PEFT's layout
    load_trainable(model, evaluate.best)
    model.eval()
    val_loss, val_tokens = evaluation.windows_loss(model, val.input_ids, val.labels, cfg.batch_size, device,
                                                 what="the validation split",
                                                 after_batch=accounts.final_batch(len(val.input_ids)))
    check_finite(val_loss, "validation", state.step)
    summary = {"name": cfg.run_name, "data": run_data.data_path, "dtype": devices.dtype_of(model), "rank": cfg.rank,
               "lr": cfg.lr,
               "context_length": cfg.context_length, "steps": state.step, "best_step": state.best_step,
               "select_by": cfg.select_by, "best_val": state.best_scores, "val_loss": val_loss,
               "val_tokens": val_tokens,
               "stopped_early": stopped_early, "trainable_parameters": lora.trainable_parameters(model),
               "step_flops_planned": prepared.plan.step, "flops": state.flops,
               "wall_s": time.time() - t_start}   # this invocation: load, loop, evaluations, final validation
    if dp.main:
        save_adapter(model, out, run_data, cfg)
        log(state, "val_full", val_loss, lr_of(max(0, state.step - 1)),
            scored_tokens=val_tokens)
        files.write_json(out / "summary.json", summary)
        print(json.dumps(summary, indent=1))
    if wandb_run:
        wandb_run.finish()
    dp.close()
    return summary


class Validator:
    """One evaluation of train.py: the cross-entropy of the fixed validation subset and (with a
    ForecastSet) the greedy forecasts of the validation systems, each charged (``accounts``, kind
    ``eval``) as it ends and logged; then early stopping's bookkeeping by the ``select_by`` score,
    keeping a copy of the best adapter in ``best``. The forecasts at step 0 (the untrained model)
    are kept in ``untrained``; every evaluation after them logs ``vs_untrained``. A resumed run
    passes its checkpoint's ``best`` and ``untrained``."""

    def __init__(self, windows: data.Windows, forecasts: ForecastSet | None, *, select_by: str,
                 accounts: RunAccounts, log: MetricsLog, best: dict[str, torch.Tensor] | None = None,
                 untrained: np.ndarray | None = None) -> None:
        if select_by not in SELECT_BY:
            raise ValueError(f"select by {select_by!r}: one of {SELECT_BY}")
        if select_by != "loss" and forecasts is None:
            raise errors.UsageError(f"--select-by {select_by} needs --val-forecast-systems > 0")
        self.windows, self.forecasts, self.select_by, self.accounts, self.log = windows, forecasts, select_by, \
            accounts, log
        self.best = best or {}  # the best adapter so far (a resumed run's from its checkpoint); empty: none yet
        self.untrained = untrained  # the step-0 forecasts (a resumed run's from its checkpoint); None: not yet

    def __call__(self, model: qwen_min.Qwen2, state: RunState, lr: float) -> None:
        ids, labels, costs, accounts = self.windows.input_ids, self.windows.labels, self.accounts.costs, self.accounts
        device = model.lm_head.weight.device
        cost = costs.evaluation(len(ids), int((labels != -100).sum()))
        if self.forecasts is not None:   # (generation priced at its token limit: at least what it spends)
            cost += planning.calls_flops(costs.shape, self.forecasts.calls)
        accounts.before_eval(cost)
        model.eval()
        loss, scored = evaluation.windows_loss(model, ids, labels, costs.batch_size, device,
                                             what="the validation subset")
        with accounts.held():  # the evaluation's charge and its metrics row: a signal waits for both
            accounts.eval_done(costs.evaluation(len(ids), scored), len(ids) * ids.shape[1],
                               {"split": "val", "step": state.step, "windows": len(ids)})
            self.log(state, "val", loss, lr, scored_tokens=scored)
        check_finite(loss, "validation-subset", state.step)
        figures: dict = {"val_loss": loss}
        if self.forecasts is not None:
            figures |= evaluation.score_forecasts(
                model, self.forecasts, device, on_call=lambda call, f: accounts.eval_done(
                    f, call["batch"] * call["steps"], {"split": "val", "step": state.step, "forecast": call}))
            values = figures.pop("forecasts")
            if state.step == 0:   # every LoRA B is still zero: these are the untrained model's forecasts
                self.untrained = values
            if self.untrained is not None:
                figures["vs_untrained"] = evaluation.vs_untrained(values, self.untrained, self.forecasts)
            with accounts.held():
                self.log(state, "val_forecast", None, lr, **{k: v for k, v in figures.items() if k != "val_loss"})
        model.train()
        if state.record_val(evaluation.selection_score(figures, self.select_by), figures):
            self.best = trainable_copy(model)


def reserve(cfg: TrainConfig, plan: planning.TrainPlan, at: int, world: int) -> flops.Reservation:
    """Hold the FLOPs of what is left of the run (all of it, or from the resumed step ``at``), or refuse it."""
    reservation = booking.reserve(cfg, plan.total, kind="train", config={
        "rank": cfg.rank, "lr": cfg.lr, "context_length": cfg.context_length, "batch_size": cfg.batch_size,
        "from_step": at, "max_steps": cfg.max_steps, "world_size": world})
    print(f"plan: {plan.steps} steps x {plan.step:.3e} FLOPs (on average) + {plan.evals} evaluations x "
          f"{plan.eval:.3e} + the final one = {plan.total:.3e} FLOPs ({plan.total / cfg.budget:.2%} of the budget), "
          f"reserved", flush=True)
    return reservation


def save_adapter(model: qwen_min.Qwen2, out: Path, run_data: rundata.RunData, cfg: TrainConfig) -> None:
    lora.save_adapter(model, out / "adapter", base_model_name_or_path=cfg.model)
    rundata.save_adapter_files(out / "adapter", run_data)


def interrupted_note(e: Interrupted, out: Path, argv: list[str]) -> str:
    """One line after SIGINT/SIGTERM: the step reached and the command line that continues the run."""
    try:
        saved = checkpoint.read_state(checkpoint.folder(out)).step
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


def keep_best(e: errors.Diverged, model: qwen_min.Qwen2, best: dict, state: RunState, out: Path,
              run_data: rundata.RunData, cfg: TrainConfig, dp: parallel.Distributed) -> str:
    """After a loss that is not finite: the last checkpoint stays as it was (nothing was saved since);
    the best adapter so far is saved, if an evaluation found one. Returns the message to stop with."""
    msg = f"{e}: the run stops; {checkpoint.folder(out)} keeps the last good checkpoint"
    if best and dp.main:
        load_trainable(model, best)
        save_adapter(model, out, run_data, cfg)
        msg += f"; {out / 'adapter'} holds the best adapter so far (step {state.best_step})"
    return msg + ("" if best else "; no evaluation had scored an adapter yet, so none is saved")


if __name__ == "__main__":
    sys.exit(cli.run_as_script(main))

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

import torch
from tqdm import tqdm

import flops
import lora
import qwen_min
from experiments.lib import (
    checkpoint,
    cli,
    config,
    data,
    devices,
    errors,
    files,
    metrics_log,
    parallel,
    planning,
    runs,
    training,
    validation,
)
from experiments.lib.accounts import RunAccounts
from experiments.lib.booking import Booking, Interrupted
from experiments.lib.config import TrainConfig
from experiments.lib.train_step import train_step
from experiments.lib.training import RunState
from experiments.lib.windows import prepare_windows


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return config.parse(TrainConfig, argv, __doc__)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    dp = parallel.start_distributed(cfg.device, cfg.batch_size)  # torchrun: one process per rank
    out = runs.start_run(cfg, "train") if dp.main else Path(cfg.out)
    dp.barrier()
    runs.seed_everything(cfg.seed)

    # ---- data, and the FLOPs still to spend reserved in the ledger, before any model work
    tokenizer = qwen_min.load_tokenizer(cfg.model, revision=cfg.revision)
    run_data, train, val = prepare_windows(cfg, out if dp.main else None, tokenizer)
    forecasts = validation.forecast_set_of(cfg, run_data, tokenizer)
    at = checkpoint.read_state(out / "checkpoint").step if cfg.resume else 0
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

    run_data: runs.RunData
    train: data.Windows
    val: data.Windows
    forecasts: validation.ForecastSet | None
    plan: planning.TrainPlan
    shape: qwen_min.Qwen2


def run(cfg: TrainConfig, dp: parallel.Distributed, out: Path, prepared: Prepared, booking: Booking) -> dict:
    """The run itself, once its FLOPs are reserved: load, train, evaluate, save."""
    run_data, train, val = prepared.run_data, prepared.train, prepared.val
    # ---- model: the frozen base, LoRA on --targets, AdamW on what is trainable
    device, t_start = dp.device, time.time()
    model, _ = runs.load_model(cfg, device)
    lora.apply_lora(model, rank=cfg.rank, alpha=cfg.lora_alpha, targets=cfg.targets,
                    dropout=cfg.lora_dropout, train_lm_head_bias=cfg.train_lm_head_bias)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state, best, untrained = RunState(), {}, None  # best: the adapter of the best evaluation so far; empty: none yet
    if cfg.resume:
        state, best = checkpoint.load(out / "checkpoint", model, opt)
        untrained = checkpoint.load_untrained(out / "checkpoint")
    wandb_run = metrics_log.start_wandb(cfg) if cfg.wandb and dp.main else None
    log = metrics_log.MetricsLog(out, resume_step=state.step if cfg.resume else None, write=dp.main,
                                 wandb_run=wandb_run)
    costs = planning.ScoredCosts(prepared.shape, cfg.batch_size, cfg.context_length)
    accounts = RunAccounts(booking, costs, state, world=dp.world)
    evaluate = validation.Validator(val.head(cfg.eval_windows), prepared.forecasts, select_by=cfg.select_by,
                                    accounts=accounts, log=log, best=best, untrained=untrained)

    # ---- the loop: batch, forward, loss, backward, step, log, evaluate, checkpoint. The ledger's
    # side of it is ``accounts`` alone (drop those lines, and the loop runs without a ledger).
    model.train()
    # Compiled, the elementwise chains (norms, rotary, SwiGLU, LoRA) fuse into fewer passes; the
    # matmuls are the same. Validation stays eager (no_grad would be a second compilation).
    hidden = torch.compile(model.hidden) if cfg.compile else model.hidden
    n_train, local = len(train.input_ids), cfg.batch_size // dp.world
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not dp.main, desc="train", unit="step")
    t_step, stopped_early, lr_of = time.time(), False, training.schedule_of(cfg)
    try:
        if cfg.eval_every and cfg.eval_at_start and state.step == 0:  # the untrained model: a candidate
            evaluate(model, state, lr_of(0))
        while state.step < cfg.max_steps:
            batch = training.next_batch(state, n_train, cfg.batch_size, cfg.seed)   # the same after a resume
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
            training.check_finite(loss, "training", state.step)

            if cfg.eval_every and state.step % cfg.eval_every == 0:
                evaluate(model, state, lr)  # charged and logged; keeps the best adapter so far
                stopped_early = state.out_of_patience(cfg.patience)
            if dp.main and (state.step % cfg.checkpoint_every == 0 or stopped_early
                            or state.step == cfg.max_steps):
                with accounts.settled():   # every FLOP charged before a checkpoint holds it
                    checkpoint.save(out / "checkpoint", model, opt, state, evaluate.best, evaluate.untrained)
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
    training.load_trainable(model, evaluate.best)
    model.eval()
    val_loss, val_tokens = training.windows_loss(model, val.input_ids, val.labels, cfg.batch_size, device,
                                                 what="the validation split",
                                                 after_batch=accounts.final_batch(len(val.input_ids)))
    training.check_finite(val_loss, "validation", state.step)
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


def reserve(cfg: TrainConfig, plan: planning.TrainPlan, at: int, world: int) -> flops.Reservation:
    """Hold the FLOPs of what is left of the run (all of it, or from the resumed step ``at``), or refuse it."""
    reservation = runs.reserve(cfg, plan.total, kind="train", config={
        "rank": cfg.rank, "lr": cfg.lr, "context_length": cfg.context_length, "batch_size": cfg.batch_size,
        "from_step": at, "max_steps": cfg.max_steps, "world_size": world})
    print(f"plan: {plan.steps} steps x {plan.step:.3e} FLOPs (on average) + {plan.evals} evaluations x "
          f"{plan.eval:.3e} + the final one = {plan.total:.3e} FLOPs ({plan.total / cfg.budget:.2%} of the budget), "
          f"reserved", flush=True)
    return reservation


def save_adapter(model: qwen_min.Qwen2, out: Path, run_data: runs.RunData, cfg: TrainConfig) -> None:
    lora.save_adapter(model, out / "adapter", base_model_name_or_path=cfg.model)
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


def keep_best(e: errors.Diverged, model: qwen_min.Qwen2, best: dict, state: RunState, out: Path,
              run_data: runs.RunData, cfg: TrainConfig, dp: parallel.Distributed) -> str:
    """After a loss that is not finite: the last checkpoint stays as it was (nothing was saved since);
    the best adapter so far is saved, if an evaluation found one. Returns the message to stop with."""
    msg = f"{e}: the run stops; {out / 'checkpoint'} keeps the last good checkpoint"
    if best and dp.main:
        training.load_trainable(model, best)
        save_adapter(model, out, run_data, cfg)
        msg += f"; {out / 'adapter'} holds the best adapter so far (step {state.best_step})"
    return msg + ("" if best else "; no evaluation had scored an adapter yet, so none is saved")


if __name__ == "__main__":
    sys.exit(cli.run_as_script(main))

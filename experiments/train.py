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

import contextlib
import json
import shlex
import sys
import time
from collections.abc import Callable
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
from experiments.lib import errors, files, reporting
from experiments.lib.budget import planning
from experiments.lib.budget.accounts import RunAccounts
from experiments.lib.budget.booking import Booking, reserve
from experiments.lib.errors import Interrupted
from experiments.lib.run import checkpoint, cli, devices, folder, metrics_log, parallel, rundata
from experiments.lib.run.config import TrainConfig
from experiments.lib.run.metrics_log import MetricsLog
from experiments.lib.run.models import load_model
from experiments.lib.run.windows import forecast_set_of, prepare_windows
from experiments.lib.science import data
from experiments.lib.training import evaluation, schedule
from experiments.lib.training.evaluation import ForecastSet
from experiments.lib.training.schedule import next_batch
from experiments.lib.training.state import RunState, check_finite, load_trainable, trainable_copy
from experiments.lib.training.step import train_step

# ---------------------------------------------------------------------------------------------
# The loop: copy it with Hooks, and it runs on any model, optimizer and windows. Everything a run
# adds (the ledger's ceiling and charges, metrics rows, evaluations, checkpoints, data parallel's
# sums) attaches through the hooks; with none it trains and nothing else.


def train_loop(model: qwen_min.Qwen2, opt: torch.optim.Optimizer, windows: data.Windows, state: RunState, *,
               max_steps: int, batch_size: int, seed: int, lr_of: Callable[[int], float], eval_every: int = 0,
               hooks: Hooks | None = None, rank: int = 0, world: int = 1,
               hidden: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
    """Optimizer steps from ``state.step`` to ``max_steps``: batch, forward, loss, backward, step.

    Each step takes the next ``batch_size`` windows of an order that depends only on ``seed`` and the
    epoch (so a resumed ``state`` draws the very batches it would have), of which rank ``rank`` of
    ``world`` takes its share, at learning rate ``lr_of(step)``. Every ``eval_every`` steps (0:
    never) ``hooks.evaluate`` runs; it returns True to stop early. ``hidden``: the model's body to
    train through (default ``model.hidden``; a compiled one, say). A loss that is not finite raises
    errors.Diverged. Returns whether it stopped early."""
    hooks = hooks or Hooks()
    hidden = hidden or model.hidden
    device = model.lm_head.weight.device
    n_windows, local = len(windows.input_ids), batch_size // world
    step_tokens = batch_size * windows.input_ids.shape[1]   # every position of every window, padding too
    model.train()
    stop, t_step = False, time.time()
    while state.step < max_steps and not stop:
        batch = next_batch(state, n_windows, batch_size, seed)   # the same after a resume
        rows = batch[rank * local:(rank + 1) * local]           # this rank's share
        ids, labels = windows.input_ids[rows].to(device), windows.labels[rows].to(device)
        # Each rank's loss is its share of the *global* mean: its sum / every rank's scored tokens.
        n_scored = int((windows.labels[batch] != -100).sum())
        lr = lr_of(state.step)
        for g in opt.param_groups:
            g["lr"] = lr
        hooks.before_step(state, n_scored)
        loss_sum = train_step(hidden, model.lm_head, ids, labels, n_scored=n_scored)  # forward, loss, backward
        loss_sum = hooks.after_backward(loss_sum)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss, now = loss_sum.item() / n_scored, time.time()
        tok_s, t_step = step_tokens / max(now - t_step, 1e-9), now
        with hooks.step_ending(state, n_scored):
            state.advance(batch_size, step_tokens)
            hooks.on_step(state, loss, lr, tokens_per_s=tok_s, scored_tokens=n_scored)
        check_finite(loss, "training", state.step)
        stop = bool(eval_every) and state.step % eval_every == 0 and hooks.evaluate(model, state, lr)
        hooks.after_step(state, stopping=stop)
    return stop


class Hooks:
    """What attaches to ``train_loop`` from outside. Each does nothing here, so the loop runs bare;
    train.py's run attaches ``RunHooks``."""

    def before_step(self, state: RunState, scored: int) -> None:
        """Before step ``state.step + 1`` does any work (scoring ``scored`` tokens)."""

    def after_backward(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """The step's loss sum once its gradients are in, before the optimizer step."""
        return loss_sum

    def step_ending(self, state: RunState, scored: int) -> contextlib.AbstractContextManager:
        """The block in which the finished step is counted (``state.advance``) and ``on_step`` runs."""
        return contextlib.nullcontext()

    def on_step(self, state: RunState, loss: float, lr: float, *, tokens_per_s: float, scored_tokens: int) -> None:
        """A finished step's figures (``state.step`` is its number)."""

    def evaluate(self, model: qwen_min.Qwen2, state: RunState, lr: float) -> bool:
        """An evaluation after step ``state.step``; True stops the run (early stopping)."""
        return False

    def after_step(self, state: RunState, *, stopping: bool) -> None:
        """After a step and its evaluation, if any (``stopping``: the last step of an early stop)."""


# ---------------------------------------------------------------------------------------------
# The run: flags, data, the FLOPs reserved, the model, the loop with its hooks, the kept adapter


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return cli.parse(TrainConfig, argv, __doc__)


def build_parser() -> cli.ArgumentParser:
    """train.py's command line (``parse_args`` also builds the TrainConfig it gives)."""
    return cli.parser(TrainConfig, __doc__)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    dp = parallel.start_distributed(cfg.device, cfg.batch_size)  # torchrun: one process per rank
    out = folder.start_run(cfg, "train", resume=cfg.resume) if dp.main else Path(cfg.out)
    dp.barrier()
    folder.seed_everything(cfg.seed)

    # ---- data, and the FLOPs still to spend reserved in the ledger, before any model work
    tokenizer = qwen_min.load_tokenizer(cfg.model, revision=cfg.revision)
    run_data, train, val = prepare_windows(cfg, out if dp.main else None, tokenizer)
    forecasts = forecast_set_of(cfg, run_data, tokenizer)
    at = checkpoint.read_state(checkpoint.folder(out)).step if cfg.resume else 0
    plan, _ = planning.train_plan(cfg, train, val, dp.world, from_step=at, forecast_calls=forecasts and forecasts.calls)
    reservation = reserve_plan(cfg, plan, at, dp.world) if dp.main else None
    prepared = Prepared(run_data, train, val, forecasts, plan)
    with Booking(reservation, every=cfg.charge_every, step_tokens=plan.costs.step_tokens) as booking:
        try:
            return run(cfg, dp, out, prepared, booking)
        except Interrupted as e:   # (the booking closes first; cli.run_as_script prints the note)
            e.note = interrupted_note(e, out, argv)
            raise


@dataclass
class Prepared:
    """What main() readies before any model work: the run's data, its training and validation
    windows, the validation forecasts, and the plan (with the prices the run charges)."""

    run_data: rundata.RunData
    train: data.Windows
    val: data.Windows
    forecasts: ForecastSet | None
    plan: planning.TrainPlan


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
    accounts = RunAccounts(booking, prepared.plan.costs, state, world=dp.world)
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not dp.main, desc="train", unit="step")
    hooks = RunHooks(cfg, dp, out, model, opt, accounts, log, bar, val.head(cfg.eval_windows), prepared.forecasts,
                     best=best, untrained=untrained)
    lr_of = schedule.schedule_of(cfg)
    # Compiled, the elementwise chains (norms, rotary, SwiGLU, LoRA) fuse into fewer passes; the
    # matmuls are the same. Validation stays eager (no_grad would be a second compilation).
    hidden = torch.compile(model.hidden) if cfg.compile else model.hidden
    try:
        if cfg.eval_every and cfg.eval_at_start and state.step == 0:  # the untrained model: a candidate
            hooks.evaluate(model, state, lr_of(0))
        stopped_early = train_loop(model, opt, train, state, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
                                   seed=cfg.seed, lr_of=lr_of, eval_every=cfg.eval_every, hooks=hooks,
                                   rank=dp.rank, world=dp.world, hidden=hidden)
    except Interrupted as e:
        e.step = state.step   # (for the note that says how to continue)
        bar.close()           # (ends the progress bar's line, so the note has its own)
        raise
    except errors.Diverged as e:
        raise errors.Diverged(keep_best(e, model, hooks.best, state, out, run_data, cfg, dp)) from None
    bar.close()

    # ---- the best adapter (the final one if no evaluation ran), scored on the whole validation
    # split (charged batch by batch), saved in PEFT's layout
    load_trainable(model, hooks.best)
    model.eval()
    val_loss, val_tokens = evaluation.windows_loss(model, val.input_ids, val.labels, cfg.batch_size, device,
                                                   what="the validation split",
                                                   after_batch=accounts.final_batch(len(val.input_ids)))
    check_finite(val_loss, "validation", state.step)
    summary = {"name": cfg.run_name, "data": run_data.data_path, "dtype": devices.dtype_of(model), "rank": cfg.rank,
               "lr": cfg.lr,
               "context_length": train.input_ids.shape[1], "steps": state.step, "best_step": state.best_step,
               "select_by": cfg.select_by, "best_val": state.best_scores, "val_loss": val_loss,
               "val_tokens": val_tokens,
               "stopped_early": stopped_early, "trainable_parameters": lora.trainable_parameters(model),
               "step_flops_planned": whole_run_step(prepared.plan, train, cfg), "flops": state.flops,
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


class RunHooks(Hooks):
    """What train.py attaches to the loop: the ledger's ceiling before each step and evaluation and
    their charges as they end (``accounts``), SIGINT and SIGTERM held off while a charge and the
    metrics row it pays for are written, the metrics rows and progress bar, data parallel's sums,
    the evaluations with early stopping's bookkeeping (the best adapter so far kept in ``best``,
    the step-0 forecasts in ``untrained``: a resumed run passes its checkpoint's), and the
    checkpoints."""

    def __init__(self, cfg: TrainConfig, dp: parallel.Distributed, out: Path, model: qwen_min.Qwen2,
                 opt: torch.optim.Optimizer, accounts: RunAccounts, log: MetricsLog, bar: tqdm,
                 windows: data.Windows, forecasts: ForecastSet | None, *, best: dict[str, torch.Tensor],
                 untrained: np.ndarray | None) -> None:
        self.cfg, self.dp, self.out, self.model, self.opt = cfg, dp, out, model, opt
        self.accounts, self.log, self.bar, self.windows, self.forecasts = accounts, log, bar, windows, forecasts
        self.best = best            # the best adapter so far; empty: none yet
        self.untrained = untrained  # the step-0 forecasts; None: not yet
        self.trainable = [p for p in model.parameters() if p.requires_grad]   # (data parallel sums their grads)

    def before_step(self, state: RunState, scored: int) -> None:
        self.accounts.before_step(scored)   # refused before it runs if the reservation cannot pay for it

    def after_backward(self, loss_sum: torch.Tensor) -> torch.Tensor:
        if self.dp.world == 1:
            return loss_sum
        return parallel.sum_over_ranks(self.trainable, loss_sum)

    def step_ending(self, state: RunState, scored: int) -> contextlib.AbstractContextManager:
        return self.accounts.step_done(scored)   # charged; a signal waits for the step and its metrics row too

    def on_step(self, state: RunState, loss: float, lr: float, *, tokens_per_s: float, scored_tokens: int) -> None:
        self.log(state, "train", loss, lr, tokens_per_s=tokens_per_s, scored_tokens=scored_tokens)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}", flops=f"{state.flops:.2e}")
        self.bar.update()

    def evaluate(self, model: qwen_min.Qwen2, state: RunState, lr: float) -> bool:
        """The validation subset's cross-entropy and the validation forecasts (evaluation.evaluate),
        refused before they run if the reservation cannot pay for them, each charged and logged as it
        ends; the step-0 forecasts kept as the untrained model's, every later evaluation's paired
        difference to them logged; the adapter kept if it is the best by --select-by."""
        ids, labels, accounts = self.windows.input_ids, self.windows.labels, self.accounts
        accounts.before_eval(len(ids), int((labels != -100).sum()), self.forecasts.calls if self.forecasts else [])

        def after_loss(loss: float, scored: int) -> None:
            with accounts.held():  # the evaluation's charge and its metrics row: a signal waits for both
                accounts.eval_loss_done(len(ids), scored)
                self.log(state, "val", loss, lr, scored_tokens=scored)
            check_finite(loss, "validation-subset", state.step)

        figures = evaluation.evaluate(model, self.windows, self.forecasts, self.cfg.batch_size,
                                      after_loss=after_loss, on_call=accounts.forecast_done)
        if self.forecasts is not None:
            values = figures.pop("forecasts")
            if state.step == 0:   # every LoRA B is still zero: these are the untrained model's forecasts
                self.untrained = values
            if self.untrained is not None:
                figures["vs_untrained"] = evaluation.vs_untrained(values, self.untrained, self.forecasts)
            with accounts.held():
                self.log(state, "val_forecast", None, lr, **{k: v for k, v in figures.items() if k != "val_loss"})
            if self.dp.main:
                self.bar.write(reporting.evaluation_line(state.step, figures))
        if state.record_val(evaluation.selection_score(figures, self.cfg.select_by), figures):
            self.best = trainable_copy(model)
        return state.out_of_patience(self.cfg.patience)

    def after_step(self, state: RunState, *, stopping: bool) -> None:
        if self.dp.main and (state.step % self.cfg.checkpoint_every == 0 or stopping
                             or state.step == self.cfg.max_steps):
            with self.accounts.settled():   # every FLOP charged before a checkpoint holds it
                checkpoint.save(checkpoint.folder(self.out), self.model, self.opt, state, self.best, self.untrained)


def whole_run_step(plan: planning.TrainPlan, train: data.Windows, cfg: TrainConfig) -> float:
    """The planned FLOPs of a step, on average over the whole run (``plan`` prices only what was left
    when this invocation began: a resumed run's average of its remaining steps)."""
    return sum(planning.step_costs(plan.costs, train, cfg.max_steps, cfg.seed)) / cfg.max_steps


def reserve_plan(cfg: TrainConfig, plan: planning.TrainPlan, at: int, world: int) -> flops.Reservation:
    """Hold the FLOPs of what is left of the run (all of it, or from the resumed step ``at``), or refuse it."""
    reservation = reserve(cfg, plan.total, kind="train", config={
        "rank": cfg.rank, "lr": cfg.lr, "context_length": plan.costs.context_length, "batch_size": cfg.batch_size,
        "from_step": at, "max_steps": cfg.max_steps, "world_size": world})
    print(f"plan: {plan.steps} steps x {plan.step:.3e} FLOPs (on average) + {plan.evals} evaluations x "
          f"{plan.eval:.3e} + the final one = {plan.total:.3e} FLOPs ({plan.total / cfg.budget:.2%} of the budget), "
          f"reserved", flush=True)
    return reservation


def save_adapter(model: qwen_min.Qwen2, out: Path, run_data: rundata.RunData, cfg: TrainConfig) -> None:
    """The adapter and what decodes its forecasts again (rundata.save_adapter_files), in one swap: the
    folder holds the previous adapter or the new one, whole."""
    with files.named(out / "adapter"):
        lora.save_adapter(model, out / "adapter", base_model_name_or_path=cfg.model,
                          write_extra=lambda folder: rundata.save_adapter_files(folder, run_data))


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

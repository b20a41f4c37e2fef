"""Train LoRA adapters on Qwen2.5 to continue LLMTIME-encoded predator-prey series — the main job.

    python experiments/train.py                                    # defaults: Qwen2.5-0.5B-Instruct, generated data
    python experiments/train.py --model ./tiny-qwen --max-steps 50 --out runs/smoke
    torchrun --nproc-per-node 2 experiments/train.py ...           # data parallel (gloo on CPU, nccl on GPU)

A plain loop, top to bottom: plan the FLOPs and check them against the ledger (before any model
work), load, wrap q/v in LoRA, then step: forward, chunked cross-entropy, backward, AdamW. Every
--eval-every steps the fixed validation subset is scored (early stopping keeps the best adapter);
every --checkpoint-every steps the adapter, optimizer, RNG states and data position are written
atomically and the FLOPs spent since the last entry go to the ledger. At the end the best adapter
is restored, scored on the whole validation split and saved in PEFT's layout.

Files in --out: train_args.json, splits.json, encoding.json, metrics.jsonl, metrics.csv,
adapter/ (best adapter), checkpoint/ (for --resume), summary.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

import flops
import lora
import qwen_min
from experiments.lib import checkpoint, files, planning, runs, training
from experiments.lib.training import RunState


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return runs.train_parser(__doc__).parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dp = training.start_distributed(args.device, args.batch_size)  # torchrun: one process per rank
    device = dp.device
    out = runs.start_run(args, "train") if dp.main else Path(args.out)
    dp.barrier()
    runs.seed_everything(args.seed)

    # ---- data, and the FLOP plan checked against the ledger before any model work
    run_data, train, val = training.prepare_windows(args, out if dp.main else None)
    n_train = len(train.input_ids)
    if n_train < args.batch_size:
        raise SystemExit(f"only {n_train} training windows for batch size {args.batch_size}: lower --batch-size")
    plan, shape = planning.train_plan(args, len(val.input_ids), dp.world)  # shape: the model on the meta device
    ledger = flops.Ledger(args.ledger, budget=args.budget)
    if dp.main:
        check_budget(ledger, plan, args)

    # ---- model: the frozen base, LoRA on --targets, AdamW on what is trainable
    model, _ = runs.load_model(args, device)
    lora.apply_lora(model, rank=args.rank, alpha=args.lora_alpha, targets=tuple(args.targets),
                    dropout=args.lora_dropout, train_lm_head_bias=args.train_lm_head_bias)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SystemExit("nothing to train: --rank 0 without --train-lm-head-bias")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    state, best = RunState(), {}  # best: the adapter of the best evaluation so far; empty: none has run
    if args.resume:
        state, best = checkpoint.load(out / "checkpoint", model, opt)
    wandb_run = training.start_wandb(args) if args.wandb and dp.main else None
    log = training.MetricsLog(out, resume_step=state.step if args.resume else None, write=dp.main,
                              wandb_run=wandb_run)
    costs = planning.ScoredCosts(shape, args.batch_size, args.context_length)

    # ---- the loop
    model.train()
    # Compiled, the elementwise chains (norms, rotary, SwiGLU, LoRA) fuse into fewer passes; the
    # matmuls are the same. Validation stays eager (no_grad would be a second compilation).
    hidden = torch.compile(model.hidden) if args.compile else model.hidden
    local = args.batch_size // dp.world
    val_subset = (val.input_ids[: args.eval_windows], val.labels[: args.eval_windows])
    bar = tqdm(total=args.max_steps, initial=state.step, disable=not dp.main, desc="train", unit="step")
    t_ledger = t_step = time.time()
    stopped_early = False
    while state.step < args.max_steps:
        if state.position + args.batch_size > n_train:  # epoch done: the next permutation
            state.epoch, state.position = state.epoch + 1, 0
            continue
        order = training.batch_order(n_train, args.seed, state.epoch)
        batch = order[state.position:state.position + args.batch_size]
        rows = batch[dp.rank * local:(dp.rank + 1) * local]  # this rank's share
        ids, labels = train.input_ids[rows].to(device), train.labels[rows].to(device)
        lr = training.lr_at(state.step, args.lr, args.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        # Each rank's loss is its share of the *global* mean: its sum / every rank's scored tokens.
        n_scored = int((train.labels[batch] != -100).sum())
        loss_sum = qwen_min.chunked_cross_entropy(hidden(ids), model.lm_head, labels, reduction="sum")
        (loss_sum / n_scored).backward()
        if dp.world > 1:
            loss_sum = training.sum_over_ranks(params, loss_sum)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        state.position += args.batch_size
        state.tokens += args.batch_size * args.context_length
        state.flops += costs.train_step(n_scored)
        loss = loss_sum.item() / n_scored
        now = time.time()
        tok_s = args.batch_size * args.context_length / max(now - t_step, 1e-9)
        t_step = now
        log(state, "train", loss, lr, tokens_per_s=tok_s)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}", flops=f"{state.flops:.2e}")
        bar.update()

        if args.eval_every and state.step % args.eval_every == 0:
            model.eval()
            val_loss, scored = training.windows_loss(model, *val_subset, args.batch_size, device)
            model.train()
            state.flops += dp.world * costs.evaluation(len(val_subset[0]), scored)  # every rank evaluates
            log(state, "val", val_loss, lr)
            if state.record_val(val_loss):
                best = training.trainable_copy(model)
            stopped_early = state.out_of_patience(args.patience)
        if dp.main and (state.step % args.checkpoint_every == 0 or stopped_early or state.step == args.max_steps):
            training.charge_ledger(ledger, state, args, world=dp.world, seconds=time.time() - t_ledger)
            t_ledger = time.time()
            checkpoint.save(out / "checkpoint", model, opt, state, best)
        if stopped_early:
            break
    bar.close()

    # ---- the best adapter (the final one if no evaluation ran), scored on the whole validation
    # split, saved in PEFT's layout
    training.load_trainable(model, best)
    model.eval()
    val_loss, val_tokens = training.windows_loss(model, val.input_ids, val.labels, args.batch_size, device)
    final_eval = dp.world * costs.evaluation(len(val.input_ids), val_tokens)
    state.flops += final_eval
    summary = {"name": args.name, "data": run_data.data_path, "rank": args.rank, "lr": args.lr,
               "context_length": args.context_length, "steps": state.step, "best_step": state.best_step,
               "best_val_subset_loss": state.best_val, "val_loss": val_loss, "val_tokens": val_tokens,
               "stopped_early": stopped_early, "trainable_parameters": lora.trainable_parameters(model),
               "step_flops_planned": plan.step, "flops": state.flops}
    if dp.main:
        ledger.append(name=args.name, kind="eval", flops=final_eval, tokens=len(val.input_ids) * args.context_length,
                      steps=0, config={"split": "val", "windows": len(val.input_ids)}, seconds=0.0)
        lora.save_adapter(model, out / "adapter", base_model_name_or_path=args.model)
        shutil.copy(out / "encoding.json", out / "adapter" / "encoding.json")
        log(state, "val_full", val_loss, training.lr_at(state.step - 1, args.lr, args.warmup_steps))
        files.write_json(out / "summary.json", summary)
        print(json.dumps(summary, indent=1))
    if wandb_run:
        wandb_run.finish()
    dp.close()
    return summary


def check_budget(ledger: flops.Ledger, plan: planning.TrainPlan, args: argparse.Namespace) -> None:
    """Refuse a run the budget cannot pay for. A resumed run has already charged part of its plan."""
    already = ledger.spent(name=args.name) if args.resume else 0.0
    try:
        ledger.check(plan.total - already, name=args.name)
    except flops.BudgetExceeded as e:
        raise SystemExit(f"refused before any model work: {e}") from None
    print(f"plan: {args.max_steps} steps x {plan.step:.3e} FLOPs + evaluations = {plan.total:.3e} FLOPs "
          f"({plan.total / args.budget:.2%} of the budget)", flush=True)


if __name__ == "__main__":
    main()

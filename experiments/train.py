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
import csv
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import flops
import lora
import qwen_min
from experiments.lib import common
from experiments.lib import data as data_lib


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, out_default="runs/train")
    t = p.add_argument_group("training")
    t.add_argument("--rank", type=int, default=4, help="LoRA rank on q_proj and v_proj (0: no adapters)")
    t.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: = rank, scaling 1)")
    t.add_argument("--lora-dropout", type=float, default=0.0)
    t.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="linear layers to wrap")
    t.add_argument("--train-lm-head-bias", action="store_true", help="also train a bias on the output layer")
    t.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps, then constant")
    t.add_argument("--max-steps", type=int, default=10_000, help="optimizer steps at most")
    t.add_argument("--stride", type=int, default=None, help="window stride in tokens (default: context/2)")
    t.add_argument("--eval-every", type=int, default=100, help="score the validation subset every N steps")
    t.add_argument("--eval-windows", type=int, default=64, help="windows in the fixed validation subset")
    t.add_argument("--patience", type=int, default=10, help="stop after N evaluations without improvement (0: never)")
    t.add_argument("--checkpoint-every", type=int, default=100, help="write a resumable checkpoint every N steps")
    t.add_argument("--resume", action="store_true", help="continue from --out/checkpoint exactly")
    t.add_argument("--max-systems", type=int, default=None, help="use only the first N training systems")
    t.add_argument("--val-systems", type=int, default=None, help="use only the first N validation systems")
    t.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward for the training steps: ~1.2x faster steps on "
                        "2-core CPUs (Qwen2.5-0.5B, 4 x 512, bf16) after ~70 s of compiling; fused kernels "
                        "round differently, so losses are close to the eager run's, not bit for bit equal")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for the rest, swapped in atomically


def save_checkpoint(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict,
                    best: dict[str, torch.Tensor]) -> None:
    """Trainable weights, optimizer moments, RNG states, step/data position and the best adapter so far."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    for p, s in opt.state.items():
        for k, v in s.items():
            tensors[f"optimizer.{names[id(p)]}.{k}"] = torch.as_tensor(v).cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "state.safetensors"))
    save_file({n: t.detach().cpu() for n, t in best.items()}, str(tmp / "best.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)   # a crash from here on leaves .old, which --resume also reads
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model: torch.nn.Module,
                    opt: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    if not (folder / "state.json").is_file() and (folder.with_name(folder.name + ".old") / "state.json").is_file():
        folder = folder.with_name(folder.name + ".old")
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {folder}")
    tensors = load_file(str(folder / "state.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            if p.requires_grad:
                p.copy_(tensors[n])
    for n, p in params.items():
        if p.requires_grad:
            opt.state[p] = {k.rsplit(".", 1)[1]: v.to(p.device) if v.dim() else v
                            for k, v in tensors.items() if k.startswith(f"optimizer.{n}.")}
    torch.set_rng_state(tensors["rng.torch"])
    state = json.loads((folder / "state.json").read_text())
    return state, load_file(str(folder / "best.safetensors"))


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over --warmup-steps, then constant."""
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint: those steps are about to run again."""
    if path.is_file():
        rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_csv_row(path: Path, row: dict) -> None:
    fields = ["step", "kind", "loss", "lr", "tokens", "flops", "tokens_per_s"]
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def batch_order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The window order of one epoch: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


def prepare(args: argparse.Namespace, out: Path | None):
    """Split by system, fit alpha on the training systems, cut the texts into token windows."""
    prep = common.prepare_data(args, out)
    tokenizer = qwen_min.load_tokenizer(args.model, revision=args.revision)
    stride = args.stride or args.context_length // 2
    train = data_lib.training_windows(prep.texts("train", args.max_systems), tokenizer,
                                      context_length=args.context_length, stride=stride)
    val = data_lib.training_windows(prep.texts("val", args.val_systems), tokenizer, context_length=args.context_length,
                                    stride=args.context_length - 1)
    return prep, tokenizer, train, val


def plan(args: argparse.Namespace, n_val_windows: int, world: int = 1) -> tuple[dict[str, float], torch.nn.Module]:
    """FLOPs of the run as configured, from the model's structure alone (no weights are loaded):
    every step, every periodic evaluation of the validation subset, and the final full evaluation
    (evaluations run on every rank)."""
    shape = common.meta_model(common.model_config(args))
    lora.apply_lora(shape, rank=args.rank, alpha=args.lora_alpha, targets=tuple(args.targets),
                    train_lm_head_bias=args.train_lm_head_bias)
    L = args.context_length
    step = flops.count(shape, batch=args.batch_size, seq_len=L, mode="train").total
    subset = min(args.eval_windows, n_val_windows)
    evaluation = flops.count(shape, batch=subset, seq_len=L, mode="forward").total if subset else 0.0
    full = flops.count(shape, batch=n_val_windows, seq_len=L, mode="forward").total
    n_evals = args.max_steps // args.eval_every if args.eval_every else 0
    total = args.max_steps * step + world * (n_evals * evaluation + full)
    return {"step": step, "eval": evaluation, "full_eval": full, "total": total}, shape


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # ---- distributed setup: torchrun sets WORLD_SIZE/RANK; one process otherwise
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = common.pick_device(args.device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if args.batch_size % world:
            raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    main_rank = rank == 0
    out = common.start_run(args, "train") if main_rank else Path(args.out)
    if world > 1:
        dist.barrier()
    common.seed_everything(args.seed)

    # ---- data, and the FLOP plan checked against the ledger before any model work
    prep, tokenizer, train, val = prepare(args, out if main_rank else None)
    val_subset = (val.input_ids[: args.eval_windows], val.labels[: args.eval_windows])
    n_train = len(train.input_ids)
    if n_train < args.batch_size:
        raise SystemExit(f"only {n_train} training windows for batch size {args.batch_size}: lower --batch-size")
    cost, shape = plan(args, len(val.input_ids), world)  # shape: the model's structure on the meta device
    step_flops = cost["step"]
    ledger = flops.Ledger(args.ledger, budget=args.budget)
    already = ledger.spent(name=args.name) if args.resume else 0.0
    if main_rank:
        try:
            ledger.check(cost["total"] - already, name=args.name)
        except flops.BudgetExceeded as e:
            raise SystemExit(f"refused before any model work: {e}") from None
        print(f"plan: {args.max_steps} steps x {step_flops:.3e} FLOPs + evaluations = {cost['total']:.3e} FLOPs "
              f"({cost['total'] / args.budget:.2%} of the budget)", flush=True)

    # ---- model
    model, _ = common.load_model(args, device)
    lora.apply_lora(model, rank=args.rank, alpha=args.lora_alpha, targets=tuple(args.targets),
                    dropout=args.lora_dropout, train_lm_head_bias=args.train_lm_head_bias)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SystemExit("nothing to train: --rank 0 without --train-lm-head-bias")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    state = {"step": 0, "epoch": 0, "position": 0, "best_val": math.inf, "best_step": 0, "bad_evals": 0,
             "tokens": 0, "flops": 0.0, "logged_step": 0, "logged_flops": 0.0}
    def trained() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    best: dict[str, torch.Tensor] = {}  # filled by the evaluation that scores best; empty: none has run
    if args.resume:
        restored, best = load_checkpoint(out / "checkpoint", model, opt)
        state.update(restored)

    wandb_run = None
    if args.wandb and main_rank:
        try:
            import wandb
        except ImportError:
            raise SystemExit("--wandb needs the wandb package: pip install wandb") from None
        wandb_run = wandb.init(project="qwen-lora-ts", name=args.name, config=vars(args), resume="allow")

    metrics_path, csv_path = out / "metrics.jsonl", out / "metrics.csv"
    if main_rank:
        csv_path.unlink(missing_ok=True)  # rebuilt from metrics.jsonl below, in step order
        if args.resume:
            truncate_metrics(metrics_path, state["step"])
            for row in map(json.loads, metrics_path.read_text().splitlines()):
                write_csv_row(csv_path, row)
        else:
            metrics_path.unlink(missing_ok=True)

    def log(row: dict) -> None:
        if not main_rank:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        write_csv_row(csv_path, row)
        if wandb_run:
            wandb_run.log({f"{row['kind']}/loss": row["loss"], "flops": row["flops"]}, step=row["step"])

    def spend_to_ledger(t0: float) -> None:
        """One ledger entry for what was spent since the last one. The count lives in the checkpoint,
        so after a kill and --resume every step is counted once (steps re-run after the checkpoint
        were never written to the ledger)."""
        flops_since = state["flops"] - state["logged_flops"]
        steps = state["step"] - state["logged_step"]
        if main_rank and flops_since > 0:
            ledger.append(name=args.name, kind="train", flops=flops_since,
                          tokens=steps * args.batch_size * args.context_length, steps=steps,
                          config={"rank": args.rank, "lr": args.lr, "context_length": args.context_length,
                                  "batch_size": args.batch_size, "from_step": state["logged_step"],
                                  "to_step": state["step"], "world_size": world},
                          seconds=time.time() - t0)
        state["logged_step"], state["logged_flops"] = state["step"], state["flops"]

    # FLOPs of one step by the counter, at the number of tokens actually scored (the output layer
    # only runs for those): the plan above used the upper bound of every position scored.
    step_cost = functools.cache(lambda n: flops.count(shape, batch=args.batch_size, seq_len=args.context_length,
                                                      mode="train", scored_tokens=n).total)
    eval_cost = functools.cache(lambda rows, n: flops.count(shape, batch=rows, seq_len=args.context_length,
                                                            mode="forward", scored_tokens=n).total)

    model.train()
    # Compiled, the elementwise chains (norms, rotary, SwiGLU, LoRA) fuse into fewer passes; the
    # matmuls are the same. Validation stays eager (no_grad would be a second compilation).
    hidden = torch.compile(model.hidden) if args.compile else model.hidden
    local = args.batch_size // world
    bar = tqdm(total=args.max_steps, initial=state["step"], disable=not main_rank, desc="train", unit="step")
    t_seg = t_rate = time.time()
    stopped_early = False
    while state["step"] < args.max_steps:
        order = batch_order(n_train, args.seed, state["epoch"])
        if state["position"] + args.batch_size > n_train:  # epoch done: the next permutation
            state["epoch"] += 1
            state["position"] = 0
            continue
        for g in opt.param_groups:
            g["lr"] = lr_at(state["step"], args)
        batch = order[state["position"]: state["position"] + args.batch_size]
        rows = batch[rank * local:(rank + 1) * local]                    # this rank's share
        ids, labels = train.input_ids[rows].to(device), train.labels[rows].to(device)
        # Each rank's loss is its share of the *global* mean: its sum / every rank's scored tokens.
        n_scored = int((train.labels[batch] != -100).sum())
        loss_sum = qwen_min.chunked_cross_entropy(hidden(ids), model.lm_head, labels, reduction="sum")
        (loss_sum / n_scored).backward()
        if world > 1:  # summed gradients = the gradient of the combined batch's mean
            for p in params:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            loss_sum = loss_sum.detach()
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["position"] += args.batch_size
        state["tokens"] += args.batch_size * args.context_length
        state["flops"] += step_cost(n_scored)
        loss = loss_sum.item() / n_scored
        now = time.time()
        tok_s = args.batch_size * args.context_length / max(now - t_rate, 1e-9)
        t_rate = now
        log({"step": state["step"], "kind": "train", "loss": loss, "lr": lr_at(state["step"] - 1, args),
             "tokens": state["tokens"], "flops": state["flops"], "tokens_per_s": tok_s})
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}", flops=f"{state['flops']:.2e}")
        bar.update()

        if args.eval_every and state["step"] % args.eval_every == 0:
            model.eval()
            val_loss, scored = common.windows_loss(model, *val_subset, args.batch_size, device)
            model.train()
            state["flops"] += world * eval_cost(len(val_subset[0]), scored)  # every rank evaluates
            log({"step": state["step"], "kind": "val", "loss": val_loss, "lr": lr_at(state["step"] - 1, args),
                 "tokens": state["tokens"], "flops": state["flops"]})
            if val_loss < state["best_val"]:
                state.update(best_val=val_loss, best_step=state["step"], bad_evals=0)
                best = trained()
            else:
                state["bad_evals"] += 1
            if args.patience and state["bad_evals"] >= args.patience:
                stopped_early = True
        if main_rank and (state["step"] % args.checkpoint_every == 0 or stopped_early
                          or state["step"] == args.max_steps):
            spend_to_ledger(t_seg)
            t_seg = time.time()
            save_checkpoint(out / "checkpoint", model, opt, state, best)
        if stopped_early:
            break
    bar.close()

    # ---- the best adapter (the final one if no evaluation ran), scored on the whole validation
    # split, saved in PEFT's layout
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in best:
                p.copy_(best[n])
    model.eval()
    val_loss, val_tokens = common.windows_loss(model, val.input_ids, val.labels, args.batch_size, device)
    final_eval = world * eval_cost(len(val.input_ids), val_tokens)
    summary = {"name": args.name, "data": prep.data_path, "rank": args.rank, "lr": args.lr,
               "context_length": args.context_length,
               "steps": state["step"], "best_step": state["best_step"], "best_val_subset_loss": state["best_val"],
               "val_loss": val_loss, "val_tokens": val_tokens, "stopped_early": stopped_early,
               "trainable_parameters": lora.trainable_parameters(model), "step_flops_planned": step_flops,
               "flops": state["flops"] + final_eval}
    if main_rank:
        ledger.append(name=args.name, kind="eval", flops=final_eval, tokens=len(val.input_ids) * args.context_length,
                      steps=0, config={"split": "val", "windows": len(val.input_ids)}, seconds=0.0)
        lora.save_adapter(model, out / "adapter", base_model_name_or_path=args.model)
        shutil.copy(out / "encoding.json", out / "adapter" / "encoding.json")
        log({"step": state["step"], "kind": "val_full", "loss": val_loss, "lr": lr_at(state["step"] - 1, args),
             "tokens": state["tokens"], "flops": summary["flops"]})
        common.write_json(out / "summary.json", summary)
        print(json.dumps(summary, indent=1))
    if wandb_run:
        wandb_run.finish()
    if world > 1:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()

"""This project against transformers + PEFT, side by side in one run, on the Qwen2.5-0.5B config.

    python experiments/benchmark.py                       # bf16, everything, prints ratios (ours / theirs)
    python experiments/benchmark.py --dtype fp32 --only train --json runs/bench_fp32.json

The weights are random (same checkpoint for both, written once to a temp folder), so it runs
offline. Each measurement alternates ours and theirs repetition by repetition, and reports the
median; absolute timings are noisy on shared machines, the ratios are what to read. Peak memory and
checkpoint loading are measured in fresh child processes, so one measurement's allocations never
hide another's. Needs the dev extra (transformers, peft).

Figures: LoRA training step (rank 4 on q, v; batch 4 x 512; loss over the full vocabulary) tokens/s
and peak memory; forward tokens/s; forecasting (32 series, 50-step prompts, 50 steps greedy, KV
cached) time steps per second; batched greedy generation (64 prompts x 128 new tokens); checkpoint
load time and peak memory; model FLOP utilisation of the training step against the matmul peak
measured here. Then where the time goes (torch.profiler, ours and theirs): a no-grad forward and
one decode step split into matmul, attention, norms/rotary, elementwise, output layer/loss,
allocation/copy and other, in ms and as fractions. The output (and --json) starts with where it
ran: CPU model and its bf16-relevant ISA flags, torch and oneDNN versions, the bf16 matmul kernel
oneDNN picks, threads, ONEDNN_MAX_CPU_ISA if set, the GPU on CUDA.

The pieces are in experiments/lib: bench_env.py (where it ran, memory, the matmul peak),
bench_cases.py (the models and timed cases), bench_phases.py (the profiler's phases); the device
check, experiments/gpu_check.py, is made of the same.

    python experiments/benchmark.py --device cuda         # on a GPU (bf16)
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python experiments/benchmark.py   # an AMX CPU without AMX
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from experiments.lib.bench_cases import (
    ALLOWED,
    DTYPES,
    alternate,
    forecast_prompts,
    forward_fns,
    generate_fns,
    in_child,
    load_ours,
    load_theirs,
    time_forecast,
    time_train_step,
    write_checkpoint,
)
from experiments.lib.bench_env import environment, matmul_peak, print_environment
from experiments.lib.bench_phases import print_phases, profile_phases


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions per measurement")
    parts = ["train", "memory", "forward", "forecast", "generate", "load", "phases"]
    p.add_argument("--only", nargs="+", default=parts, choices=parts)
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    p.add_argument("--checkpoint", default=None, help="use this Qwen2 checkpoint folder instead of random weights")
    args = p.parse_args(argv)

    import qwen_min
    from experiments.lib.runs import pick_device

    device = pick_device(args.device)
    dtype = DTYPES[args.dtype]
    tmp = tempfile.TemporaryDirectory()
    ckpt = Path(args.checkpoint) if args.checkpoint else write_checkpoint(Path(tmp.name) / "qwen05", dtype)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    env = environment(device)
    print_environment(env)
    res: dict = {"environment": env, "dtype": args.dtype, "ours": {}, "theirs": {}, "ratios": {}, "phases": {}}

    def record(key: str, ours: float, theirs: float, unit: str) -> None:
        res["ours"][key], res["theirs"][key], res["ratios"][key] = ours, theirs, ours / theirs
        print(f"{key:28s} ours {ours:12.4g}  transformers {theirs:12.4g} {unit:10s} ratio {ours / theirs:6.2f}x",
              flush=True)

    B, T = 4, 512
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151643, (B, T), generator=gen).to(device)
    n, new = 64, 128  # batched greedy generation: 64 prompts of up to 64 tokens, 128 new tokens each
    prompts = torch.randint(0, 151643, (n, 64), generator=gen).to(device)
    mask = torch.ones_like(prompts)
    mask[::2, :16] = 0  # half the prompts shorter, left-padded

    if "load" in args.only:
        o, t = in_child("ours:load", ckpt, args.dtype, device), in_child("theirs:load", ckpt, args.dtype, device)
        record("load_seconds", o["seconds"], t["seconds"], "s")
        record("load_peak_memory", o["peak_bytes"], t["peak_bytes"], "bytes")
        res["ours"]["load_peak_over_checkpoint_size"] = o["peak_bytes"] / size
        print(f"{'':28s} ours' peak while loading / checkpoint on disk = {o['peak_bytes'] / size:.2f}")

    if "train" in args.only or "forward" in args.only:
        ours = load_ours(ckpt, dtype, device, lora_rank=4)
        theirs = load_theirs(ckpt, dtype, device, lora_rank=4)
        if "forward" in args.only:
            fwd_ours, fwd_theirs = forward_fns(ours, theirs, ids)
            s = alternate({"ours": fwd_ours, "theirs": fwd_theirs}, args.reps, device)
            record("forward_tokens_per_s", B * T / s["ours"], B * T / s["theirs"], "tok/s")
        if "train" in args.only:
            peak = matmul_peak(dtype, device)
            row = time_train_step(ours, theirs, ids, args.reps, device, peak)
            record("train_tokens_per_s", row["tokens_per_s_ours"], row["tokens_per_s_theirs"], "tok/s")
            res["mfu"], res["theirs"]["mfu"], res["matmul_peak_flops_per_s"] = row["mfu_ours"], row["mfu_theirs"], peak
            print(f"{'mfu':28s} ours {res['mfu']:.1%}  transformers {res['theirs']['mfu']:.1%}  (counter: "
                  f"{row['flops_per_step_actual']:.3e} FLOPs/step; matmul peak {peak / 1e9:.0f} GFLOP/s)", flush=True)
        del ours, theirs

    if "memory" in args.only:
        o, t = in_child("ours:train", ckpt, args.dtype, device), in_child("theirs:train", ckpt, args.dtype, device)
        record("train_peak_memory", o["peak_bytes"], t["peak_bytes"], "bytes")

    if "forecast" in args.only or "generate" in args.only:
        from experiments.lib.forecasting import ALPHABET

        ours = load_ours(ckpt, dtype, device)
        theirs = load_theirs(ckpt, dtype, device)
        tok = qwen_min.load_tokenizer(ckpt) if (ckpt / "tokenizer.json").is_file() else None
        if tok is not None:
            assert ALLOWED == [tok.encode(c)[0] for c in ALPHABET]
        if "forecast" in args.only:
            # 32 series, prompts of 50 steps "d.dd,d.dd;" (~500 tokens), 50 steps ~ 500 new tokens.
            fc_prompts = forecast_prompts(32, 500, gen).to(device)
            row = time_forecast(ours, theirs, fc_prompts, 50, 500, device)
            record("forecast_steps_per_s", row["steps_per_s_ours"], row["steps_per_s_theirs"], "steps/s")
        if "generate" in args.only:
            g_ours, g_theirs = generate_fns(ours, theirs, prompts, mask, new)
            s = alternate({"ours": g_ours, "theirs": g_theirs}, 1, device, warmup=False)
            record("generate_tokens_per_s", n * new / s["ours"], n * new / s["theirs"], "tok/s")
        del ours, theirs

    if "phases" in args.only:
        # Where the time goes, under torch.profiler: the no-grad forward above (LoRA models, 4 x 512)
        # and one decode step of the 64-prompt generation above (plain models; 8 new tokens).
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]

        def breakdown(key: str, fns: tuple, models: tuple, per_decode_step: bool = False) -> None:
            res["phases"][key] = {who: profile_phases(fn, model, device, vocab, per_decode_step)
                                  for who, fn, model in zip(("ours", "theirs"), fns, models, strict=True)}
            print_phases(f"{key} (ms per {'step' if per_decode_step else 'call'})", **res["phases"][key])

        ours, theirs = load_ours(ckpt, dtype, device, lora_rank=4), load_theirs(ckpt, dtype, device, lora_rank=4)
        breakdown("forward", forward_fns(ours, theirs, ids), (ours, theirs))
        ours, theirs = load_ours(ckpt, dtype, device), load_theirs(ckpt, dtype, device)
        breakdown("decode_step", generate_fns(ours, theirs, prompts, mask, 8), (ours, theirs), per_decode_step=True)
        del ours, theirs

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    tmp.cleanup()
    return res


if __name__ == "__main__":
    from experiments.lib import cli

    sys.exit(cli.run_as_script(main))

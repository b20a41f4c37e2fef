"""This project against transformers + PEFT, side by side in one run, on the Qwen2.5-0.5B config.

    python experiments/benchmark.py                       # bf16, everything, prints ratios (ours / theirs)
    python experiments/benchmark.py --dtype fp32 --only train --json runs/bench_fp32.json

The weights are random (same checkpoint for both, written once to a temp folder), so it runs
offline. Each measurement alternates ours and theirs repetition by repetition, and reports the
median; absolute timings are noisy on shared machines, the ratios are what to read. Peak memory and
checkpoint loading are measured in fresh child processes, so one measurement's allocations never
hide another's. Needs the dev extra (transformers, peft).

Figures: LoRA training step (rank 4 on q, v; batch 4 x 512; loss over the full vocabulary) tokens/s
and peak memory; the same step at train.py's two window shapes, 4 x 256 and one whole series of
1,100 tokens (--only shapes), and how the long one's speed per token compares; forward tokens/s;
forecasting (32 series, 50-step prompts, 50 steps greedy, KV cached) time steps per second; batched
greedy generation (64 prompts x 128 new tokens); checkpoint load time and peak memory; model FLOP
utilisation of the training step against the matmul peak measured here. Then where the time goes
(torch.profiler, ours and theirs): a no-grad forward and one decode step split into matmul,
attention, norms/rotary, elementwise, output layer/loss, allocation/copy and other, in ms and as
fractions. The output (and --json) starts with where it ran: CPU model and its bf16-relevant ISA
flags, torch and oneDNN versions, the bf16 matmul kernel oneDNN picks, threads, ONEDNN_MAX_CPU_ISA
if set, the GPU on CUDA.

The pieces are in experiments/lib/bench: env.py (where it ran, memory, the matmul peak), cases.py
(the models and timed cases), phases.py (the profiler's phases); the device check,
experiments/gpu_check.py, is made of the same.

    python experiments/benchmark.py --device cuda         # on a GPU (bf16)
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python experiments/benchmark.py   # an AMX CPU without AMX
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from experiments.lib.bench.cases import (
    DTYPES,
    allowed_ids,
    alternate,
    forecast_prompts,
    forward_fns,
    generate_fns,
    in_child,
    load_ours,
    load_theirs,
    pad_id,
    time_forecast,
    time_train_step,
    write_checkpoint,
)
from experiments.lib.bench.env import environment, matmul_peak, print_environment
from experiments.lib.bench.phases import print_phases, profile_phases

PARTS = ("train", "shapes", "memory", "forward", "forecast", "generate", "load", "phases")
B, T = 4, 512          # the training step's and the forward's batch
# train.py's two windows, about the same tokens a step: the default 4 x 256, and one window that holds a
# whole series (prompt + horizon: --context-length series, 1,096 tokens on the coursework data)
SHAPES = ((4, 256), (1, 1100))
N_GEN, NEW = 64, 128   # batched greedy generation: 64 prompts of up to 64 tokens, 128 new tokens each


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions per measurement")
    p.add_argument("--only", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    p.add_argument("--checkpoint", default=None, help="use this Qwen2 checkpoint folder instead of random weights")
    return p


@dataclass
class Bench:
    """What every part shares: the checkpoint, where it runs, the inputs (random token ids below the
    first special token, drawn once from one seed) and the results."""

    ckpt: Path
    dtype_name: str
    device: torch.device
    reps: int
    res: dict
    ids: torch.Tensor = field(init=False)           # (B, T) training and forward batch
    prompts: torch.Tensor = field(init=False)       # (N_GEN, 64), half of them left-padded by 16
    mask: torch.Tensor = field(init=False)
    fc_prompts: torch.Tensor = field(init=False)    # 32 LLMTIME-like prompts of ~50 steps (~500 tokens)

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, pad_id(), (B, T), generator=gen).to(self.device)
        self.prompts = torch.randint(0, pad_id(), (N_GEN, 64), generator=gen).to(self.device)
        self.mask = torch.ones_like(self.prompts)
        self.mask[::2, :16] = 0
        self.fc_prompts = forecast_prompts(32, 500, gen).to(self.device)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    def models(self, lora_rank: int | None = None) -> tuple:
        return (load_ours(self.ckpt, self.dtype, self.device, lora_rank=lora_rank),
                load_theirs(self.ckpt, self.dtype, self.device, lora_rank=lora_rank))

    def record(self, key: str, ours: float, theirs: float, unit: str) -> None:
        self.res["ours"][key], self.res["theirs"][key], self.res["ratios"][key] = ours, theirs, ours / theirs
        print(f"{key:28s} ours {ours:12.4g}  transformers {theirs:12.4g} {unit:10s} ratio {ours / theirs:6.2f}x",
              flush=True)


def bench_load(b: Bench, only: list[str]) -> None:
    """Checkpoint loading, each side in a fresh child process: seconds and peak memory."""
    o, t = (in_child(f"{who}:load", b.ckpt, b.dtype_name, b.device) for who in ("ours", "theirs"))
    b.record("load_seconds", o["seconds"], t["seconds"], "s")
    b.record("load_peak_memory", o["peak_bytes"], t["peak_bytes"], "bytes")
    size = sum(f.stat().st_size for f in b.ckpt.glob("*.safetensors"))
    b.res["ours"]["load_peak_over_checkpoint_size"] = o["peak_bytes"] / size
    print(f"{'':28s} ours' peak while loading / checkpoint on disk = {o['peak_bytes'] / size:.2f}")


def bench_train_and_forward(b: Bench, only: list[str]) -> None:
    """The no-grad forward and the LoRA training step (rank 4 on q, v), with the step's MFU."""
    ours, theirs = b.models(lora_rank=4)
    if "forward" in only:
        fwd_ours, fwd_theirs = forward_fns(ours, theirs, b.ids)
        s = alternate({"ours": fwd_ours, "theirs": fwd_theirs}, b.reps, b.device)
        b.record("forward_tokens_per_s", B * T / s["ours"], B * T / s["theirs"], "tok/s")
    if "train" in only:
        peak = matmul_peak(b.dtype, b.device)
        row = time_train_step(ours, theirs, b.ids, b.reps, b.device, peak)
        b.record("train_tokens_per_s", row["tokens_per_s_ours"], row["tokens_per_s_theirs"], "tok/s")
        b.res["mfu"], b.res["theirs"]["mfu"] = row["mfu_ours"], row["mfu_theirs"]
        b.res["matmul_peak_flops_per_s"] = peak
        print(f"{'mfu':28s} ours {b.res['mfu']:.1%}  transformers {b.res['theirs']['mfu']:.1%}  (counter: "
              f"{row['flops_per_step_actual']:.3e} FLOPs/step; matmul peak {peak / 1e9:.0f} GFLOP/s)", flush=True)


def bench_shapes(b: Bench, only: list[str]) -> None:
    """The training step at train.py's two window shapes (SHAPES): tokens/s of each, ours and theirs, and
    the long window's speed per token as a fraction of the short one's. Attention's FLOPs grow with the
    window, the rest's do not: the counter's FLOPs per token at each shape say how much of a slowdown
    the arithmetic itself explains."""
    ours, theirs = b.models(lora_rank=4)
    peak, gen, rows = matmul_peak(b.dtype, b.device), torch.Generator().manual_seed(1), {}
    for batch, length in SHAPES:
        ids = torch.randint(0, pad_id(), (batch, length), generator=gen).to(b.device)
        row = rows[f"{batch}x{length}"] = time_train_step(ours, theirs, ids, b.reps, b.device, peak)
        b.record(f"train_{batch}x{length}_tokens_per_s", row["tokens_per_s_ours"], row["tokens_per_s_theirs"], "tok/s")
        row["flops_per_token_actual"] = row["flops_per_step_actual"] / (batch * length)
    (short, s), (long, s_long) = ((f"{B_}x{T_}", rows[f"{B_}x{T_}"]) for B_, T_ in SHAPES)
    res = b.res["shapes"] = {"rows": rows}
    for who in ("ours", "theirs"):
        res[f"long_over_short_{who}"] = s_long[f"tokens_per_s_{who}"] / s[f"tokens_per_s_{who}"]
    res["flops_per_token_long_over_short"] = s_long["flops_per_token_actual"] / s["flops_per_token_actual"]
    print(f"{'':28s} {long} tokens/s over {short}'s: ours {res['long_over_short_ours']:.2f}, transformers "
          f"{res['long_over_short_theirs']:.2f}; the counter's FLOPs per token "
          f"{res['flops_per_token_long_over_short']:.2f}x", flush=True)


def bench_memory(b: Bench, only: list[str]) -> None:
    """The training step's peak memory, each side in a fresh child process."""
    o, t = (in_child(f"{who}:train", b.ckpt, b.dtype_name, b.device) for who in ("ours", "theirs"))
    b.record("train_peak_memory", o["peak_bytes"], t["peak_bytes"], "bytes")


def bench_generation(b: Bench, only: list[str]) -> None:
    """LLMTIME forecasting (32 series, 50 steps greedy, constrained) and batched greedy generation."""
    import qwen_min
    from experiments.lib.science.forecasting import ALPHABET

    ours, theirs = b.models()
    if (b.ckpt / "tokenizer.json").is_file():   # (a real checkpoint: its own tokenizer gives the same ids)
        assert allowed_ids() == [qwen_min.load_tokenizer(b.ckpt).encode(c)[0] for c in ALPHABET]
    if "forecast" in only:
        row = time_forecast(ours, theirs, b.fc_prompts, 50, 500, b.device)
        b.record("forecast_steps_per_s", row["steps_per_s_ours"], row["steps_per_s_theirs"], "steps/s")
    if "generate" in only:
        g_ours, g_theirs = generate_fns(ours, theirs, b.prompts, b.mask, NEW)
        s = alternate({"ours": g_ours, "theirs": g_theirs}, 1, b.device, warmup=False)
        b.record("generate_tokens_per_s", N_GEN * NEW / s["ours"], N_GEN * NEW / s["theirs"], "tok/s")


def bench_phases(b: Bench, only: list[str]) -> None:
    """Where the time goes, under torch.profiler: the no-grad forward above (LoRA models, 4 x 512)
    and one decode step of the 64-prompt generation above (plain models; 8 new tokens)."""
    vocab = json.loads((b.ckpt / "config.json").read_text())["vocab_size"]

    def breakdown(key: str, fns: tuple, models: tuple, per_decode_step: bool = False) -> None:
        b.res["phases"][key] = {who: profile_phases(fn, model, b.device, vocab, per_decode_step)
                                for who, fn, model in zip(("ours", "theirs"), fns, models, strict=True)}
        print_phases(f"{key} (ms per {'step' if per_decode_step else 'call'})", **b.res["phases"][key])

    models = b.models(lora_rank=4)
    breakdown("forward", forward_fns(*models, b.ids), models)
    models = b.models()
    breakdown("decode_step", generate_fns(*models, b.prompts, b.mask, 8), models, per_decode_step=True)


# Each part, run when --only names any of its keys (parts that share loaded models run together).
RUNS = ((("load",), bench_load), (("train", "forward"), bench_train_and_forward), (("shapes",), bench_shapes),
        (("memory",), bench_memory),
        (("forecast", "generate"), bench_generation), (("phases",), bench_phases))


def main(argv: list[str] | None = None) -> dict:
    from experiments.lib.run.devices import pick_device

    args = parse_args(argv)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else write_checkpoint(Path(tmp) / "qwen05", DTYPES[args.dtype])
        env = environment(device)
        print_environment(env)
        res: dict = {"environment": env, "dtype": args.dtype, "ours": {}, "theirs": {}, "ratios": {}, "phases": {}}
        bench = Bench(ckpt, args.dtype, device, args.reps, res)
        for keys, part in RUNS:
            if any(k in args.only for k in keys):
                part(bench, args.only)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    from experiments.lib.run import cli

    sys.exit(cli.run_as_script(main))

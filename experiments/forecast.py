"""Forecast the test systems with the untrained and the trained model, and with three baselines.

    python experiments/forecast.py --adapter runs/train/adapter             # untrained vs trained
    python experiments/forecast.py --max-systems 16 --samples 10 --out runs/forecast

For each system of --split: the prompt is the first --context-steps time steps (LLMTIME text ending
with ';'), the target the next --horizon steps. Every model sees the same prompts of the same
systems, so untrained vs trained is a paired comparison. Greedy forecasts, and with --samples S > 0
S sampled forecasts per system (one shared prefill) giving the median and a 10-90% band.
Baselines on the same prompts: last-value persistence, a linear autoregressive model and a
Rosenzweig-MacArthur ODE, each fitted to the prompt.

Generated text is decoded strictly with the run's encoding: a step with the wrong number of
decimals, no decimal point, an empty or extra field, or cut off by the token limit is malformed
at its own index. Every forecaster is scored on every step (malformed steps filled with the last
valid value), with coverage, the common-support MAE and a scale-free score against persistence;
see experiments/lib/science/metrics.py.

Files in --out: forecast_metrics.json (per model: coverage, filled-in MAE/MSE overall, over the
first 10 steps and per horizon step, common-support MAE, relative score, CRPS and band coverage
with --samples, all with standard errors over systems; paired differences), forecasts.h5 (per
model: forecasts, samples, in original units; the generated texts as string datasets; the encoding
to decode the texts again), examples.png and error_vs_horizon.png. Each is written whole (a temporary
name, then a rename): forecasts.h5 first, the plots, and forecast_metrics.json last, the mark that
the forecast is done (study.py counts a forecast as done by it), so a run killed or failing on the
way (a full disk) leaves no mark beside missing or half-written forecasts. Generation FLOPs are
reserved in the ledger before any model work and charged per generate call.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h5py
import numpy as np
from tqdm import tqdm

import qwen_min
from experiments.lib import errors, files, plots
from experiments.lib.budget import planning
from experiments.lib.budget.booking import Booking, reserve
from experiments.lib.run import cli, devices, folder, rundata
from experiments.lib.run.config import ForecastConfig
from experiments.lib.run.models import load_adapter, load_model
from experiments.lib.science import baselines, data, forecasting, llmtime, metrics


def parse_args(argv: list[str] | None = None) -> ForecastConfig:
    return cli.parse(ForecastConfig, argv, __doc__)


def build_parser() -> cli.ArgumentParser:
    """forecast.py's command line (``parse_args`` also builds the ForecastConfig it gives)."""
    return cli.parser(ForecastConfig, __doc__)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    if not cfg.no_baselines and cfg.context_steps <= baselines.AR_ORDER:
        raise errors.UsageError(f"--context-steps {cfg.context_steps}: the linear AR baseline needs at least "
                                f"{baselines.AR_ORDER + 1} prompt steps (or pass --no-baselines)")
    out = folder.start_run(cfg, "forecast")
    folder.seed_everything(cfg.seed)
    device = devices.pick_device(cfg.device)
    # with --adapter: its own splits, encoding and (checksum-checked) data file, wherever it was moved
    run_data = rundata.prepare_data(cfg, out, adapter=cfg.adapter, split=cfg.split,
                                    allow_other_data=cfg.allow_other_data)
    enc = run_data.encoding
    C, H = cfg.context_steps, cfg.horizon
    systems = run_data.systems(cfg.split, cfg.max_systems)
    try:
        examples = data.forecast_examples(run_data.trajectories, systems, enc, context_steps=C, horizon=H)
    except ValueError as e:
        raise errors.UsageError(f"--context-steps/--horizon: {e}") from None
    prompts = [e.prompt for e in examples]
    truth = np.stack([e.target for e in examples])      # (N, H, 2)
    series = run_data.trajectories[systems]             # (N, T, 2): the prompts' numbers, and the plots'
    last = series[:, C - 1]                             # (N, 2): the fill for malformed steps, persistence

    models = [] if (cfg.adapter and cfg.no_untrained) else [("untrained", None)]
    if cfg.adapter:
        models.append(("trained", cfg.adapter))

    # ---- plan: every row running to the token limit (exact with --run-to-limit, else an upper
    # bound), reserved before any model work
    tokenizer = qwen_min.load_tokenizer(cfg.model, revision=cfg.revision)
    shape = planning.meta_model(qwen_min.load_config(cfg.model, revision=cfg.revision))
    if cfg.adapter:
        load_adapter(shape, cfg)
    planned = len(models) * planning.forecast_plan(cfg, shape, tokenizer, prompts)
    reservation = reserve(cfg, planned, kind="forecast",
                               config={"models": [m for m, _ in models], "systems": len(systems)})
    bound = "" if cfg.run_to_limit else "at most "
    print(f"plan: {bound}{planned:.3e} FLOPs for {len(models)} model(s) x {len(systems)} systems", flush=True)

    # ---- the language models, greedy and (--samples) sampled; each generate call charged as it ends
    results: dict[str, dict[str, forecasting.ForecastRun]] = {}
    with Booking(reservation) as booking:  # closed on any exit, releasing what was not spent
        model, _ = load_model(cfg, device)
        for label, adapter in models:
            if adapter:
                load_adapter(model, cfg, run_data)
            model.eval()
            results[label] = {}
            for mode, S in [("greedy", 1)] + ([("samples", cfg.samples)] if cfg.samples else []):
                what = {"model": label, "adapter": adapter, "mode": mode, "samples": S, "horizon": H}
                with tqdm(total=len(prompts), desc=f"{label} {mode}", unit="system") as bar:
                    results[label][mode] = forecasting.forecast(
                        model, tokenizer, prompts, H, enc, batch_size=cfg.forecast_batch, num_samples=S,
                        temperature=0.0 if mode == "greedy" else cfg.temperature, top_p=cfg.top_p,
                        constrained=not cfg.unconstrained, seed=cfg.seed, device=device, progress=bar,
                        to_limit=cfg.run_to_limit,
                        on_call=lambda call, f, what=what: booking.charge(
                            f, kind="forecast", tokens=call["batch"] * call["num_samples"] * call["steps"],
                            config={**what, **call}))

    # ---- baselines on the same prompts
    forecasts = {k: v["greedy"].values[:, 0] for k, v in results.items()}
    samples = {f"{k}_median": v["samples"].values for k, v in results.items() if "samples" in v}
    bands = {}
    for name, s in samples.items():
        forecasts[name], bands[name] = metrics.median_and_band(s)
    if not cfg.no_baselines:
        t_prompt, t_future = run_data.time[:C], run_data.time[C:C + H]
        for name, fn in baselines.BASELINES.items():
            forecasts[name] = fn(series[:, :C], t_prompt, t_future)

    # ---- scores, paired comparisons, files
    scores = metrics.compare(forecasts, truth, last, samples=samples)
    if "ode_fit" in scores["summary"]:   # how the fit went: fallbacks to persistence, prompt fit error, seconds
        scores["summary"]["ode_fit"]["fit"] = baselines.ode_fit_diagnostics()
    for k, v in results.items():
        scores["summary"][k]["flops"] = sum(r.flops for r in v.values())
    report = {"systems": systems.tolist(), "split": cfg.split, "context_steps": C, "horizon": H,
              "dtype": devices.dtype_of(model),
              "data": {"path": run_data.data_path, "sha256": run_data.sha256}, "warnings": run_data.warnings,
              "encoding": asdict(enc), "fill_rule": metrics.FILL_RULE, "definitions": metrics.DEFINITIONS, **scores}
    # the forecasts first, the metrics last: forecast_metrics.json marks a forecast that is done
    save_forecasts(out / "forecasts.h5", enc, systems, truth, series[:, :C], run_data.time, forecasts, bands, results)
    try:
        with files.writing(out / "examples.png") as tmp:
            plots.plot_examples(tmp, series, C, forecasts, bands, system_ids=systems)
        with files.writing(out / "error_vs_horizon.png") as tmp:
            plots.plot_error_vs_horizon(tmp, scores["summary"])
    except ImportError as e:
        print(f"no plots: {e}")
    files.write_json(out / "forecast_metrics.json", report)
    print(headline(scores["summary"], H))
    return report


def headline(summary: dict[str, dict], horizon: int) -> str:
    """The table printed at the end: filled-in MAE (every step counts), coverage, relative score."""
    rows = [f"{'model':<18} {'MAE (filled)':>16} {'MAE h1-10':>10} {'coverage':>9} {'relative':>9}"]
    for name, r in summary.items():
        h10 = r.get("mae_h1_10", r["mae"]) if horizon > 10 else r["mae"]
        rows.append(f"{name:<18} {r['mae']:>9.4f} ±{r['mae_se'] or 0:.4f} {h10:>10.4f} {r['coverage']:>9.3f} "
                    f"{r['relative_score'] or float('nan'):>9.3f}")
    return "\n".join(rows)


def save_forecasts(path: Path, encoding: llmtime.EncodingConfig, systems: np.ndarray, truth: np.ndarray,
                   prompt: np.ndarray, time: np.ndarray, forecasts: dict[str, np.ndarray], bands: dict[str, np.ndarray],
                   lm_runs: dict[str, dict[str, forecasting.ForecastRun]]) -> None:
    """forecasts.h5: the systems, their truth and prompt, and per model its forecast (the language
    models also their samples and every generated text; medians their 10-90% band), in original
    units. The texts are string datasets ``<model>/greedy_texts`` (N, 1) and ``<model>/samples_texts``
    (N, S), UTF-8 (read with ``f[...].asstr()[()]``). The encoding is stored too (attribute
    ``encoding_json``), so the texts decode again. Written whole: a temporary file, then renamed."""
    with files.writing(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding_json"] = json.dumps(asdict(encoding))
        f["system_ids"], f["truth"], f["prompt"], f["time"] = systems, truth, prompt, time
        for name, pred in forecasts.items():
            g = f.create_group(name)
            g["forecast"] = pred
            if name in bands:
                g["band"] = bands[name]
            for mode, run in lm_runs.get(name, {}).items():
                if mode == "samples":
                    g["samples"] = run.values
                g.create_dataset(f"{mode}_texts", data=np.array(run.texts, dtype=object),
                                 dtype=h5py.string_dtype())


if __name__ == "__main__":
    sys.exit(cli.run_as_script(main))

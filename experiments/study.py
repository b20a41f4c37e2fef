"""The whole study as one budgeted, resumable command: does LoRA fine-tuning make Qwen2.5 forecast
predator-prey dynamics better?

    python experiments/study.py --preset cpu --model ./pretrained-qwen --data lv.h5   # a 2-core CPU
    python experiments/study.py --preset full                                         # the 1e17-FLOP study
    python experiments/study.py --preset cpu --dry-run                                # the plan, then stop

Runs, each a folder in --out and its own `python experiments/<script>.py` process:
  zeroshot_val, zeroshot_test  the untrained model and the baselines on validation and test systems
  grid/lr{lr}_r{rank}          learning rate x LoRA rank; each run keeps its best adapter by the
                               validation forecast score, evaluated every --eval-every steps
  context/ctx{L}               context lengths at the best (lr, rank), each seeing as many tokens as a
                               grid run (0 in a preset: one window holds prompt + horizon)
  final                        the best setting, for the preset's final steps (full: what the budget leaves)
  final_test                   the final adapter on the test systems, greedy and median of samples
  report.md, *.png             FLOP table (generation included, % of budget), the choices and the
                               scores they were made by, the test comparison, loss curves, forecasts

Every choice is made by the validation forecasts: the filled-in MAE of greedy forecasts of the first
--val-systems validation systems (the headline metric), with the relative score, the paired
difference to the untrained model per horizon block and the window cross-entropy beside it (CE is
not comparable across context lengths); the untrained model's figures on the same forecasts
(zeroshot_val) are shown beside them. Every training run evaluates at step 0 too, so each records
its paired differences to the untrained model. The final run evaluates step 0 too: if
its training does not beat the untrained model on the validation forecasts, the final adapter is
the untrained model (every LoRA B zero), and the report says so. The whole plan, generation included, is
priced by the FLOP counter and reserved in the ledger before anything runs, each choice not yet made
at its most expensive option; if what is left of the budget cannot pay for it, every training run's
steps are trimmed in proportion (--no-trim: refused). Once a choice is made, the runs that depend on
it are priced again before they start (plan.json: "bound" reserved, "flops" the price). Each run
is a config (experiments/lib/run/config.py), priced as it is, and started as the command line that
gives it back. Training steps and cross-entropy evaluations are priced exactly (the batches each run
draws); generation at its token limit, an upper bound: forecasts stop at the horizon, and the gap
between price and charge is that alone (the report shows both). Killed, the study continues where it stopped
when run again: finished runs are kept, an interrupted training run resumes from its checkpoint.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

import flops
import lora
import qwen_min
from experiments.lib import errors, files, reporting
from experiments.lib.budget import planning
from experiments.lib.run import checkpoint, cli, config, folder, metrics_log, rundata
from experiments.lib.run.config import ForecastConfig, RunConfig, TrainConfig, flag, same_as
from experiments.lib.run.flagtypes import SERIES, finite_positive_float, non_negative_int, positive_int, window_length
from experiments.lib.run.windows import forecast_set_of, prepare_windows
from experiments.lib.science import data

SCRIPTS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Preset:
    """The scale of a study."""

    lrs: tuple[float, ...] = (1e-5, 5e-5, 1e-4, 1e-3)
    ranks: tuple[int, ...] = (2, 4, 8)
    grid_context: int = 256             # tokens per training window in the grid
    grid_steps: int = 300               # optimizer steps of every grid run: past the early dip at 1e-3
    contexts: tuple[int, ...] = (256, 512, 0)        # 0: one window holds prompt + horizon; (): no context stage
    final_steps: int = 0                # 0: whatever the budget has left after everything else
    batch_size: int = 4
    eval_every: int = 50                # validation forecasts every N steps
    final_eval_every: int = 100
    eval_windows: int = 64              # validation windows whose CE is reported beside the forecasts
    val_systems: int = 32               # validation systems forecast for every choice
    test_systems: int = 150             # test systems of the final comparison (at most the split's size)
    context_steps: int = 50             # prompt length in time steps
    horizon: int = 50                   # forecast length in time steps
    samples: int = 20                   # sampled forecasts per test system (median and 10-90% band)
    train_config: dict = field(default_factory=dict)   # anything else for train.py (TrainConfig fields)


PRESETS = {
    # The original study's scale: grid and context runs of a few hundred steps, the final run taking
    # what the 1e17 budget has left. Meant for one GPU.
    "full": Preset(),
    # The same path scaled for a 2-core CPU and the 0.5B model: fewer cells with more steps each (every
    # grid run long enough to leave the early dip, where forecasts first get worse), the grid's window
    # as the context, and a final run of several hundred steps; choices on 32 validation systems.
    "cpu": Preset(lrs=(1e-4, 1e-3), ranks=(4,), grid_steps=150, contexts=(), final_steps=400, batch_size=4,
                  eval_every=50, final_eval_every=50, eval_windows=16, val_systems=32, test_systems=32, samples=4,
                  train_config={"val_systems": 32}),
    # Seconds on a tiny random checkpoint: for the study's own tests.
    "tiny": Preset(lrs=(1e-3, 3e-2), ranks=(2, 4), grid_context=64, grid_steps=2, contexts=(32, 0), final_steps=3,
                   batch_size=2, eval_every=1, final_eval_every=1, eval_windows=2, val_systems=2, test_systems=3,
                   context_steps=6, horizon=2, samples=2, train_config={"max_systems": 4, "val_systems": 2}),
}


def _override(name: str, kind: Callable[[str], Any], nargs: str | None = None) -> Any:
    return flag(None, f"override the preset's {name} (none: the preset's)", type=kind, nargs=nargs)


@dataclass(frozen=True)
class StudyConfig:
    """study.py: the study's scale (a preset, some of its values overridden) and what all its runs
    share, which are RunConfig's own flags."""

    preset: str = flag("cpu", "the study's scale (see above)", choices=tuple(sorted(PRESETS)))
    model: str = same_as(RunConfig, "model")
    revision: str | None = same_as(RunConfig, "revision")
    data: str | None = same_as(RunConfig, "data")
    out: str = same_as(RunConfig, "out", default="runs/study", help="the study's folder")
    device: str = same_as(RunConfig, "device")
    dtype: str = same_as(RunConfig, "dtype")
    seed: int = same_as(RunConfig, "seed")
    splits: tuple[float, float, float] = same_as(RunConfig, "splits")
    budget: float = same_as(RunConfig, "budget")
    ledger: str | None = same_as(RunConfig, "ledger", default=None, help="FLOP ledger (default: <out>/ledger.jsonl)")
    trim: bool = flag(True, "trim every training run's steps to fit the budget, or refuse")
    dry_run: bool = flag(False, "print the plan and stop")
    grid_steps: int | None = _override("grid_steps", positive_int)
    final_steps: int | None = _override("final_steps", non_negative_int)
    val_systems: int | None = _override("val_systems", positive_int)
    test_systems: int | None = _override("test_systems", positive_int)
    samples: int | None = _override("samples", non_negative_int)
    batch_size: int | None = _override("batch_size", positive_int)
    eval_every: int | None = _override("eval_every", positive_int)
    lrs: tuple[float, ...] | None = _override("learning rates of the grid", finite_positive_float, nargs="+")
    ranks: tuple[int, ...] | None = _override("LoRA ranks of the grid", positive_int, nargs="+")
    contexts: tuple[int | str, ...] | None = _override(
        f"context stage: window lengths in tokens or '{SERIES}' (one window holds prompt + horizon); the flag "
        "alone: no context stage", window_length, nargs="*")

    def __post_init__(self) -> None:
        config.check_fields(self)
        config.check_splits(self.splits)
        for name in ("lrs", "ranks", "contexts"):   # (a value twice would be two runs of one name)
            values = getattr(self, name)
            if values is not None and len(set(values)) < len(values):
                raise errors.UsageError(f"argument --{name}: {' '.join(map(str, values))}: each value at most once")

    def preset_values(self) -> Preset:
        """The preset, with the values this command line overrides."""
        overrides = {k: getattr(self, k) for k in ("grid_steps", "final_steps", "val_systems", "test_systems",
                                                    "samples", "batch_size", "eval_every", "lrs", "ranks")
                     if getattr(self, k) is not None}
        if self.contexts is not None:   # (a preset writes the whole-series window as 0)
            overrides["contexts"] = tuple(0 if c == SERIES else c for c in self.contexts)
        return replace(PRESETS[self.preset], **overrides)


def parse_args(argv: list[str] | None = None) -> StudyConfig:
    return cli.parse(StudyConfig, argv, __doc__)


def build_parser() -> cli.ArgumentParser:
    """study.py's command line (``parse_args`` also builds the StudyConfig it gives)."""
    return cli.parser(StudyConfig, __doc__)


# ---------------------------------------------------------------------------------------------
# The plan: every run with its config, priced before anything runs


@dataclass
class Item:
    """One run of the study: its script's config, and the FLOPs it may spend (reserved)."""

    stage: str
    name: str                       # its folder under --out, and its name in the ledger
    config: TrainConfig | ForecastConfig
    setting: dict = field(default_factory=dict)
    flops: float = 0.0              # its price: exact, but generation at its token limit (an upper bound)
    generation: float = 0.0         # the part of ``flops`` that is generation

    @property
    def script(self) -> str:
        """The script that runs it (its config's): "train" or "forecast"."""
        return self.config.script

    def plan_entry(self) -> dict:
        """Its line in plan.json: the config, and the command line that starts it (without the
        study's reservation)."""
        return {"stage": self.stage, "name": self.name, "script": self.script, "argv": config.to_argv(self.config),
                "config": asdict(self.config), "setting": self.setting, "flops": self.flops,
                "generation": self.generation}

    def done(self, out: Path) -> bool:
        """Whether the run finished: its script's last file is there (train.py's summary.json, written
        after the adapter and the last checkpoint; forecast.py's forecast_metrics.json, written after
        forecasts.h5 and the plots), each written whole, so a run killed before it is run again."""
        return (out / self.name / ("summary.json" if self.script == "train" else "forecast_metrics.json")).is_file()


class Study:
    def __init__(self, args: StudyConfig) -> None:
        self.args, self.out = args, Path(args.out)
        self.preset = args.preset_values()
        self.ledger_path = args.ledger or str(self.out / "ledger.jsonl")
        self.shape = planning.meta_model(qwen_min.load_config(args.model, revision=args.revision))
        self.tokenizer = qwen_min.load_tokenizer(args.model, revision=args.revision)
        self._prices: dict[tuple[RunConfig, int], tuple[float, float]] = {}
        self._windows: dict[int, tuple[rundata.RunData, data.Windows, data.Windows]] = {}
        # what every run of the study shares
        self.common = {"model": args.model, "revision": args.revision, "data": args.data, "device": args.device,
                       "dtype": args.dtype, "seed": args.seed, "splits": args.splits, "budget": args.budget,
                       "ledger": self.ledger_path}

    @functools.cached_property
    def forecast_window(self) -> int:
        """Tokens of the longest prompt + horizon of the validation systems forecast: a window that holds
        a whole forecast."""
        p = self.preset
        run_data = rundata.prepare_data(RunConfig(**self.common))
        examples = data.forecast_examples(run_data.trajectories, run_data.systems("val", p.val_systems),
                                          run_data.encoding, context_steps=p.context_steps, horizon=p.horizon)
        return max(len(self.tokenizer.encode(e.prompt + e.target_text)) for e in examples)

    def train_item(self, stage: str, name: str, lr: float, rank: int, context: int, steps: int, *,
                   eval_every: int, at_start: bool, preset: Preset) -> Item:
        p = preset
        cfg = TrainConfig(**self.common, out=str(self.out / name), name=name.replace("/", "_"), lr=lr, rank=rank,
                          context_length=context, max_steps=steps, batch_size=p.batch_size, eval_every=eval_every,
                          checkpoint_every=eval_every, patience=0, eval_windows=p.eval_windows,
                          val_forecast_systems=p.val_systems, context_steps=p.context_steps, horizon=p.horizon,
                          eval_at_start=at_start, **p.train_config)
        return Item(stage, name, cfg, {"lr": lr, "rank": rank, "context_length": context, "steps": steps})

    def forecast_item(self, name: str, split: str, adapter: str | None, preset: Preset) -> Item:
        p = preset
        cfg = ForecastConfig(**self.common, out=str(self.out / name), name=name, split=split,
                             max_systems=p.val_systems if split == "val" else p.test_systems,
                             context_steps=p.context_steps, horizon=p.horizon,
                             samples=p.samples if split == "test" else 0, adapter=adapter,
                             no_untrained=adapter is not None, no_baselines=adapter is not None)
        return Item("zeroshot" if adapter is None else "final", name, cfg, {"split": split, "adapter": adapter})

    def items(self, best: dict | None = None, context: int | None = None, final_steps: int | None = None, *,
              preset: Preset | None = None) -> list[Item]:
        """Every run, given the choices made so far; a choice not yet made is planned at its most
        expensive option (largest rank, the longest window), so the plan bounds what the study costs.
        ``preset``: at another scale than the study's own (a trimmed one, being tried)."""
        p = preset or self.preset
        lr, rank = (best["lr"], best["rank"]) if best else (max(p.lrs), max(p.ranks))
        window = self.forecast_window
        lengths = [c or window for c in p.contexts]       # (none: the context is the grid's)
        tokens = p.grid_steps * p.batch_size * p.grid_context        # each context run sees as many tokens
        out = [self.forecast_item("zeroshot_val", "val", None, p), self.forecast_item("zeroshot_test", "test", None, p)]
        out += [self.train_item("grid", f"grid/lr{g_lr:g}_r{g_rank}", g_lr, g_rank, p.grid_context, p.grid_steps,
                                eval_every=p.eval_every, at_start=True, preset=p)
                for g_lr in p.lrs for g_rank in p.ranks]
        for length in lengths:
            steps = max(1, tokens // (p.batch_size * length))
            out.append(self.train_item("context", f"context/ctx{length}", lr, rank, length, steps,
                                       eval_every=max(1, min(p.eval_every, steps // 2)), at_start=True, preset=p))
        final_context = context or max(lengths, default=p.grid_context)
        # (a preset whose final run takes what the budget leaves is first planned at one step; fit decides)
        out.append(self.train_item("final", "final", lr, rank, final_context, final_steps or p.final_steps or 1,
                                   eval_every=p.final_eval_every, at_start=True, preset=p))
        out.append(self.forecast_item("final_test", "test", str(self.out / "final" / "adapter"), p))
        for item in out:
            item.flops, item.generation = self.price(item, rank)
        return out

    def price(self, item: Item, rank: int) -> tuple[float, float]:
        """The FLOPs ``item`` may spend, by the same functions its script reserves with, and the part of
        them that is generation (priced at its token limit: it stops at the horizon, and spends less)."""
        cfg = item.config
        key = (cfg, rank)   # (a forecast of the final adapter: its config does not name the rank)
        if key not in self._prices:
            if item.script == "train":
                run_data, train, val = self.windows(cfg)
                forecasts = forecast_set_of(cfg, run_data, self.tokenizer)
                plan, _ = planning.train_plan(cfg, train, val, forecast_calls=forecasts and forecasts.calls)
                self._prices[key] = plan.total, plan.generation
            else:
                run_data = rundata.prepare_data(cfg)   # (the adapter not trained yet: the seed's splits)
                prompts = [e.prompt for e in data.forecast_examples(
                    run_data.trajectories, run_data.systems(cfg.split, cfg.max_systems), run_data.encoding,
                    context_steps=cfg.context_steps, horizon=cfg.horizon)]
                shape = planning.meta_model(self.shape.config)
                if cfg.adapter:  # priced at the rank it will have
                    lora.apply_lora(shape, rank=rank)
                price = planning.forecast_plan(cfg, shape, self.tokenizer, prompts)  # one model
                self._prices[key] = price, price
        return self._prices[key]

    def windows(self, cfg: TrainConfig) -> tuple[rundata.RunData, data.Windows, data.Windows]:
        """A training run's data and windows (every run of the study cuts the same systems, so they
        differ only by the window length: tokenized once per length)."""
        if cfg.context_length not in self._windows:
            self._windows[cfg.context_length] = prepare_windows(cfg, None, self.tokenizer)
        return self._windows[cfg.context_length]

    def final_steps_within(self, best: dict | None, context: int | None, left: float) -> int:
        """The most final-run steps (at the chosen setting; None: the most expensive) that, with the final
        test forecasts, cost at most ``left`` FLOPs ("the final run takes what the budget leaves"):
        arithmetic on the run's per-step prices (the batches it will draw) and its evaluations' price."""
        one = {i.name: i for i in self.items(best, context, 1)}
        final, test = one["final"], one["final_test"].flops
        cfg = final.config
        run_data, train, val = self.windows(cfg)
        forecasts = forecast_set_of(cfg, run_data, self.tokenizer)
        plan, _ = planning.train_plan(cfg, train, val, forecast_calls=forecasts and forecasts.calls)
        fixed = test + plan.full_eval + (plan.eval if cfg.eval_at_start else 0.0)   # whatever the step count
        if final.flops + test > left:
            raise errors.StudyError(f"the final run's first step and the test forecasts need "
                             f"{final.flops + test:.3e} FLOPs; the study's reservation has {left:.3e} left")
        costs, every = plan.costs, cfg.eval_every
        cheapest = costs.train_step(1) + (plan.eval / every if every else 0.0)
        n_max = int((left - fixed) / cheapest) + 1                    # no more steps than this can fit
        steps = np.cumsum(planning.step_costs(costs, train, n_max, cfg.seed))
        n = np.arange(1, n_max + 1)
        total = fixed + steps + ((n // every) * plan.eval if every else 0.0)
        return int(n[total <= left].max())


# ---------------------------------------------------------------------------------------------
# Running one item: a child process that dies with the study


def _die_with_parent() -> None:
    """In the child: SIGKILL when the study process dies, so a killed study leaves no orphan run."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def launch(cmd: list[str]) -> int:
    """Run one script to its end; its exit status."""
    return subprocess.run(cmd, preexec_fn=_die_with_parent if sys.platform == "linux" else None).returncode


def run_item(item: Item, out: Path, reservation: str) -> None:
    if item.done(out):
        print(f"[study] {item.name}: done before, kept", flush=True)
        return
    cfg = replace(item.config, reservation=reservation)
    run = out / item.name
    if item.script == "train" and checkpoint.exists(checkpoint.folder(run)):
        cfg = replace(cfg, resume=True)       # (interrupted after a checkpoint: continue it)
    elif (run / f"{item.script}_args.json").is_file():
        cfg = replace(cfg, overwrite=True)    # (interrupted before anything could be continued: start it again)
    cmd = [sys.executable, str(SCRIPTS / f"{item.script}.py"), *config.to_argv(cfg)]
    print(f"[study] {item.name}: python {' '.join(cmd[1:])}", flush=True)
    code = launch(cmd)
    if code != 0:
        raise errors.StudyError(f"{item.name} failed (exit status {code}); run the study again to continue")


def train_score(out: Path, item: Item, *, trained: bool = False) -> dict:
    """A finished training run's choice figures: its kept adapter's validation forecasts and CE.

    ``trained``: score it instead by its best evaluation *after* step 0, for comparing settings
    with each other. A grid cell still inside the early dip keeps the untrained model and would
    tie with every other such cell at the untrained model's MAE (the first of them winning by
    position); what a setting is judged by is what its training produced."""
    summary = json.loads((out / item.name / "summary.json").read_text())
    best, step = summary["best_val"], summary["best_step"]
    if trained:
        after = [e for e in metrics_log.read_rows(out / item.name, "val_forecast")
                 if e["step"] > 0 and e.get("mae") is not None]
        if after:
            best = min(after, key=lambda e: e["mae"])
            step = best["step"]
    return {"name": item.name, **item.setting, "score": best.get("mae"), "relative_score": best.get("relative_score"),
            "vs_untrained": best.get("vs_untrained"), "best_step": step, "val_loss": summary["val_loss"]}


def untrained_score(out: Path) -> dict:
    """The untrained model's figures on the same validation forecasts (zeroshot_val)."""
    m = json.loads((out / "zeroshot_val" / "forecast_metrics.json").read_text())["summary"]["untrained"]
    return {"name": "untrained", "lr": None, "rank": None, "context_length": None, "steps": 0,
            "score": m["mae"], "relative_score": m["relative_score"], "vs_untrained": None, "best_step": 0,
            "val_loss": None}


def best_of(rows: list[dict]) -> dict:
    """The lowest validation forecasts' filled-in MAE (a missing one counts as worst; ties: the first)."""
    return min(rows, key=lambda r: math.inf if r["score"] is None else r["score"])


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    study = Study(args)
    out, p = study.out, study.preset
    folder.claim_run(out)   # (a second study on this folder is refused; run again, this one continues)
    files.write_json(out / "study_args.json", {"argv": sys.argv, **asdict(args), "preset_values": asdict(p)})

    # ---- plan everything at the most expensive choices, fit it to the budget, reserve it
    ledger = flops.Ledger(study.ledger_path, budget=args.budget)
    ledger.settle()                                   # an earlier, killed invocation's reservation
    items = study.items()
    left = ledger.remaining()
    need = sum(i.flops for i in items if not i.done(out))
    if p.final_steps == 0 or need > left:             # the final run takes what is left, or all runs shrink
        items, study.preset = fit(study, items, left, trim=args.trim)   # (trimmed: every later plan at that scale)
    planned = sum(i.flops for i in items if not i.done(out))
    print_plan(items, out, ledger)
    bound = {i.name: i.flops for i in items}
    plan = {"items": [], "budget": args.budget, "bound": sum(bound.values()), "to_spend": planned,
            "spent_before": ledger.spent()}

    def write_plan(items: list[Item]) -> None:
        """plan.json: every run at its price given the choices made so far ("flops"), beside the bound
        reserved before anything ran ("bound")."""
        plan["items"] = [i.plan_entry() | {"bound": bound[i.name]} for i in items]
        plan["planned_flops"] = sum(i.flops for i in items)
        files.write_json(out / "plan.json", plan)

    write_plan(items)
    if args.dry_run:
        return out / "plan.json"
    t0 = time.time()
    with ledger.reserve(planned, name="study", kind="study", config={"preset": args.preset, "out": str(out)}) as r:
        by_name = {i.name: i for i in items}
        for name in ("zeroshot_val", "zeroshot_test"):
            run_item(by_name[name], out, r.id)
        untrained = untrained_score(out)
        grid = [i for i in items if i.stage == "grid"]
        for item in grid:
            run_item(item, out, r.id)
        grid_scores = [train_score(out, i, trained=True) for i in grid]
        best = best_of(grid_scores)
        print(f"[study] best of the grid: lr {best['lr']:g}, rank {best['rank']} (validation MAE "
              f"{best['score']}; untrained {untrained['score']})", flush=True)
        final_steps = by_name["final"].setting["steps"]
        items = study.items(best=best, final_steps=final_steps)   # re-priced at the chosen rank
        write_plan(items)
        contexts = [i for i in items if i.stage == "context"]
        for item in contexts:
            run_item(item, out, r.id)
        context_scores = [train_score(out, i, trained=True) for i in contexts]
        context = best_of(context_scores)["context_length"] if context_scores else p.grid_context
        print(f"[study] best context length: {context} tokens", flush=True)
        if p.final_steps == 0:   # the final run takes what the reservation has left (as first decided, if resumed)
            started = out / "final" / "train_args.json"
            final_steps = (json.loads(started.read_text())["max_steps"] if started.is_file() else
                           study.final_steps_within(best, context, reservation_left(ledger, r.id)))
        items = study.items(best=best, context=context, final_steps=final_steps)
        write_plan(items)
        for item in items:
            if item.stage == "final":
                run_item(item, out, r.id)
        by_name = {i.name: i for i in items}
    choices = {"untrained": untrained, "grid": grid_scores, "best": best, "contexts": context_scores,
               "context_length": context, "final": train_score(out, by_name["final"]) | {
                   "context_length": context, "lr": best["lr"], "rank": best["rank"]}}
    files.write_json(out / "choices.json", choices)
    return reporting.write_study_report(out, ledger=ledger, plan=plan, choices=choices,
                              seconds=time.time() - t0, model=args.model)


def reservation_left(ledger: flops.Ledger, reservation: str) -> float:
    """What the study's reservation still holds (its runs charge it from their own processes)."""
    return next(x for x in ledger.reservations() if x.id == reservation).unspent


def fit(study: Study, items: list[Item], left: float, *, trim: bool) -> tuple[list[Item], Preset]:
    """Fit the plan to what is left of the budget: the final run gets what the others leave (a preset
    without final steps); when the plan does not fit, every training run's steps shrink (the
    evaluations' and forecasts' costs do not, so the scale is found in a few rounds). The plan, and
    the preset at the scale it was made at (the study's own, or trimmed)."""
    p = study.preset
    todo = [i for i in items if not i.done(study.out)]
    final = next(i for i in items if i.name == "final")
    others = sum(i.flops for i in todo if i.stage != "final")   # (the final run and its test forecasts apart)
    if p.final_steps == 0 and others + sum(i.flops for i in study.items(final_steps=1) if i.stage == "final") <= left:
        return study.items(final_steps=study.final_steps_within(None, None, left - others)), p
    need = sum(i.flops for i in todo)
    refusal = f"the plan needs {need:.3e} FLOPs but {left:.3e} are left of {study.args.budget:.3e}"
    if not trim:
        raise flops.BudgetExceeded(refusal + "; without --no-trim its training runs are trimmed to fit")
    scale, final_steps, trimmed = 1.0, p.final_steps or final.setting["steps"], p
    for _ in range(10):
        need = sum(i.flops for i in items if not i.done(study.out))
        if need <= left:
            print(f"[study] every training run's steps trimmed to {scale:.0%} to fit the budget", flush=True)
            return items, trimmed
        fixed = sum(i.flops for i in items if i.script == "forecast" and not i.done(study.out))
        scale *= (left - fixed) / (need - fixed) if left > fixed else 0.0   # (steps round down: fits, or again)
        if scale * p.grid_steps < 1:
            break
        trimmed = replace(p, grid_steps=max(1, int(p.grid_steps * scale)), final_steps=max(1, int(final_steps * scale)))
        items = study.items(preset=trimmed)
    raise flops.BudgetExceeded(refusal + ", even with every training run trimmed to one step")


def print_plan(items: list[Item], out: Path, ledger: flops.Ledger) -> None:
    total = sum(i.flops for i in items)
    print(f"[study] plan: {len(items)} runs, at most {total:.3e} FLOPs ({total / ledger.budget:.2%} of the budget, "
          f"every choice not yet made at its most expensive option); {ledger.spent():.3e} spent before", flush=True)
    for i in items:
        print(f"  {i.name:<24} {i.script:<9} {i.flops:.3e}  {'done' if i.done(out) else 'to run'}", flush=True)


if __name__ == "__main__":
    sys.exit(cli.run_as_script(main))

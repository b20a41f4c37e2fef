"""study.py on the tiny checkpoint with the tiny preset: every choice follows the validation forecast
scores, the ledger holds exactly what the runs charged, which is the plan (each run priced once
its choices were made, within the bound reserved first and the budget). A study killed mid-way, and
at many other moments, continuing where it stopped: tests/test_study_crash.py."""

from __future__ import annotations

import json
import re
import runpy
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

import flops
from experiments import report, study
from experiments.lib import errors, plots
from experiments.lib.run import cli
from experiments.lib.run.config import ForecastConfig, TrainConfig
from experiments.lib.science import llmtime
from experiments.lib.science.lotka_volterra import load_h5
from experiments.lib.training import evaluation
from flops import Ledger
from tests.conftest import keep_returns
from tests.number_writer import hand_forecasts, hand_paired, hand_scores

ROOT = Path(__file__).resolve().parent.parent


def _argv(ckpt: Path, data: Path, out: Path) -> list[str]:
    return ["--preset", "tiny", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--dtype", "fp32",
            "--device", "cpu"]


def _in_process(cmd: list[str]) -> int:
    """study.launch, but in this process (so the test's patches apply): cmd = [python, script, *argv]."""
    saved = sys.argv
    sys.argv = cmd[1:]
    try:
        runpy.run_path(cmd[1], run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = saved


def test_every_choice_follows_the_validation_forecasts_and_the_ledger_holds_what_ran(tmp_path, tiny_ckpt,
                                                                                     lv_data_file, monkeypatch,
                                                                                     number_writer):
    # Every run's model writes numbers (tests/number_writer.py: the untrained texts while every LoRA B is
    # zero, the trained ones after), the same whatever the setting, so the MAE that chooses is scripted
    # per run: each run's base, a little better at each evaluation (so its last is its best); every other
    # figure is what the texts score, checked by hand below
    preset = study.PRESETS["tiny"]
    C, H = preset.context_steps, preset.horizon
    number_writer(H)
    example_figs = keep_returns(monkeypatch, plots, "plot_examples")
    curve_figs = keep_returns(monkeypatch, plots, "plot_loss_curves")
    base = {"grid_lr0.001_r2": 0.7, "grid_lr0.001_r4": 0.9, "grid_lr0.03_r2": 0.8, "grid_lr0.03_r4": 0.95,
            "context_ctx32": 0.85, "final": 0.5}   # any other context run: 0.6
    real, calls = evaluation.score_forecasts, {}

    def scripted(*args, **kwargs):
        figures = real(*args, **kwargs)   # the real forecasts still run, and are charged
        name = sys.argv[sys.argv.index("--name") + 1]
        calls[name] = calls.get(name, 0) + 1
        return figures | {"mae": base.get(name, 0.6) - 0.01 * calls[name]}

    monkeypatch.setattr(evaluation, "score_forecasts", scripted)
    monkeypatch.setattr(study, "launch", _in_process)
    out = tmp_path / "study"
    study.main(_argv(tiny_ckpt, lv_data_file, out))

    choices = json.loads((out / "choices.json").read_text())
    assert (choices["best"]["lr"], choices["best"]["rank"]) == (0.001, 2)          # the lowest grid score
    window = study.Study(study.parse_args(_argv(tiny_ckpt, lv_data_file, out))).forecast_window
    assert window != 32 and choices["context_length"] == window                   # 0.6 beats ctx32's 0.85
    final = json.loads((out / "final" / "train_args.json").read_text())
    assert (final["lr"], final["rank"], final["context_length"]) == (0.001, 2, window)
    for r in choices["grid"] + choices["contexts"]:   # each run kept its best (last) evaluation
        name = r["name"].replace("/", "_")
        assert r["score"] == pytest.approx(base.get(name, 0.6) - 0.01 * calls[name])
    # the final run evaluated the untrained model at step 0 too, and kept its last evaluation
    assert calls["final"] == 4 and choices["final"]["best_step"] == 3
    assert "Chosen: lr 0.001, rank 2." in (out / "report.md").read_text()

    # the ledger: every FLOP charged by one of the planned runs, within the plan and the budget
    plan = json.loads((out / "plan.json").read_text())
    ledger = Ledger(out / "ledger.jsonl")
    names = {i["name"].replace("/", "_") for i in plan["items"]}
    entries = ledger.entries()
    assert {e.name for e in entries} == names
    spent = ledger.spent()
    assert spent == pytest.approx(sum(e.flops for e in entries), rel=1e-12)
    # each run's price, made once its choices were, holds what it charged, and the bound reserved before
    # anything ran held the price, within the budget; the only gap is generation stopping at the horizon:
    # every training step and cross-entropy evaluation charged exactly its price
    assert spent <= plan["planned_flops"] * (1 + 1e-9)
    assert plan["planned_flops"] <= plan["bound"] * (1 + 1e-9) and plan["bound"] <= plan["budget"]
    for item in plan["items"]:
        mine = [e for e in entries if e.name == item["name"].replace("/", "_")]
        generated = sum(e.flops for e in mine if e.kind == "forecast" or "forecast" in e.config)
        charged = sum(e.flops for e in mine)
        assert charged - generated == pytest.approx(item["flops"] - item["generation"], rel=1e-9), item["name"]
        assert 0 < generated <= item["generation"] * (1 + 1e-9), item["name"]
        assert charged <= item["bound"] * (1 + 1e-9), item["name"]
    # the study runs no forecast to its token limit: accounting does not change what runs
    assert all("--run-to-limit" not in i["argv"] for i in plan["items"])
    # runs after the grid were first priced at its largest rank (4), then at the chosen one (2)
    assert all(i["flops"] < i["bound"] for i in plan["items"] if i["stage"] in ("context", "final"))
    [reservation] = ledger.reservations()
    assert reservation.status == "closed" and reservation.charged == pytest.approx(spent, rel=1e-12)

    # the forecasts, by hand: the writer's texts after each system's prompt, decoded with the study's alpha
    traj, _ = load_h5(lv_data_file)
    alpha = llmtime.EncodingConfig.load(out / "zeroshot_val" / "encoding.json").alpha
    splits = json.loads((out / "zeroshot_val" / "splits.json").read_text())

    def by_hand(split: str, n: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        series = traj[splits[split][:n]]
        return series[:, C:C + H], series[:, C - 1], {
            who: hand_forecasts(series, alpha, C, H, who)[1] for who in ("untrained", "trained")} | {
            f"{who}_samples": np.stack([hand_forecasts(series, alpha, C, H, who, k)[1]
                                        for k in range(preset.samples)], axis=1) for who in ("untrained", "trained")}

    # the untrained model on the validation systems (zeroshot_val), which every choice is shown beside
    truth, last, hand = by_hand("val", preset.val_systems)
    zeroshot = json.loads((out / "zeroshot_val" / "forecast_metrics.json").read_text())
    assert zeroshot["systems"] == splits["val"][:preset.val_systems]
    mine = hand_scores(hand["untrained"], truth, last)
    assert zeroshot["summary"]["untrained"]["mae"] == pytest.approx(mine["mae"], rel=1e-12)
    assert choices["untrained"]["score"] == pytest.approx(mine["mae"], rel=1e-12)
    # every training run's evaluations after step 0: the trained texts' paired difference to step 0's
    paired = hand_paired(hand["trained"], hand["untrained"], truth, last)
    for item in plan["items"]:
        if item["script"] == "train":
            rows = [json.loads(x) for x in (out / item["name"] / "metrics.jsonl").read_text().splitlines()]
            later = [r for r in rows if r["kind"] == "val_forecast" and r["step"] > 0]
            assert later and all(r["coverage"] == pytest.approx(hand_scores(hand["trained"], truth, last)["coverage"])
                                 for r in later)
            for r in later:
                assert r["vs_untrained"]["mae_diff"] == pytest.approx(paired["mae_diff"], rel=1e-12), item["name"]
                assert r["vs_untrained"]["se"] == pytest.approx(paired["se"], rel=1e-12), item["name"]
                assert r["vs_untrained"]["better"] == paired["better"], item["name"]
                assert r["vs_untrained"]["median"] == pytest.approx(paired["median"], rel=1e-12), item["name"]

    # the test systems: test_metrics.json scores the untrained model (zeroshot_test) beside the final
    # adapter (final_test, trained: its best evaluation was step 3), figures by hand
    truth, last, hand = by_hand("test", preset.test_systems)
    assert json.loads((out / "final_test" / "forecast_metrics.json").read_text())["systems"] == \
        splits["test"][:preset.test_systems]
    test = json.loads((out / "test_metrics.json").read_text())
    for who in ("untrained", "trained"):
        mine = hand_scores(hand[who], truth, last)
        assert 0 < mine["coverage"] <= 1 and np.isfinite(hand[who]).any()
        got = test["summary"][who]
        for figure, key in (("mae", "mae"), ("mae_se", "mae_se"), ("coverage", "coverage"),
                            ("relative_score", "relative")):
            assert got[figure] == pytest.approx(mine[key], rel=1e-12), (who, figure)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # (a step no sample wrote has no median)
            median = np.nanmedian(hand[f"{who}_samples"], axis=1)
        assert test["summary"][f"{who}_median"]["mae"] == pytest.approx(hand_scores(median, truth, last)["mae"],
                                                                         rel=1e-12)
    d, mine = test["paired"]["trained - untrained"], hand_paired(hand["trained"], hand["untrained"], truth, last)
    assert d["mae_diff"] == pytest.approx(mine["mae_diff"], rel=1e-12)
    assert d["mae_diff_se"] == pytest.approx(mine["se"], rel=1e-12) and d["better"] == mine["better"]
    # the report's example plot draws those forecasts
    fig = example_figs[-1]
    for i in range(preset.test_systems):
        for v in range(2):
            lines = {ln.get_label(): ln for ln in fig.axes[2 * i + v].lines}
            for who in ("untrained", "trained"):
                assert np.array_equal(lines[who].get_ydata(), hand[who][i, :, v], equal_nan=True)

    # report.py over the study's folder: the ledger's table, every training run, the loss curves
    curve_figs.clear()
    md = report.main(["--runs", str(out), "--ledger", str(out / "ledger.jsonl"), "--out", str(tmp_path / "report")])
    text = md.read_text()
    assert "## FLOPs by experiment" in text and all(f"| {out / i['name']} |" in text
                                                     for i in plan["items"] if i["script"] == "train")
    assert (tmp_path / "report" / "flops.csv").read_text().count("\n") >= len(ledger.entries()) + 1
    # the loss curves: every training run's training losses and validation-forecast MAEs, as its
    # metrics.jsonl holds them, each drawn once; and the PNG is that figure drawn
    [fig] = curve_figs
    drawn = sorted((tuple(ln.get_xdata()), tuple(ln.get_ydata())) for ax in fig.axes for ln in ax.lines
                   if ln.get_linestyle() == "-")
    logged = []
    for item in (i for i in plan["items"] if i["script"] == "train"):
        rows = [json.loads(x) for x in (out / item["name"] / "metrics.jsonl").read_text().splitlines()]
        for kind, key in (("train", "loss"), ("val_forecast", "mae")):
            pts = [(r["step"], r[key]) for r in rows if r["kind"] == kind]
            logged.append((tuple(s for s, _ in pts), tuple(y for _, y in pts)))
    assert drawn == sorted(logged)
    from matplotlib import image

    img = image.imread(tmp_path / "report" / "loss_curves.png")
    width, height = (fig.get_size_inches() * 110).astype(int)   # (saved at 110 dpi, cropped tight)
    assert img.ndim == 3 and abs(img.shape[1] - width) < 0.2 * width and abs(img.shape[0] - height) < 0.2 * height
    assert img[..., :3].std() > 0.05


def test_a_plan_the_budget_cannot_pay_for_is_trimmed_or_refused(tmp_path, tiny_ckpt, lv_data_file):
    argv = _argv(tiny_ckpt, lv_data_file, tmp_path / "plan") + ["--dry-run"]
    full = json.loads(study.main(argv).read_text())
    for item in full["items"]:   # each run's command line gives its config back, as its script parses it
        kind = TrainConfig if item["script"] == "train" else ForecastConfig
        assert json.loads(json.dumps(asdict(cli.parse(kind, item["argv"])))) == item["config"], item["name"]
    budget = full["planned_flops"] * 0.6
    refusal = f"needs {full['planned_flops']:.3e} FLOPs but {budget:.3e} are left"
    with pytest.raises(flops.BudgetExceeded, match=re.escape(refusal)):
        study.main(_argv(tiny_ckpt, lv_data_file, tmp_path / "refused") + ["--budget", str(budget), "--no-trim"])
    # a final run of 10 steps does not fit in 1.05 x the 3-step plan: the training runs shrink until it does
    budget = full["planned_flops"] * 1.05
    trimmed = json.loads(study.main(_argv(tiny_ckpt, lv_data_file, tmp_path / "trimmed")
                                    + ["--budget", str(budget), "--final-steps", "10", "--dry-run"]).read_text())
    steps = {i["name"]: i["setting"].get("steps") for i in trimmed["items"]}
    assert 3 <= steps["final"] < 10 and full["planned_flops"] <= trimmed["planned_flops"] <= budget


def test_the_grid_and_the_context_stage_can_be_chosen_on_the_command_line(tmp_path, tiny_ckpt, lv_data_file):
    base = _argv(tiny_ckpt, lv_data_file, tmp_path / "s") + ["--dry-run"]
    plan = json.loads(study.main(base + ["--lrs", "0.01", "0.002", "--ranks", "3", "--contexts", "40", "series",
                                         "--splits", "0.6", "0.2", "0.2"]).read_text())
    items = {i["name"]: i for i in plan["items"]}
    assert all(i["config"]["splits"] == [0.6, 0.2, 0.2] for i in plan["items"])   # every run's, as given
    assert [n for n in items if n.startswith("grid/")] == ["grid/lr0.01_r3", "grid/lr0.002_r3"]
    assert items["grid/lr0.002_r3"]["config"]["lr"] == 0.002 and items["grid/lr0.002_r3"]["config"]["rank"] == 3
    # the context stage at the most expensive choice (the largest lr, the one rank); 'series': the window
    # of a whole forecast's text, the tiny preset's own 0
    tiny = json.loads(study.main(_argv(tiny_ckpt, lv_data_file, tmp_path / "t") + ["--dry-run"]).read_text())
    series = [i for i in tiny["items"] if i["stage"] == "context"][-1]["setting"]["context_length"]
    contexts = [i for i in plan["items"] if i["stage"] == "context"]
    assert [i["setting"]["context_length"] for i in contexts] == [40, series] and series > 64
    assert all(i["config"]["rank"] == 3 and i["config"]["lr"] == 0.01 for i in contexts)
    # the flag alone: no context stage, the final run at the grid's window
    plan = json.loads(study.main(_argv(tiny_ckpt, lv_data_file, tmp_path / "n") + ["--dry-run", "--contexts"])
                      .read_text())
    assert not [i for i in plan["items"] if i["stage"] == "context"]
    assert next(i for i in plan["items"] if i["name"] == "final")["config"]["context_length"] == 64
    before = sorted((f.name, f.stat().st_mtime_ns) for f in (tmp_path / "s").iterdir())
    for bad, needle in ((["--ranks", "0"], "--ranks: 0: must be at least 1"),
                        (["--lrs", "0"], "--lrs: 0: must be a finite number above 0"),
                        (["--ranks", "2", "2"], "--ranks: 2 2: each value at most once"),
                        (["--contexts", "1"], "--contexts: 1: must be"),
                        (["--lrs"], "--lrs: expected at least one argument"),
                        (["--splits", "0.5", "0.2", "0.2"], "--splits: 0.5 0.2 0.2: must be three")):
        with pytest.raises(errors.UsageError, match=re.escape(needle)):
            study.main(base + bad)
    assert sorted((f.name, f.stat().st_mtime_ns) for f in (tmp_path / "s").iterdir()) == before   # (untouched)


def test_a_preset_whose_final_run_takes_what_the_budget_leaves_is_planned(tiny_ckpt, lv_data_file, tmp_path):
    # (--preset full's way: final_steps 0. Before configs, its first plan asked train.py for --max-steps 0
    # and the study stopped there, refused)
    budget = 3e13
    plan = json.loads(study.main(_argv(tiny_ckpt, lv_data_file, tmp_path / "s") + [
        "--final-steps", "0", "--budget", str(budget), "--dry-run"]).read_text())
    final = next(i for i in plan["items"] if i["name"] == "final")
    assert final["setting"]["steps"] > 3 and final["config"]["max_steps"] == final["setting"]["steps"]
    assert plan["planned_flops"] <= budget and plan["planned_flops"] > 0.9 * budget   # (it took what was left)


def test_the_final_run_takes_what_the_reservation_leaves(tiny_ckpt, lv_data_file, tmp_path):
    # the full preset's final run: as many steps as the chosen setting's price allows
    s = study.Study(study.parse_args(_argv(tiny_ckpt, lv_data_file, tmp_path / "study")))
    best = {"lr": 1e-3, "rank": 2}

    def cost(steps: int) -> float:   # the final run and its test forecasts
        return sum(i.flops for i in s.items(best, 32, steps) if i.stage == "final")

    assert cost(7) < cost(8)
    assert s.final_steps_within(best, 32, (cost(7) + cost(8)) / 2) == 7
    assert s.final_steps_within(best, 32, cost(8)) == 8
    with pytest.raises(errors.StudyError, match="the final run's first step and the test forecasts need"):
        s.final_steps_within(best, 32, cost(1) * 0.99)


def test_grid_cells_inside_the_dip_are_compared_by_what_their_training_produced(tmp_path: Path) -> None:
    # Both cells keep the untrained model (best_step 0, the same MAE); by position the first would win.
    # Scored by their best evaluation after step 0, the second (0.48 at step 150) beats the first (1.10).
    untrained = {"mae": 0.398, "relative_score": 0.61, "vs_untrained": None}
    evals = {"lr1e-4": [(50, 1.37), (100, 1.65), (150, 1.10)], "lr1e-3": [(50, 1.85), (100, 0.66), (150, 0.48)]}
    items = []
    for name, rows in evals.items():
        d = tmp_path / "grid" / name
        d.mkdir(parents=True)
        lines = [{"step": 0, "kind": "val_forecast", **untrained}] + [
            {"step": s, "kind": "val", "loss": 0.7} for s, _ in rows] + [
            {"step": s, "kind": "val_forecast", "mae": m, "relative_score": 1.0,
             "vs_untrained": {"mae_diff": m - 0.398, "se": 0.1, "better": 3, "systems": 32, "blocks": {}}}
            for s, m in rows]
        (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
        (d / "summary.json").write_text(json.dumps({"best_val": untrained, "best_step": 0, "val_loss": 0.8}))
        items.append(study.Item(stage="grid", name=f"grid/{name}", config=TrainConfig(),
                                setting={"lr": float(name[2:]), "rank": 4}))
    kept = [study.train_score(tmp_path, i) for i in items]
    assert [k["score"] for k in kept] == [0.398, 0.398] and study.best_of(kept)["lr"] == 1e-4   # the tie
    scored = [study.train_score(tmp_path, i, trained=True) for i in items]
    assert [(s["score"], s["best_step"]) for s in scored] == [(1.10, 150), (0.48, 150)]
    assert study.best_of(scored)["lr"] == 1e-3
    assert scored[1]["vs_untrained"]["mae_diff"] == pytest.approx(0.48 - 0.398)

"""The report tables: per-block MAE, paired per-block differences and the lever table, against
figures worked out by hand from constructed forecasts and run folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments.lib import reporting
from experiments.lib.science import metrics


def test_forecast_table_shows_blocks_and_paired_blocks_by_hand() -> None:
    # 2 systems, 50 steps, 2 variables; truth 0, last prompt value 1 (persistence errs by 1 everywhere).
    N, H = 2, 50
    truth, last = np.zeros((N, H, 2)), np.ones((N, 2))
    untrained = np.full((N, H, 2), 0.5)
    trained = untrained.copy()
    trained[0, :10, 0] = 0.1      # system 0, prey, h1-10: error 0.1 instead of 0.5
    trained[1, 10:25, :] = 0.9    # system 1, both variables, h11-25: error 0.9 instead of 0.5
    scores = metrics.compare({"untrained": untrained, "trained": trained}, truth, last)
    text = reporting.forecast_table(scores)
    rows = [ln.strip("| ").split(" | ") for ln in text.splitlines() if ln.startswith("| trained |")]
    assert len(rows) == 2                                    # the headline table, then the block table
    # prey h1-10 over both systems: (0.1 + 0.5) / 2 = 0.3; h11-25: (0.5 + 0.9) / 2 = 0.7; h26-50 untouched
    assert rows[1][1:] == ["0.3", "0.7", "0.5", "0.5", "0.7", "0.5"]   # prey, then predator, per block
    # h1-10 per system: system 0 -0.2 (prey -0.4, predator 0), system 1 0 -> mean -0.1, SE 0.1, 1 of 2 better,
    # median of two: their mean
    paired = [ln for ln in text.splitlines() if ln.startswith("| trained - untrained |")][0]
    cells = paired.strip("| ").split(" | ")
    assert cells[1] == "-0.100 ± 0.100 (1/2, median -0.100)"
    assert cells[2] == "+0.200 ± 0.200 (0/2, median +0.200)"            # h11-25: system 1 +0.4, system 0 0
    assert cells[3] == "+0.000 ± 0.000 (0/2, median +0.000)"
    # h1-50: system 0 -0.4 x 10 / 100 = -0.04, system 1 +0.4 x 30 / 100 = +0.12: mean +0.04, SE 0.08
    assert cells[4] == "+0.040 ± 0.080 (1/2, median +0.040)"


def test_evaluation_line_shows_mean_se_count_and_median_by_hand() -> None:
    # 3 systems, 50 steps, truth 0: the untrained model errs by 1 everywhere; the trained one by 0 on
    # systems 0 and 1 in h1-10 and by 4 on system 2 there (its phase drifted), 1 elsewhere
    truth, last = np.zeros((3, 50, 2)), np.full((3, 2), 2.0)
    untrained, trained = np.ones((3, 50, 2)), np.ones((3, 50, 2))
    trained[:2, :10] = 0.0
    trained[2, :10] = 4.0
    d = metrics.paired_difference(trained, untrained, truth, last)
    # h1-10 per system: -1, -1, +3 -> mean +1/3, SE sd([-1, -1, 3]) / sqrt(3) = (4 / sqrt(3)) / sqrt(3) = 4/3,
    # 2 of 3 better, median -1: the mean says worse, the median and the count say most systems improved
    assert d["blocks"]["h1_10"]["median"] == -1.0 and d["blocks"]["h1_10"]["better"] == 2
    # overall per system: -10/50, -10/50, +30/50 -> mean 1/15, median -0.2
    assert d["median"] == -0.2
    figures = {"mae": 0.8, "relative_score": 0.4, "vs_untrained": {
        "mae_diff": d["mae_diff"], "se": d["mae_diff_se"], "better": d["better"], "median": d["median"],
        "systems": 3, "blocks": d["blocks"]}}
    assert reporting.evaluation_line(300, figures) == (
        "step 300: val MAE 0.8, relative score 0.4; vs untrained "
        "h1–10 +0.333 ± 1.333 (2/3, median -1.000), h11–25 +0.000 ± 0.000 (0/3, median +0.000), "
        "h26–50 +0.000 ± 0.000 (0/3, median +0.000), all +0.067 ± 0.267 (2/3, median -0.200)")
    assert reporting.evaluation_line(0, {"mae": 0.8, "relative_score": 0.4, "vs_untrained": figures["vs_untrained"]}) \
        == "step 0 (untrained): val MAE 0.8, relative score 0.4"


def test_lever_table_reads_the_kept_evaluation(tmp_path: Path) -> None:
    run = tmp_path / "lr1e-3"
    run.mkdir()
    blocks = {"h1_10": {"mae_diff": -0.25, "se": 0.093, "better": 25},
              "h11_25": {"mae_diff": -0.127, "se": 0.115, "better": 19},
              "h26_50": {"mae_diff": 0.05, "se": 0.2, "better": 12}}
    lines = [{"step": 0, "kind": "val_forecast", "mae": 0.4, "vs_untrained": None},
             {"step": 300, "kind": "val_forecast", "mae": 0.3,
              "vs_untrained": {"mae_diff": -0.1, "se": 0.05, "better": 21, "systems": 32,
                               "blocks": {k: {**v, "mae_diff": 9.0} for k, v in blocks.items()}}},
             {"step": 300, "kind": "train", "loss": 0.5},
             {"step": 600, "kind": "val_forecast", "mae": 0.2,
              "vs_untrained": {"mae_diff": -0.188, "se": 0.134, "better": 21, "median": -0.2, "systems": 32,
                               "blocks": blocks}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    (run / "summary.json").write_text(json.dumps({"steps": 600, "best_step": 600, "flops": 2.5e15, "wall_s": 3000}))
    (run / "train_args.json").write_text(json.dumps({"lr": 1e-3, "schedule": "cosine", "rank": 4,
                                                      "context_length": 256, "train_lm_head_bias": False}))
    row = reporting.lever_table([run]).splitlines()[2].strip("| ").split(" | ")
    assert row == ["lr1e-3", "0.001", "cosine", "4", "256", "no", "600", "600", "0.2", "-0.250 ± 0.093 (25/32)",
                   "-0.127 ± 0.115 (19/32)", "+0.050 ± 0.200 (12/32)", "-0.188 ± 0.134 (21/32, median -0.200)",
                   "2.50e+15", "50.0"]   # (a record made before medians were kept shows none)


def test_a_comparison_of_different_test_systems_is_refused_naming_both(tmp_path: Path) -> None:
    import h5py
    import pytest

    from experiments.lib import errors

    for run, ids in (("zeroshot_test", [3, 5]), ("final_test", [3, 7])):
        (tmp_path / run).mkdir()
        with h5py.File(tmp_path / run / "forecasts.h5", "w") as f:
            f["system_ids"], f["truth"] = np.array(ids), np.zeros((2, 4, 2))
            f["prompt"], f["time"] = np.ones((2, 6, 2)), np.arange(10.0)
            f.create_group("trained" if run == "final_test" else "untrained")["forecast"] = np.zeros((2, 4, 2))
    with pytest.raises(errors.RunFolderError, match=r"systems \[3, 5\] but final_test \[3, 7\]; remove .*final_test"):
        reporting.test_comparison(tmp_path)

"""The run folder: the command line saved, the data split and encoded once and then reused by every
later script that works on the same run."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from experiments.lib import data, llmtime, lotka_volterra, runs


def _args(lv_data_file, out, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    runs.add_common_args(p, out_default="unused")
    return p.parse_args(["--data", str(lv_data_file), "--out", str(out), *extra])


def test_start_run_saves_the_command_line_and_names_the_run(tmp_path, lv_data_file):
    args = _args(lv_data_file, tmp_path / "my-run", "--seed", "7")
    out = runs.start_run(args, "evaluate")
    saved = json.loads((out / "evaluate_args.json").read_text())
    assert saved["seed"] == 7 and saved["data"] == str(lv_data_file) and "argv" in saved
    assert args.name == "my-run"


def test_prepare_data_splits_by_system_fits_alpha_on_train_and_is_reused(tmp_path, lv_data_file):
    traj, _ = lotka_volterra.load_h5(lv_data_file)
    first = tmp_path / "train-run"
    first.mkdir()
    prepared = runs.prepare_data(_args(lv_data_file, first, "--seed", "1", "--percentile", "80"), first)
    splits = data.load_splits(first / "splits.json", n_systems=len(traj))
    assert all(np.array_equal(splits[k], prepared.splits[k]) for k in ("train", "val", "test"))
    encoding = llmtime.EncodingConfig.load(first / "encoding.json")
    assert encoding == prepared.encoding
    assert encoding.alpha == llmtime.fit_alpha(traj[splits["train"]], percentile=80)
    assert prepared.texts("val", 2) == [llmtime.encode(traj[i], alpha=encoding.alpha) for i in splits["val"][:2]]

    # a later script on the trained run: other --seed and --percentile, the same systems and scaling
    later = tmp_path / "eval-run"
    later.mkdir()
    again = runs.prepare_data(_args(lv_data_file, later, "--seed", "2", "--percentile", "50"), later, reuse=first)
    assert all(np.array_equal(again.splits[k], splits[k]) for k in splits) and again.encoding == encoding
    assert (later / "splits.json").read_text() == (first / "splits.json").read_text()
    assert runs.adapter_run_dir(str(first / "adapter")) == first
    assert runs.adapter_run_dir(str(later / "nowhere" / "adapter")) is None


def test_saved_splits_beyond_the_data_are_refused(tmp_path, lv_data_file):
    data.save_splits(tmp_path / "splits.json", {"train": np.array([0, 1]), "val": np.array([99]),
                                                "test": np.array([2])})
    with pytest.raises(ValueError, match="outside the 40 systems"):
        runs.prepare_data(_args(lv_data_file, tmp_path), tmp_path)

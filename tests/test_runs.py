"""The run folder: the command line saved, the data split and encoded once and then reused by every
later script that works on the same run; an adapter folder that carries its own splits, encoding and
data checksum wherever it goes, and refuses other data and its own training systems."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest

from experiments.lib import errors
from experiments.lib.run import cli, config, folder, rundata
from experiments.lib.science import data, llmtime, lotka_volterra


def _args(lv_data_file, out, *extra: str) -> config.RunConfig:
    return cli.parse(config.RunConfig, ["--data", str(lv_data_file), "--out", str(out), *extra])


def _eval_args(out, *extra) -> config.EvalConfig:
    """evaluate.py's config (forecast.py's has the same adapter fields; no --data unless given)."""
    return cli.parse(config.EvalConfig, ["--out", str(out), *map(str, extra)])


def _adapter_data(out, *extra) -> rundata.RunData:
    """prepare_data as evaluate.py calls it, from evaluate.py's config of these flags (forecast.py's has
    the same adapter fields; no --data unless given), saving in ``out``."""
    cfg = _eval_args(out, *extra)
    return rundata.prepare_data(cfg, out, adapter=cfg.adapter, split=cfg.split, allow_other_data=cfg.allow_other_data)


def test_start_run_saves_the_command_line_and_names_the_run(tmp_path, lv_data_file):
    args = _args(lv_data_file, tmp_path / "my-run", "--seed", "7")
    out = folder.start_run(args, "evaluate")
    saved = json.loads((out / "evaluate_args.json").read_text())
    assert saved["seed"] == 7 and saved["data"] == str(lv_data_file) and "argv" in saved
    assert args.run_name == "my-run"


def test_prepare_data_splits_by_system_fits_alpha_on_train_and_is_reused(tmp_path, lv_data_file):
    traj, _ = lotka_volterra.load_h5(lv_data_file)
    first = tmp_path / "train-run"
    first.mkdir()
    prepared = rundata.prepare_data(_args(lv_data_file, first, "--seed", "1", "--percentile", "80"), first)
    splits = data.load_splits(first / "splits.json", n_systems=len(traj))
    assert all(np.array_equal(splits[k], prepared.splits[k]) for k in ("train", "val", "test"))
    encoding = llmtime.EncodingConfig.load(first / "encoding.json")
    assert encoding == prepared.encoding
    assert encoding.alpha == llmtime.fit_alpha(traj[splits["train"]], percentile=80)
    assert prepared.texts("val", 2) == [llmtime.encode(traj[i], alpha=encoding.alpha) for i in splits["val"][:2]]

    # a later script on the trained run: other --seed and --percentile, the same systems and scaling
    later = tmp_path / "eval-run"
    later.mkdir()
    again = rundata.prepare_data(_args(lv_data_file, later, "--seed", "2", "--percentile", "50"), later, reuse=first)
    assert all(np.array_equal(again.splits[k], splits[k]) for k in splits) and again.encoding == encoding
    assert (later / "splits.json").read_text() == (first / "splits.json").read_text()


def test_saved_splits_beyond_the_data_are_refused(tmp_path, lv_data_file):
    data.save_splits(tmp_path / "splits.json", {"train": np.array([0, 1]), "val": np.array([99]),
                                                "test": np.array([2])})
    with pytest.raises(ValueError, match="outside the 40 systems"):
        rundata.prepare_data(_args(lv_data_file, tmp_path), tmp_path)


def _trained_adapter(tmp_path, lv_data_file) -> tuple[rundata.RunData, object]:
    """A training run's data and an adapter folder saved in it, as train.py leaves them (the weights aside)."""
    run = tmp_path / "train-run"
    run.mkdir()
    trained = rundata.prepare_data(_args(lv_data_file, run, "--seed", "3", "--percentile", "80"), run)
    adapter = run / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    rundata.save_adapter_files(adapter, trained)
    return trained, adapter


def _same_splits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_an_adapter_folder_moved_anywhere_brings_its_splits_encoding_and_data_file(tmp_path, lv_data_file):
    trained, adapter = _trained_adapter(tmp_path, lv_data_file)
    assert json.loads((adapter / "data.json").read_text()) == {
        "path": str(lv_data_file.resolve()), "sha256": hashlib.sha256(lv_data_file.read_bytes()).hexdigest(),
        "systems": 40}
    moved = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(adapter, moved)
    shutil.rmtree(adapter.parent)   # no run folder beside it: the adapter folder alone decides
    # other --seed and --percentile, no --data: the adapter's own systems, scaling and data file
    got = _adapter_data(tmp_path / "eval", "--adapter", moved, "--seed", 9, "--percentile", 50)
    assert _same_splits(got.splits, trained.splits) and got.encoding == trained.encoding
    assert got.data_path == str(lv_data_file.resolve()) and got.warnings == []
    assert got.adapter_info.folder == moved
    assert got.adapter_info.data["sha256"] == got.sha256


def test_another_data_file_is_refused_naming_both_unless_allowed(tmp_path, lv_data_file):
    _, adapter = _trained_adapter(tmp_path, lv_data_file)
    traj, time, params = lotka_volterra.generate_dataset(40, seed=6)
    other = lotka_volterra.save_h5(tmp_path / "other.h5", traj, time, params)
    mine, theirs = (hashlib.sha256(f.read_bytes()).hexdigest() for f in (other, lv_data_file))
    want = (rf"data file {re.escape(str(other))} \(sha256 {mine}\) is not the one adapter {re.escape(str(adapter))} "
            rf"was trained on: {re.escape(str(lv_data_file.resolve()))} \(sha256 {theirs}\)")
    with pytest.raises(errors.DataError, match=want + "; pass --allow-other-data"):
        _adapter_data(tmp_path / "e", "--adapter", adapter, "--data", other)
    got = _adapter_data(tmp_path / "e", "--adapter", adapter, "--data", other, "--allow-other-data")
    assert len(got.warnings) == 1 and re.fullmatch(want, got.warnings[0])
    assert np.array_equal(got.trajectories, traj)


def test_the_adapters_own_training_split_and_a_missing_data_file_are_refused(tmp_path, lv_data_file):
    _, adapter = _trained_adapter(tmp_path, lv_data_file)
    with pytest.raises(errors.UsageError,
                       match=rf"--split train: adapter {re.escape(str(adapter))} was trained on these"):
        _adapter_data(tmp_path / "e", "--adapter", adapter, "--split", "train")
    recorded = json.loads((adapter / "data.json").read_text())
    (adapter / "data.json").write_text(json.dumps({**recorded, "path": str(tmp_path / "gone.h5")}))
    with pytest.raises(errors.DataError,
                       match=r"data file .*gone\.h5 not found \(recorded in .*data\.json; pass --data\)"):
        _adapter_data(tmp_path / "e", "--adapter", adapter)
    with pytest.raises(errors.AdapterFolderError, match="not an adapter folder"):
        _adapter_data(tmp_path / "e", "--adapter", tmp_path)


def test_an_adapter_without_its_provenance_files_is_refused_naming_them(tmp_path, lv_data_file):
    _, adapter = _trained_adapter(tmp_path, lv_data_file)
    for f in ("splits.json", "data.json"):
        (adapter / f).unlink()
    with pytest.raises(errors.AdapterFolderError, match=r"has no splits\.json, data\.json"):
        _adapter_data(tmp_path / "e", "--adapter", adapter, "--data", lv_data_file)
    assert not (tmp_path / "e" / "splits.json").exists()

"""--context-length series: each window one series from its start, as much of it as a forecast reads and
writes, as long as the longest of them. The flag, the windows (against the tokenizer's own ids), and the
value reaching train.py's and evaluate.py's runs, plans and ledgers."""

from __future__ import annotations

import json

import numpy as np
import pytest

import flops
import qwen_min
from experiments import evaluate, train
from experiments.lib import errors
from experiments.lib.run import cli
from experiments.lib.run.config import EvalConfig, TrainConfig
from experiments.lib.run.windows import prepare_windows, series_windows
from experiments.lib.science import llmtime
from experiments.lib.science.lotka_volterra import load_h5
from tests.conftest import script_argv


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return qwen_min.load_tokenizer(tiny_ckpt)


def test_the_flag_takes_a_number_or_series_and_nothing_else():
    assert cli.parse(TrainConfig, ["--context-length", "series"]).context_length == "series"
    assert cli.parse(TrainConfig, ["--context-length", "300"]).context_length == 300
    for bad in ("seri", "1", "-5", "1.5"):
        with pytest.raises(errors.UsageError, match="--context-length"):
            cli.parse(TrainConfig, ["--context-length", bad])
    assert cli.parse(EvalConfig, ["--context-length", "series"]).context_length == "series"


def test_a_stride_makes_no_sense_over_a_whole_series():
    with pytest.raises(errors.UsageError, match="--stride 5: a --context-length series window holds a whole"):
        cli.parse(TrainConfig, ["--context-length", "series", "--stride", "5"])
    with pytest.raises(errors.UsageError, match="--stride"):
        TrainConfig(context_length="series", stride=5)      # a config made directly: the same refusal


def test_series_windows_hold_each_text_whole_from_its_start(tok):
    texts = [["0.25,1.50;0.27,1.47;0.30,1.40", "1.00,2.00"], ["3.14,2.72;1.41,1.73;2.24,2.45;0.58,0.69"]]
    ids = [[tok.encode(t) for t in split] for split in texts]
    L = max(len(i) for split in ids for i in split)
    train_w, val_w = series_windows(texts, tok)
    for windows, split in ((train_w, ids[0]), (val_w, ids[1])):
        assert windows.input_ids.shape == (len(split), L)       # one window per text, one width for all
        for row, want in enumerate(split):
            n = len(want)
            assert windows.input_ids[row, :n].tolist() == want
            assert (windows.input_ids[row, n:] == tok.pad_id).all()
            # every next token of the text is a target, and no padding is
            assert windows.labels[row, :n - 1].tolist() == want[1:]
            assert (windows.labels[row, n - 1:] == -100).all()


def test_a_run_s_series_windows_cover_prompt_and_horizon_of_each_system(tmp_path, tok, lv_data_file):
    cfg = TrainConfig(data=str(lv_data_file), out=str(tmp_path / "r"), context_length="series", context_steps=6,
                      horizon=4, max_systems=5, val_systems=3, batch_size=2)
    run_data, train_w, val_w = prepare_windows(cfg, None, tok)
    trajectories, _ = load_h5(lv_data_file)
    enc = run_data.encoding

    def want(i: int) -> list[int]:   # the first C + H steps of system i, by hand
        return tok.encode(llmtime.encode(trajectories[i, :10], alpha=enc.alpha, decimals=enc.decimals))

    train_ids = [want(i) for i in run_data.splits["train"][:5]]
    val_ids = [want(i) for i in run_data.splits["val"][:3]]
    L = max(map(len, train_ids + val_ids))
    assert train_w.input_ids.shape == (5, L) and val_w.input_ids.shape == (3, L)
    for windows, ids in ((train_w, train_ids), (val_w, val_ids)):
        for row, w in enumerate(ids):
            assert windows.input_ids[row, :len(w)].tolist() == w
    assert int((train_w.labels != -100).sum()) == sum(len(w) - 1 for w in train_ids)


def test_train_py_runs_plans_and_charges_at_the_series_length(tmp_path, tiny_ckpt, lv_data_file, tok):
    out = tmp_path / "run"
    argv = script_argv(tiny_ckpt, lv_data_file, out, "--context-length", "series", "--context-steps", 6,
                       "--horizon", 4, "--max-systems", 4, "--val-systems", 2, "--batch-size", 2, "--max-steps", 2,
                       "--eval-every", 0, "--select-by", "loss", "--val-forecast-systems", 0)
    summary = train.main(argv)
    cfg = cli.parse(TrainConfig, argv)
    _, train_w, val_w = prepare_windows(cfg, None, tok)
    L = train_w.input_ids.shape[1]
    assert L > 40    # ten steps of two values: far past any fixed default a test would pick by chance
    assert summary["context_length"] == L
    assert json.loads((out / "train_args.json").read_text())["context_length"] == "series"
    ledger = flops.Ledger(out.parent / "ledger.jsonl")
    [reservation] = ledger.reservations()
    assert reservation.config["context_length"] == L
    # every step charged at that width: two windows of L tokens, the output layer on the scored ones
    steps = [e for e in ledger.entries() if e.kind == "train" and e.steps]
    assert sum(e.tokens for e in steps) == 2 * 2 * L
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows if r["kind"] == "train"] == [2 * L, 4 * L]

    # --resume compares the flag as given ("series" both times), not the length it resolved to: a resume
    # with another step count is refused for --max-steps, which comes after --context-length in the check
    more = [*argv[:argv.index("--max-steps")], "--max-steps", "3", *argv[argv.index("--max-steps") + 2:]]
    with pytest.raises(errors.UsageError, match="--resume: --max-steps was 2"):
        train.main([*more, "--resume"])


def test_evaluate_py_scores_one_window_per_whole_series(tmp_path, tiny_ckpt, lv_data_file, tok):
    out = tmp_path / "eval"
    report = evaluate.main(script_argv(tiny_ckpt, lv_data_file, out, "--context-length", "series", "--split", "val",
                                       "--max-systems", 3))
    trajectories, _ = load_h5(lv_data_file)
    splits = json.loads((out / "splits.json").read_text())
    enc = llmtime.EncodingConfig.load(out / "encoding.json")
    ids = [tok.encode(llmtime.encode(trajectories[i], alpha=enc.alpha, decimals=enc.decimals))
           for i in np.asarray(splits["val"])[:3]]
    scored = sum(len(w) - 1 for w in ids)
    assert report["windows"] == 3
    assert report["scored_tokens"] == scored

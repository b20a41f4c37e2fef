"""Cross-entropy of the untrained model, or of a saved adapter, on validation or test windows.

    python experiments/evaluate.py --split test                          # the untrained model
    python experiments/evaluate.py --adapter runs/train/adapter --split val

With --adapter, the encoding (alpha, decimals), the splits and the data file come from the adapter
folder itself (its data file checked by SHA-256; --allow-other-data scores another, with a warning
in the results), so a trained model is scored on exactly the numbers it was trained to continue;
its own training split is refused. The planned FLOPs are reserved in the ledger before any model
work and each batch is charged as it is done. Writes --out/eval_metrics.json (whole: a temporary
name, then a rename); a cross-entropy that is not a finite number writes nothing and ends in one line,
exit status 1.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qwen_min
from experiments.lib import errors, files
from experiments.lib.budget import planning
from experiments.lib.budget.booking import Booking, reserve
from experiments.lib.run import cli, devices, folder, rundata
from experiments.lib.run.config import EvalConfig
from experiments.lib.run.flagtypes import SERIES
from experiments.lib.run.models import load_adapter, load_model
from experiments.lib.run.windows import require_scored, series_windows
from experiments.lib.science import data
from experiments.lib.training import evaluation


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    return cli.parse(EvalConfig, argv, __doc__)


def build_parser() -> cli.ArgumentParser:
    """evaluate.py's command line (``parse_args`` also builds the EvalConfig it gives)."""
    return cli.parser(EvalConfig, __doc__)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    out = folder.start_run(cfg, "evaluate")
    folder.seed_everything(cfg.seed)
    device = devices.pick_device(cfg.device)
    # with --adapter: its splits, encoding and (checked) data file
    run_data = rundata.prepare_data(cfg, out, adapter=cfg.adapter, split=cfg.split,
                                    allow_other_data=cfg.allow_other_data)
    texts = run_data.texts(cfg.split, cfg.max_systems)
    tokenizer = qwen_min.load_tokenizer(cfg.model, revision=cfg.revision)
    if cfg.context_length == SERIES:   # one window per whole series
        [windows] = series_windows([texts], tokenizer)
    else:
        windows = data.training_windows(texts, tokenizer, context_length=cfg.context_length,
                                        stride=cfg.context_length - 1)
    L = windows.input_ids.shape[1]
    what = f"the {cfg.split} split ({len(texts)} systems)"
    require_scored(windows, what)

    # ---- plan (the tokens each batch scores: exactly what it charges), reserved before any model work
    shape = planning.meta_model(qwen_min.load_config(cfg.model, revision=cfg.revision))
    if cfg.adapter:
        load_adapter(shape, cfg)
    n = len(windows.input_ids)
    costs = planning.ScoredCosts(shape, cfg.batch_size, L)
    planned = costs.windows_loss(windows.labels)
    reservation = reserve(cfg, planned, kind="eval",
                                   config={"split": cfg.split, "adapter": cfg.adapter, "windows": n})
    with Booking(reservation) as booking:  # closed on any exit, releasing what was not spent
        model, _ = load_model(cfg, device)
        if cfg.adapter:
            load_adapter(model, cfg, run_data)
        model.eval()

        def charge_batch(rows: int, scored: int) -> None:
            booking.charge(costs.evaluation(rows, scored), kind="eval", tokens=rows * L,
                           config={"split": cfg.split, "adapter": cfg.adapter, "windows": rows, "of": n})

        loss, tokens = evaluation.windows_loss(model, windows.input_ids, windows.labels, cfg.batch_size, device,
                                             what=what, after_batch=charge_batch)
    if not math.isfinite(loss):   # (no result from it: a null loss with exit status 0 would pass for one)
        scored = cfg.adapter or "the untrained model"
        raise errors.NotFiniteError(f"{what}: the cross-entropy of {scored} in {devices.dtype_of(model)} is {loss}, "
                                    f"not a finite number (the logits overflow or are NaN); no "
                                    f"{out / 'eval_metrics.json'} is written, and the {booking.charged:.4e} FLOPs "
                                    f"spent are charged")
    result = {"split": cfg.split, "adapter": cfg.adapter, "model": cfg.model, "dtype": devices.dtype_of(model),
              "loss": loss,
              "scored_tokens": tokens, "windows": n, "systems": len(texts), "flops": booking.charged,
              "flops_planned": planned, "data": run_data.data_path, "data_sha256": run_data.sha256,
              "warnings": run_data.warnings}
    files.write_json(out / "eval_metrics.json", result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(cli.run_as_script(main))

"""experiments/lib/files.py: whole-file writes, and JSON that every reader reads (no NaN, no Infinity)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.lib import files


def test_write_json_is_strict(tmp_path):
    obj = {"nan": float("nan"), "inf": float("inf"), "ok": 1.5, "np_nan": np.float32("nan"), "np_int": np.int64(3),
           "array": np.array([[1.0, np.nan], [-np.inf, 2.0]]), "nested": [{"x": (float("-inf"), 2)}],
           "path": Path("a/b"), "flag": True, "none": None, np.int64(7): "numpy key"}
    path = files.write_json(tmp_path / "out.json", obj)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    assert back == {"nan": None, "inf": None, "ok": 1.5, "np_nan": None, "np_int": 3,
                    "array": [[1.0, None], [None, 2.0]], "nested": [{"x": [None, 2]}], "path": "a/b", "flag": True,
                    "none": None, "7": "numpy key"}
    assert not (tmp_path / "out.json.tmp").exists()
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        files.write_json(tmp_path / "bad.json", {"x": object()})


def _strict_loads(line: str):
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard constant {c} in {line!r}"))


def test_metrics_jsonl_lines_are_strict_json(tmp_path):
    from experiments.lib.run.metrics_log import MetricsLog
    from experiments.lib.training.state import RunState

    log = MetricsLog(tmp_path)
    state = RunState(step=1, tokens=10, flops=1e9)
    log(state, "train", float("nan"), 0.1, tokens_per_s=float("inf"))   # a diverged loss
    state.step = 2
    log(state, "val_forecast", None, 0.1, mae=np.float32("nan"),
        vs_untrained={"mae_diff": float("-inf"), "blocks": {"h1_10": [float("nan"), 0.5]}})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all("NaN" not in x and "Infinity" not in x for x in lines)
    first, second = map(_strict_loads, lines)
    assert first == {"step": 1, "kind": "train", "loss": None, "lr": 0.1, "tokens": 10, "flops": 1e9,
                     "tokens_per_s": None}
    assert second["mae"] is None and second["vs_untrained"] == {"mae_diff": None, "blocks": {"h1_10": [None, 0.5]}}
    # a resumed run rewrites the rows it keeps, strictly too (even rows an older version wrote with NaN)
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + '{"step": 2, "kind": "val", "loss": NaN}\n')
    MetricsLog(tmp_path, resume_step=2)
    assert [_strict_loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [None, None]


def test_dumps_is_the_one_strict_conversion():
    assert files.dumps({"a": float("nan"), "b": [np.float64("inf"), 1]}) == '{"a": null, "b": [null, 1]}'
    assert "\n" in files.dumps({"a": 1}, indent=2) and "\n" not in files.dumps({"a": {"b": [1, 2]}})

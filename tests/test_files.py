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

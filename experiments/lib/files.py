"""Files a run writes whole: written to a temporary name, then renamed, so a reader (or a resumed
run after a kill) never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """JSON, indented; numpy scalars and arrays and paths written as plain values."""
    return write_text(path, json.dumps(obj, indent=2, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")

"""Files a run writes whole: written to a temporary name, then renamed, so a reader (or a resumed
run after a kill) never sees half a file. Every JSON it writes, whole files and JSON lines alike, is
strict (``dumps``): a non-finite float is null."""

from __future__ import annotations

import json
import math
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
    """Strict JSON, indented: numpy scalars and arrays and paths written as plain values, and every
    non-finite float (NaN, inf; numpy's too) written as null, so any JSON reader reads the file."""
    return write_text(path, dumps(obj, indent=2))


def dumps(obj: Any, *, indent: int | None = None) -> str:
    """``obj`` as strict JSON text (see ``strict``): what write_json writes, and one line of a .jsonl
    file with no indent (metrics.jsonl)."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def strict(x: Any) -> Any:
    """``x`` with numpy values and paths made plain and non-finite floats made None, recursively."""
    if isinstance(x, dict):
        return {(k.item() if isinstance(k, np.generic) else k): strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict(v) for v in x]
    if isinstance(x, np.ndarray):
        return strict(x.tolist())
    if isinstance(x, np.generic):
        return strict(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    if x is None or isinstance(x, (str, int)):  # bool is an int
        return x
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")

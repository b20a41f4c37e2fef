"""LLMTIME encoding: numbers as text a language model can continue (Gruver et al. 2023).

    values (T, n_vars)  --x / alpha, fixed decimals-->  "0.25,1.50;0.27,1.47;..."

',' separates the variables of a time step, ';' the time steps, no spaces. alpha is fitted on the
training systems only: the given percentile of their values maps to 10, so most numbers have one
digit before the point. Decoding never raises: the i-th ';'-separated segment always lands at row
i, and a malformed one (wrong number of fields, a field that is not a plain decimal number, an
empty field) becomes a row of NaN there, so one bad step never shifts the steps after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

NUMBER = re.compile(r"-?\d+(\.\d+)?")   # plain decimals only: no exponent, sign '+', spaces, nan or inf


@dataclass(frozen=True)
class EncodingConfig:
    """Everything needed to encode, and to decode again: saved as encoding.json with every run."""

    alpha: float
    decimals: int = 2
    percentile: float = 90.0


@dataclass
class DecodeReport:
    n_steps: int                          # segments found (a trailing empty one after ';' not counted)
    malformed: int                        # rows set to NaN
    malformed_steps: list[int] = field(default_factory=list)
    last_cut_off: bool = False            # the text did not end with ';': its last step may be incomplete


def fit_alpha(train_values: np.ndarray, *, percentile: float = 90.0, target: float = 10.0) -> float:
    """alpha such that the ``percentile`` of the training values encodes as ``target``."""
    values = np.asarray(train_values, dtype=np.float64)
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    q = float(np.percentile(values, percentile))
    if not np.isfinite(q) or q <= 0:
        raise ValueError(f"the {percentile}th percentile of the training values is {q}; alpha must be > 0")
    return q / target


def encode(values: np.ndarray, *, alpha: float, decimals: int = 2) -> str:
    """(T, n_vars) -> "v,v;v,v;..." with each value divided by alpha and given ``decimals`` decimals."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"encode expects (time steps, variables), got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("encode: values must be finite")
    scaled = values / alpha
    return ";".join(",".join(f"{v:.{decimals}f}" for v in row) for row in scaled)


def decode(text: str, *, alpha: float, n_vars: int = 2) -> tuple[np.ndarray, DecodeReport]:
    """Text -> (steps, n_vars) in original units (x * alpha), with NaN rows for malformed steps."""
    segments = text.split(";")
    ends_complete = text.endswith(";")
    if ends_complete or segments == [""]:
        segments = segments[:-1]  # "a;b;" is two complete steps; "" is none
    out = np.full((len(segments), n_vars), np.nan)
    bad = []
    for i, seg in enumerate(segments):
        fields = seg.split(",")
        if len(fields) == n_vars and all(NUMBER.fullmatch(f) for f in fields):
            out[i] = [float(f) * alpha for f in fields]
        else:
            bad.append(i)
    return out, DecodeReport(n_steps=len(segments), malformed=len(bad), malformed_steps=bad,
                             last_cut_off=bool(segments) and not ends_complete)

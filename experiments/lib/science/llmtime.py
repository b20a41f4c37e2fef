"""LLMTIME encoding: numbers as text a language model can continue (Gruver et al. 2023).

    values (T, n_vars)  --x / alpha, fixed decimals-->  "0.25,1.50;0.27,1.47;..."

',' separates the variables of a time step, ';' the time steps, no spaces. alpha is fitted on the
training systems only: the given percentile of their values maps to 10, so most numbers have one
digit before the point. Decoding never raises: the i-th ';'-separated segment always lands at row
i, and a malformed one (wrong number of fields, a field that is not a plain decimal number, an
empty field) becomes a row of NaN there, so one bad step never shifts the steps after it.
Decoding with the encoding's ``decimals`` is strict: a field must be written exactly as ``encode``
writes numbers (that many decimals, no leading zeros, no "-0"), so "123" for 1.23 or a number cut
short is malformed instead of a value 100x too large or too small.

Negative values are allowed (a '-' sign; "-0.00" is written "0.00"), though populations never are.
Numbers >= 10 * alpha simply get more digits before the point: nothing is clipped.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from experiments.lib import files

# plain ASCII decimals only: no exponent, '+', spaces, nan, inf, or the Unicode digits that \d and float() accept
NUMBER = re.compile(r"-?[0-9]+(\.([0-9]+))?")
# the form encode writes: no leading zeros (but a single "0" before the point)
CANONICAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")


@dataclass(frozen=True)
class EncodingConfig:
    """Everything needed to encode, and to decode again: saved as encoding.json with every run, so
    any stored forecast text can be turned back into numbers in the original units."""

    alpha: float
    decimals: int = 2
    percentile: float = 90.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha}")
        if int(self.decimals) != self.decimals or self.decimals < 0:
            raise ValueError(f"decimals must be a non-negative integer, got {self.decimals}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        return files.write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> EncodingConfig:
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class DecodeReport:
    n_steps: int                          # segments found (a trailing empty one after ';' not counted)
    malformed: int                        # rows set to NaN
    malformed_steps: list[int] = field(default_factory=list)
    # The text does not end with ';' and its last step is not known to be complete: it is malformed,
    # or (without ``decimals``) it parsed but could still be the prefix of a longer number.
    last_cut_off: bool = False


def fit_alpha(train_values: np.ndarray, percentile: float = 90.0, target: float = 10.0) -> float:
    """alpha such that the ``percentile`` of the training values encodes as ``target``.

    Pass the training systems only: alpha then cannot depend on validation or test data.
    """
    values = np.asarray(train_values, dtype=np.float64)
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("fit_alpha needs a non-empty array of finite training values")
    q = float(np.percentile(values, percentile))
    if q <= 0:
        raise ValueError(f"the {percentile}th percentile of the training values is {q}; alpha must be > 0")
    return q / target


def _format(v: float, decimals: int) -> str:
    s = f"{v:.{decimals}f}"
    return s[1:] if s[0] == "-" and not s.strip("-0.") else s   # "-0.00" -> "0.00"


def encode(values: np.ndarray, *, alpha: float, decimals: int = 2) -> str:
    """(T, n_vars) -> "v,v;v,v" with each value divided by alpha and given ``decimals`` decimals.

    No trailing ';': a forecast prompt appends one so that it ends on a separator.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"encode expects (time steps, variables), got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("encode: values must be finite")
    if not (np.isfinite(alpha) and alpha > 0) or int(decimals) != decimals or decimals < 0:
        raise ValueError(f"encode: alpha must be > 0 and decimals a non-negative integer, got {alpha}, {decimals}")
    scaled = values / alpha
    return ";".join(",".join(_format(v, int(decimals)) for v in row) for row in scaled)


def _parse(field_text: str, decimals: int | None) -> float | None:
    """A field's value, or None if it is not a plain decimal. With ``decimals``, also None unless it
    is written exactly as ``encode`` writes: that many decimals, no leading zero, no negative zero."""
    m = NUMBER.fullmatch(field_text)
    if m is None:
        return None
    v = float(field_text)
    if decimals is not None and (len(m.group(2) or "") != decimals or not CANONICAL.fullmatch(field_text)
                                 or (v == 0 and field_text.startswith("-"))):
        return None
    return v if np.isfinite(v) else None   # hundreds of digits overflow to inf


def decode(text: str, *, alpha: float, n_vars: int = 2, decimals: int | None = None) -> tuple[np.ndarray, DecodeReport]:
    """Text -> (steps, n_vars) in original units (x * alpha), with NaN rows for malformed steps.

    Never raises on malformed text. The i-th ';'-separated segment is row i; "a;b;" is two steps
    and "" none. With ``decimals`` a field must be written as ``encode`` writes it, with exactly that
    many decimals, which makes any number cut short (by a token limit, say) or missing its point
    malformed instead of silently wrong.
    """
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    segments = text.split(";")
    ends_complete = text.endswith(";")
    if ends_complete or segments == [""]:
        segments = segments[:-1]
    out = np.full((len(segments), n_vars), np.nan)
    bad = []
    for i, seg in enumerate(segments):
        fields = seg.split(",")
        parsed = [_parse(f, decimals) for f in fields] if len(fields) == n_vars else [None]
        row = [v * alpha for v in parsed] if all(v is not None for v in parsed) else []
        if row and np.isfinite(row).all():
            out[i] = row
        else:
            bad.append(i)
    last_unsure = bool(segments) and not ends_complete and (decimals is None or bad[-1:] == [len(segments) - 1])
    return out, DecodeReport(n_steps=len(segments), malformed=len(bad), malformed_steps=bad, last_cut_off=last_unsure)

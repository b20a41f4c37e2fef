"""The values a flag takes: argparse types that say what is allowed, so a value outside is refused
when the command line is parsed, with one line naming the flag (argparse adds it) and the rule.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(text: str, kind: type) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def _int_at_least(low: int, allowed: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``; ``allowed`` says so in the refusal."""
    def parse(text: str) -> int:
        v = _number(text, int)
        if v < low:
            raise argparse.ArgumentTypeError(f"{text}: must be {allowed}")
        return v
    return parse


positive_int = _int_at_least(1, "at least 1")
non_negative_int = _int_at_least(0, "0 or more")
at_least_two = _int_at_least(2, "at least 2 (a window of tokens: one to read, one to predict)")

SERIES = "series"   # a window length worked out from the data: one window holds a whole forecast's text


def window_length(text: str) -> int | str:
    """--context-length: tokens per window (at least 2), or ``series`` (the data decides: see
    run/windows.py)."""
    if text == SERIES:
        return SERIES
    try:
        return at_least_two(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text}: must be a whole number of tokens, at least 2, or "
                                         f"'{SERIES}'") from None


def finite_float(text: str) -> float:
    """A finite number."""
    v = _number(text, float)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
    return v


def _float_where(ok: Callable[[float], bool], allowed: str) -> Callable[[str], float]:
    """An argparse type: a finite number for which ``ok`` holds; ``allowed`` says which in the refusal."""
    def parse(text: str) -> float:
        v = finite_float(text)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{text}: must be {allowed}")
        return v
    return parse


finite_positive_float = _float_where(lambda v: v > 0, "a finite number above 0")
non_negative_float = _float_where(lambda v: v >= 0, "a finite number, 0 or more")
probability = _float_where(lambda v: 0 < v <= 1, "above 0 and at most 1")          # (0, 1]
fraction = _float_where(lambda v: 0 <= v <= 1, "between 0 and 1")                 # [0, 1]
percentile = _float_where(lambda v: 0 < v <= 100, "above 0 and at most 100")      # (0, 100]

"""argparse value types that reject what would silently misbehave (``-1`` intervals, ``nan`` thresholds).

Used as ``parser.add_argument("--every", type=positive_int)``; a bad value becomes argparse's one-line
error (``argument --every: must be an integer >= 1, got '-1'``) and exit 2.
"""

from __future__ import annotations

import argparse
import math


def _int(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int(text, 1, "an integer >= 1")


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    return _int(text, 0, "an integer >= 0")


def finite_float(text: str) -> float:
    """A float that is not NaN or +-inf."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    """A finite float >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value

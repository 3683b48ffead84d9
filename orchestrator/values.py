"""The one meaning of a missing value in results: None, NaN, or pandas' NA/NaT."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


def is_missing(value: Any) -> bool:
    """None, NaN, or pandas' NA/NaT; list-like values are never missing.

    Example:
        >>> [is_missing(v) for v in (None, float("nan"), pd.NaT, 0.0, [1])]
        [True, True, True, False, False]
    """
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (what MLflow, Parquet and
    the objectives accept).

    Example:
        >>> [finite_or_none(v) for v in (None, float("inf"), 2)]
        [None, None, 2.0]
    """
    if value is None or is_missing(value):
        return None
    number = float(value)
    return number if math.isfinite(number) else None

"""The privacy–utility Pareto front: dominance, front extraction and exact hypervolume.

Objectives are named columns with a direction (``"min"`` or ``"max"``). Internally everything is
converted to minimisation (``max`` columns are negated). A row *dominates* another when it is at
least as good in every objective and strictly better in one. Rows containing NaN in any
objective are never on the front (and are ignored by :func:`hypervolume`); identical rows do not
dominate each other, so duplicates are all on the front.

Hypervolume is computed exactly by recursive slicing (HSO): a sweep for two objectives, slices
along the last objective over the 2-D sweep for three, and the same recursion for more, where
the cost grows as ``n ** (k - 1)`` so larger inputs raise ``NotImplementedError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

__all__ = [
    "MAX_SLICING_CALLS",
    "Objective",
    "default_reference",
    "hypervolume",
    "pareto_front",
    "pareto_mask",
]

Mode = Literal["min", "max"]

MAX_SLICING_CALLS = 100_000
"""Upper bound on ``n ** (k - 2)`` (2-D sweeps needed) for exact hypervolume with k > 3."""


@dataclass(frozen=True)
class Objective:
    """One objective of the study: a metric column and whether smaller or larger is better."""

    metric: str
    mode: Mode

    def __post_init__(self) -> None:
        """Reject a mode other than ``"min"``/``"max"`` and an empty metric name."""
        if self.mode not in ("min", "max"):
            raise ValueError(f"Objective.mode must be 'min' or 'max', got {self.mode!r}")
        if not self.metric:
            raise ValueError("Objective.metric must be a non-empty column name")


def _signs(modes: Sequence[str], k: int) -> np.ndarray:
    """+1 for ``min`` and -1 for ``max`` objectives (multiplying converts to minimisation)."""
    if len(modes) != k:
        raise ValueError(f"got {len(modes)} modes for {k} objectives")
    bad = [m for m in modes if m not in ("min", "max")]
    if bad:
        raise ValueError(f"modes must be 'min' or 'max', got {bad}")
    return np.array([1.0 if m == "min" else -1.0 for m in modes])


def _as_matrix(values: np.ndarray | Sequence[Sequence[float]], name: str) -> np.ndarray:
    """``values`` as a float (n, k) array with k >= 1."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, k), got shape {arr.shape}")
    if arr.shape[1] < 1:
        raise ValueError(f"{name} needs at least one objective column, got shape {arr.shape}")
    return arr


def _nondominated_min(points: np.ndarray) -> np.ndarray:
    """Mask of non-dominated rows of NaN-free ``points`` under minimisation of every column."""
    n = points.shape[0]
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        le = np.all(points <= points[i], axis=1)
        lt = np.any(points < points[i], axis=1)
        if np.any(le & lt):
            mask[i] = False
    return mask


def pareto_mask(values: np.ndarray | Sequence[Sequence[float]], modes: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``values`` (n, k) under ``modes`` (k,).

    Rows with a NaN in any objective are never on the front and never dominate anything.
    Duplicated rows do not dominate each other, so all copies of a front point are on the front.
    ``±inf`` compares like any other value. O(n² k).
    """
    arr = _as_matrix(values, "values")
    signs = _signs(modes, arr.shape[1])
    valid = ~np.isnan(arr).any(axis=1)
    mask = np.zeros(arr.shape[0], dtype=bool)
    if valid.any():
        mask[valid] = _nondominated_min(arr[valid] * signs)
    return mask


def completed_rows(df: pd.DataFrame, status_col: str | None = "status") -> pd.DataFrame:
    """The rows whose ``status_col`` is ``"completed"`` (``status_col=None``: all rows).

    Raises:
        KeyError: ``status_col`` is not a column of ``df``.
    """
    if status_col is None:
        return df
    if status_col not in df.columns:
        raise KeyError(f"status column {status_col!r} not in the frame")
    completed: pd.DataFrame = df[df[status_col] == "completed"]
    return completed


def pareto_front(
    df: pd.DataFrame,
    objectives: Sequence[Objective],
    status_col: str | None = "status",
) -> pd.DataFrame:
    """The non-dominated completed rows of ``df`` under ``objectives``, best first.

    Only rows whose ``status_col`` equals ``"completed"`` are considered (``status_col=None``:
    all rows). Rows with a missing objective value are never on the front. The result keeps
    ``df``'s index and columns and is sorted by the first objective from best to worst (then by
    the following objectives, each best first); ties keep ``df``'s order.
    """
    if not objectives:
        raise ValueError("pareto_front needs at least one objective")
    columns = [o.metric for o in objectives]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(
            f"objective columns {missing} not in the frame (columns: {list(df.columns)})"
        )
    candidates = completed_rows(df, status_col)
    values = candidates[columns].to_numpy(dtype=float, na_value=np.nan)
    front = candidates[pareto_mask(values, [o.mode for o in objectives])]
    best_first: pd.DataFrame = front.sort_values(
        columns, ascending=[o.mode == "min" for o in objectives], kind="mergesort"
    )
    return best_first


def _hv2(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact 2-D hypervolume (minimisation) of points strictly better than ``ref``: a sweep."""
    order = np.lexsort((points[:, 1], points[:, 0]))
    volume = 0.0
    best_y = ref[1]
    xs = points[order, 0]
    ys = points[order, 1]
    # Walk by increasing x; each point adds the strip between its x and the next x, at the best
    # y seen so far (dominated points do not lower best_y and so add strips already counted).
    for i in range(len(xs)):
        best_y = min(best_y, ys[i])
        next_x = xs[i + 1] if i + 1 < len(xs) else ref[0]
        volume += (next_x - xs[i]) * (ref[1] - best_y)
    return float(volume)


def _hv(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume (minimisation) of ``points`` all strictly better than ``ref``: HSO."""
    n, k = points.shape
    if n == 0:
        return 0.0
    if k == 1:
        return float(ref[0] - points[:, 0].min())
    if k == 2:
        return _hv2(points, ref)
    points = points[_nondominated_min(points)]
    order = np.argsort(points[:, -1], kind="mergesort")
    points = points[order]
    volume = 0.0
    for i in range(points.shape[0]):
        upper = points[i + 1, -1] if i + 1 < points.shape[0] else ref[-1]
        depth = upper - points[i, -1]
        if depth > 0:
            volume += depth * _hv(points[: i + 1, :-1], ref[:-1])
    return float(volume)


def default_reference(points: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Default hypervolume reference point in the objectives' own units.

    Per objective: the worst value over the (NaN-free) points plus 10% of that objective's range
    (worst − best) in the worse direction; where the range is zero the margin is 10% of
    ``|worst|``, or 1.0 if that is zero too, so every point has a positive contribution. It
    depends on the points, so hypervolumes compared across studies need an explicit reference.
    """
    arr = _as_matrix(points, "points")
    signs = _signs(modes, arr.shape[1])
    arr = arr[~np.isnan(arr).any(axis=1)] * signs
    if arr.shape[0] == 0:
        raise ValueError("default_reference needs at least one point without NaN")
    if not np.isfinite(arr).all():
        raise ValueError("default_reference needs finite points")
    worst = arr.max(axis=0)
    span = worst - arr.min(axis=0)
    margin = np.where(span > 0, 0.1 * span, np.where(worst != 0, 0.1 * np.abs(worst), 1.0))
    reference: np.ndarray = (worst + margin) * signs
    return reference


def hypervolume(
    points: np.ndarray | Sequence[Sequence[float]],
    modes: Sequence[str],
    reference: np.ndarray | Sequence[float] | None = None,
) -> float:
    """Exact hypervolume dominated by ``points`` (n, k) and bounded by ``reference`` (k,).

    ``reference`` is in the objectives' own units (a ``max`` objective's reference lies below its
    points); default: :func:`default_reference` (worst value plus 10% of the range). Rows with a
    NaN are ignored; points not strictly better than the reference in every objective add
    nothing; no points give 0.0. Exact for every k: a sweep for k = 2, slicing for k = 3; for
    k > 3 the recursion needs up to ``n ** (k - 2)`` sweeps and raises ``NotImplementedError``
    above :data:`MAX_SLICING_CALLS` (e.g. k = 4 with more than 316 non-dominated points).
    """
    arr = _as_matrix(points, "points")
    k = arr.shape[1]
    signs = _signs(modes, k)
    arr = arr[~np.isnan(arr).any(axis=1)]
    if not np.isfinite(arr).all():
        raise ValueError("hypervolume is undefined for infinite objective values")
    if reference is None:
        if arr.shape[0] == 0:
            return 0.0
        reference = default_reference(arr, modes)
    ref = np.asarray(reference, dtype=float)
    if ref.shape != (k,):
        raise ValueError(f"reference must have shape ({k},), got {ref.shape}")
    if not np.isfinite(ref).all():
        raise ValueError(f"reference must be finite, got {ref}")
    ref = ref * signs
    arr = arr * signs
    arr = arr[np.all(arr < ref, axis=1)]
    if arr.shape[0] == 0:
        return 0.0
    arr = np.unique(arr[_nondominated_min(arr)], axis=0)
    if k > 3 and float(arr.shape[0]) ** (k - 2) > MAX_SLICING_CALLS:
        raise NotImplementedError(
            f"exact hypervolume for {k} objectives and {arr.shape[0]} non-dominated points needs "
            f"about {arr.shape[0]}^{k - 2} 2-D sweeps (limit {MAX_SLICING_CALLS}); reduce the "
            "number of objectives or points, or use an approximate (Monte Carlo) estimate"
        )
    return _hv(arr, ref)

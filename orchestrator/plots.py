"""Pictures and text tables of a study's privacy–utility trade-off.

:func:`pareto_plot` draws utility (the first objective, x) against privacy (the second, y) for
the completed trials, one colour per defense, the undefended control as a black star, and the
Pareto front of the two plotted objectives as a staircase; it uses matplotlib's object API
(``Figure`` + ``FigureCanvasAgg``, no pyplot state) and writes the PNG atomically.
:func:`pareto_table` formats front rows as an aligned plain-text table for the terminal.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from orchestrator.pareto import Objective, completed_rows, pareto_mask
from orchestrator.results import PARAM_PREFIX, atomic_write
from orchestrator.values import is_missing

__all__ = ["pareto_plot", "pareto_table"]

_DPI = 150


def _axis_label(objective: Objective, axis: str) -> str:
    """Axis label: the metric name and which direction is better, with an arrow."""
    if axis == "x":
        hint = "higher is better →" if objective.mode == "max" else "← lower is better"
    else:
        hint = "higher is better ↑" if objective.mode == "max" else "lower is better ↓"
    return f"{objective.metric}  ({hint})"


def _staircase(
    xs: np.ndarray, ys: np.ndarray, modes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the attainment staircase through front points ``(xs, ys)``.

    In minimisation space the front sorted by x has y falling; the region the front dominates
    is bounded by horizontal segments at each point's y up to the next point's x, then a
    vertical drop. The vertices are mapped back to the objectives' own units.
    """
    signs = np.array([1.0 if m == "min" else -1.0 for m in modes])
    order = np.lexsort((ys * signs[1], xs * signs[0]))
    fx, fy = xs[order], ys[order]
    vx: list[float] = [float(fx[0])]
    vy: list[float] = [float(fy[0])]
    for i in range(1, len(fx)):
        vx += [float(fx[i]), float(fx[i])]
        vy += [float(fy[i - 1]), float(fy[i])]
    return np.array(vx), np.array(vy)


def _colours(n: int) -> list[Any]:
    """``n`` distinguishable colours (tab10, or tab20 for more than ten defenses)."""
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def pareto_plot(
    df: pd.DataFrame,
    objectives: Sequence[Objective],
    path: Path,
    *,
    defense_col: str = "defense",
    control: str = "none",
    title: str | None = None,
    status_col: str | None = "status",
    baseline: float | None = None,
) -> Path:
    """Scatter utility (x) vs privacy (y) of the completed trials with the Pareto front; save PNG.

    Uses the first two ``objectives`` (x = first, y = second); the staircase is the front of
    those two. Rows whose ``status_col`` is not ``"completed"`` are left out
    (``status_col=None``: all rows), as are rows with a NaN in either objective (their count is
    noted on the plot). Trials whose defense is ``control`` are drawn as black stars and
    annotated. ``baseline``: the privacy value of the population's mean image (what is known
    without any client, :func:`orchestrator.validity.prior_baseline`; e.g. its PSNR), drawn as
    a dashed line the axis always includes. Without any plottable trial the
    figure says so. The PNG is written atomically to ``path`` (parent folders created) and
    ``path`` is returned.
    """
    if len(objectives) < 2:
        raise ValueError("pareto_plot needs two objectives (utility on x, privacy on y)")
    x_obj, y_obj = objectives[0], objectives[1]
    xs, ys, defenses, skipped = _plottable(df, x_obj, y_obj, defense_col, status_col)
    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = sorted({d for d in defenses if d != control})
    for name, colour in zip(names, _colours(len(names)), strict=True):
        sel = defenses == name
        ax.scatter(
            xs[sel],
            ys[sel],
            s=36,
            color=colour,
            alpha=0.85,
            label=f"{name} ({int(sel.sum())})",
            zorder=3,
        )
    if baseline is not None and np.isfinite(baseline):
        label = f"population mean image, known without clients ({baseline:.3g})"
        ax.axhline(baseline, color="0.45", ls="--", lw=1.1, zorder=1, label=label)
    _draw_control(ax, xs[defenses == control], ys[defenses == control], control)
    if len(xs):
        _draw_front(ax, xs, ys, [x_obj.mode, y_obj.mode])
    else:
        note = "no completed trial has both objective values"
        ax.text(0.5, 0.5, note, transform=ax.transAxes, **_NOTE_CENTRE)
    if skipped:
        note = f"{skipped} trial(s) without both values not shown"
        ax.text(0.99, 0.01, note, transform=ax.transAxes, **_NOTE_CORNER)
    ax.set_xlabel(_axis_label(x_obj, "x"))
    ax.set_ylabel(_axis_label(y_obj, "y"))
    ax.set_title(
        title
        if title is not None
        else f"Privacy–utility trade-off ({len(xs)} trial{'' if len(xs) == 1 else 's'})"
    )
    ax.grid(True, alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=_DPI))
    return path


_NOTE_CENTRE: dict[str, Any] = {"ha": "center", "va": "center", "color": "0.4"}
_NOTE_CORNER: dict[str, Any] = {"ha": "right", "va": "bottom", "fontsize": 7, "color": "0.4"}


def _plottable(
    df: pd.DataFrame,
    x_obj: Objective,
    y_obj: Objective,
    defense_col: str,
    status_col: str | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The completed trials' two objectives and defenses where both values are finite, and
    how many trials were left out for a missing value."""
    for column in (x_obj.metric, y_obj.metric, defense_col):
        if column not in df.columns:
            raise KeyError(f"column {column!r} not in the frame (columns: {list(df.columns)})")
    data = completed_rows(df, status_col)
    xs = data[x_obj.metric].to_numpy(dtype=float, na_value=np.nan)
    ys = data[y_obj.metric].to_numpy(dtype=float, na_value=np.nan)
    defenses = np.array(["?" if pd.isna(d) else str(d) for d in data[defense_col]], dtype=object)
    valid = np.isfinite(xs) & np.isfinite(ys)
    return xs[valid], ys[valid], defenses[valid], int((~valid).sum())


def _draw_control(ax: Any, xs: np.ndarray, ys: np.ndarray, control: str) -> None:
    """The control trials as black stars, labelled on the side with more room."""
    if not len(xs):
        return
    ax.scatter(xs, ys, marker="*", s=260, color="black", label=f"{control} (control)", zorder=5)
    ax.autoscale_view()
    left, right = ax.get_xlim()
    for x, y in zip(xs, ys, strict=True):
        on_right = right == left or (x - left) / (right - left) < 0.6
        ax.annotate(
            f"{control} (no defense)",
            xy=(x, y),
            xytext=(9, 6) if on_right else (-9, 6),
            textcoords="offset points",
            ha="left" if on_right else "right",
            fontsize=8,
            zorder=6,
        )


def _draw_front(ax: Any, xs: np.ndarray, ys: np.ndarray, modes: list[str]) -> None:
    """The Pareto front of the plotted trials: a staircase and rings, and the legend."""
    front = pareto_mask(np.column_stack([xs, ys]), modes)
    vx, vy = _staircase(xs[front], ys[front], modes)
    ax.plot(vx, vy, color="0.2", lw=1.4, zorder=2, label=f"Pareto front ({int(front.sum())})")
    ax.scatter(xs[front], ys[front], s=110, facecolors="none", edgecolors="0.2", lw=1.0, zorder=4)
    ax.legend(fontsize="small", loc="best", framealpha=0.9)


def _fmt(value: Any) -> str:
    """A cell: 4 significant digits for floats, plain text for everything else, '' for null."""
    if is_missing(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        f = float(value)
        return f"{f:.4g}" if math.isfinite(f) else str(f)
    return str(value)


def pareto_table(
    front_df: pd.DataFrame, objectives: Sequence[Objective], param_cols: Sequence[str]
) -> str:
    """Front rows as an aligned plain-text table: trial, defense, objectives, non-null params.

    ``trial`` is the ``trial_id`` column (the index when there is none), objective columns are
    headed ``metric (min|max)`` and right-aligned, and ``params`` lists ``name=value`` for every
    column of ``param_cols`` that is not null in that row (``param_`` prefix dropped). Rows keep
    ``front_df``'s order; an empty frame gives the header and ``(no trials on the front)``.
    """
    missing = [c for c in [*(o.metric for o in objectives), *param_cols] if c not in front_df]
    if missing:
        raise KeyError(f"columns {missing} not in the frame (columns: {list(front_df.columns)})")
    header = ["trial", "defense", *(f"{o.metric} ({o.mode})" for o in objectives), "params"]
    right = [False, False, *(True for _ in objectives), False]
    rows: list[list[str]] = []
    for index, row in front_df.iterrows():
        trial = row["trial_id"] if "trial_id" in front_df.columns else index
        params = ", ".join(
            f"{c.removeprefix(PARAM_PREFIX)}={_fmt(row[c])}"
            for c in param_cols
            if not is_missing(row[c])
        )
        rows.append(
            [
                _fmt(trial),
                _fmt(row["defense"]) if "defense" in front_df.columns else "",
                *(_fmt(row[o.metric]) for o in objectives),
                params,
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(cells, widths, right, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows] if rows else ["(no trials on the front)"]
    return "\n".join(out)

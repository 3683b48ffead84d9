"""What a study's trials say, computed from the trials table alone (data in, data out).

The accuracy drop of each completed trial against the undefended control, the Pareto front over
the study's objectives (:mod:`orchestrator.pareto`) and its hypervolume. Nothing here reads or
writes files: :mod:`orchestrator.summary` publishes the result, :mod:`orchestrator.report`
renders it without touching the study's files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.pareto import Objective, hypervolume, pareto_front

CONTROL = "none"


@dataclass
class StudyResults:
    """What a finished study returns: every trial, the Pareto front and its hypervolume."""

    trials: pd.DataFrame
    front: pd.DataFrame
    hypervolume: float | None
    folder: Path


@dataclass(frozen=True)
class Analysis:
    """The derived view of a trials table: ``trials`` with ``accuracy_drop`` and ``pareto``
    filled, the accuracy drops by trial id, the front's rows, its hypervolume (None without
    completed trials or for more than three objectives) and the counts of completed and failed
    trials."""

    trials: pd.DataFrame
    accuracy_drop: dict[str, float]
    front: pd.DataFrame
    hypervolume: float | None
    completed: int
    failed: int


def _completed(trials: pd.DataFrame) -> pd.DataFrame:
    rows: pd.DataFrame
    if trials.empty or "status" not in trials:
        rows = trials.iloc[0:0]
    else:
        rows = trials[trials["status"] == "completed"]
    return rows


def accuracy_drop(trials: pd.DataFrame) -> dict[str, float]:
    """Per completed trial with a test accuracy: the best control (``none``) trial's accuracy
    minus its own; empty without a completed control.

    Example:
        >>> t = pd.DataFrame({"trial_id": ["a", "b"], "status": ["completed"] * 2,
        ...                   "defense": ["none", "prune"], "test_accuracy": [0.9, 0.8]})
        >>> {k: round(v, 3) for k, v in accuracy_drop(t).items()}
        {'a': 0.0, 'b': 0.1}
    """
    done = _completed(trials)
    if done.empty or "test_accuracy" not in done:
        return {}
    accuracy = pd.to_numeric(done["test_accuracy"], errors="coerce")
    control = accuracy[done["defense"] == CONTROL].dropna()
    if control.empty:
        return {}
    base = float(control.max())
    return {
        str(tid): base - float(acc)
        for tid, acc in zip(done["trial_id"], accuracy, strict=True)
        if not np.isnan(acc)
    }


def front_and_volume(
    objectives: Sequence[Objective], trials: pd.DataFrame
) -> tuple[pd.DataFrame, float | None]:
    """The completed trials' Pareto front over ``objectives``, and its hypervolume (up to three
    objectives; trials missing an objective are left out of it)."""
    done = _completed(trials)
    if done.empty:
        return trials.iloc[0:0], None
    front = pareto_front(trials, list(objectives))
    cols = [o.metric for o in objectives]
    if not all(c in done for c in cols) or len(cols) > 3:
        return front, None
    points = done[cols].to_numpy(dtype=float)
    points = points[~np.isnan(points).any(axis=1)]
    if not len(points):
        return front, None
    return front, float(hypervolume(points, [o.mode for o in objectives]))


def analyse(objectives: Sequence[Objective], trials: pd.DataFrame) -> Analysis:
    """Everything :mod:`orchestrator.summary` and the report show, from the trials table: the
    accuracy drop is filled first (it may be an objective), then the front is found."""
    derived = trials.copy()
    drops = accuracy_drop(trials)
    if drops:
        ids = derived["trial_id"].astype(str)
        current = derived.get("accuracy_drop", np.nan)
        derived["accuracy_drop"] = ids.map(drops).where(ids.isin(list(drops)), current)
    front, volume = front_and_volume(objectives, derived)
    if not derived.empty:
        on_front = set(front["trial_id"]) if not front.empty else set()
        derived["pareto"] = derived["trial_id"].astype(str).isin(on_front)
    statuses = trials["status"] if not trials.empty else pd.Series(dtype=str)
    return Analysis(
        trials=derived,
        accuracy_drop=drops,
        front=front,
        hypervolume=volume,
        completed=int((statuses == "completed").sum()),
        failed=int((statuses == "failed").sum()),
    )

"""Resuming a study: its three records (Parquet, MLflow, Optuna) made consistent again.

A driver killed mid-study leaves trials that Parquet holds as ``running`` (interrupted: they
run again), MLflow child runs of those trials (removed), Optuna trials still ``RUNNING`` (failed,
or completed from the Parquet row when the kill came between recording a trial and telling
Optuna) and ``WAITING`` ones (enqueued initial points not yet run). Parquet is the record: a
trial it does not hold as completed runs again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
import pandas as pd

from orchestrator.config import StudyConfig
from orchestrator.search_space import TUNE_TRIAL_ID
from orchestrator.values import is_missing


class TrialRecords(Protocol):
    """The study's Parquet record (:class:`orchestrator.results.ResultStore`)."""

    def trials(self) -> pd.DataFrame: ...

    def remove_trials(self, trial_ids: Sequence[str]) -> None: ...


class TrialRuns(Protocol):
    """The study's MLflow record (:class:`orchestrator.tracking.StudyTracker`)."""

    def remove_trials(self, trial_ids: Iterable[str]) -> None: ...


@dataclass(frozen=True)
class Reconciled:
    """How many trials are done, the initial points (one per defense) still to evaluate, and
    the interrupted trials dropped from the records (their image folders go too)."""

    done: int
    points: list[dict[str, Any]]
    dropped: tuple[str, ...] = ()


def objective_values(cfg: StudyConfig, row: Mapping[str, Any]) -> list[float] | None:
    """The objectives of a recorded trial row, or None when one is missing."""
    values: list[Any] = [row.get(o.metric) for o in cfg.objectives]
    if any(is_missing(v) for v in values):
        return None
    return [float(v) for v in values]


def _completed_rows(df: pd.DataFrame) -> dict[str, Mapping[str, Any]]:
    if df.empty:
        return {}
    done = df[df["status"] == "completed"]
    return {str(r["trial_id"]): r for _, r in done.iterrows()}


def settle_optuna(cfg: StudyConfig, study: optuna.Study, recorded: Mapping[str, Any]) -> set[str]:
    """Fail Optuna's interrupted ``RUNNING`` trials, complete those ``recorded`` in Parquet
    (by their Tune trial id), and return the defenses of its ``WAITING`` (enqueued) trials."""
    waiting: set[str] = set()
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.RUNNING:
            row = recorded.get(str(t.user_attrs.get(TUNE_TRIAL_ID)))
            values = None if row is None else objective_values(cfg, row)
            if values is None:  # interrupted: it runs again
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            else:  # recorded, then the driver died before Optuna was told
                study.tell(t.number, values)
        elif t.state == optuna.trial.TrialState.WAITING:
            waiting.add(str(t.system_attrs.get("fixed_params", {}).get("defense")))
    return waiting


def reconcile(
    cfg: StudyConfig,
    store: TrialRecords,
    tracker: TrialRuns,
    storage: str | optuna.storages.BaseStorage,
    points: Sequence[dict[str, Any]],
) -> Reconciled:
    """Make the records of a study being resumed consistent (see the module docstring) and
    return what is done and which of the initial ``points`` still have to run.

    Args:
        cfg: the study.
        store: its Parquet record; interrupted trials are removed from it.
        tracker: its MLflow record; the interrupted trials' runs are removed.
        storage: its Optuna storage (a URL or a storage object).
        points: the initial points (one per defense) of a fresh study.

    Example:
        >>> reconcile(cfg, store, tracker, "sqlite:///out/study/optuna.db", [])  # doctest: +SKIP
        Reconciled(done=4, points=[])
    """
    df = store.trials()
    interrupted = (
        [] if df.empty else [str(t) for t in df.loc[df["status"] == "running", "trial_id"]]
    )
    store.remove_trials(interrupted)
    tracker.remove_trials(interrupted)
    try:
        study = optuna.load_study(study_name=cfg.study, storage=storage)
    except KeyError:
        study = None
    waiting = set() if study is None else settle_optuna(cfg, study, _completed_rows(df))
    done_rows = _completed_rows(store.trials())
    seen = {str(row["defense"]) for row in done_rows.values()}
    remaining = [p for p in points if p["defense"] not in seen | waiting]
    return Reconciled(done=len(done_rows), points=remaining, dropped=tuple(interrupted))

"""orchestrator.reconcile on Optuna's in-memory storage with a fake Parquet and MLflow record:
no Ray, no files, no ../shared."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import optuna
import pandas as pd
import pytest

from orchestrator.reconcile import objective_values, reconcile
from orchestrator.search_space import TUNE_TRIAL_ID


class FakeStore:
    """The Parquet record, as a table in memory."""

    def __init__(self, rows: list[dict]) -> None:
        self.df = pd.DataFrame(rows)
        self.removed: list[str] = []

    def trials(self) -> pd.DataFrame:
        return self.df.copy()

    def remove_trials(self, trial_ids: Sequence[str]) -> None:
        self.removed.extend(trial_ids)
        self.df = self.df[~self.df["trial_id"].isin(list(trial_ids))]


class FakeTracker:
    """The MLflow record: which trials' runs were removed."""

    def __init__(self) -> None:
        self.removed: list[str] = []

    def remove_trials(self, trial_ids: Iterable[str]) -> None:
        self.removed.extend(trial_ids)


def _row(tid: str, status: str, defense: str, acc: float | None, psnr: float | None) -> dict:
    return {
        "trial_id": tid,
        "status": status,
        "defense": defense,
        "test_accuracy": acc,
        "attack_psnr_max": psnr,
    }


def test_resume_settles_every_record(unit_config) -> None:
    cfg = unit_config
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="unit", storage=storage, directions=["maximize"] * 2)
    recorded, interrupted, enqueued = study.ask(), study.ask(), None
    recorded.set_user_attr(TUNE_TRIAL_ID, "t-recorded")  # recorded, Optuna never told
    interrupted.set_user_attr(TUNE_TRIAL_ID, "t-cut")  # killed mid-trial
    study.enqueue_trial({"defense": "gradient_noise"})  # an initial point not yet run
    enqueued = study.get_trials(deepcopy=False)[-1]
    store = FakeStore(
        [
            _row("t-none", "completed", "none", 0.9, 30.0),
            _row("t-recorded", "completed", "prune", 0.8, 20.0),
            _row("t-cut", "running", "prune", None, None),
        ]
    )
    tracker = FakeTracker()
    points = [{"defense": d} for d in ("none", "prune", "gradient_noise")]

    state = reconcile(cfg, store, tracker, storage, points)

    assert store.removed == tracker.removed == ["t-cut"]
    assert state.done == 2
    assert state.points == []  # none and prune ran, gradient_noise is enqueued already
    trials = {t.number: t for t in study.get_trials()}
    assert trials[recorded.number].state == optuna.trial.TrialState.COMPLETE
    assert trials[recorded.number].values == [0.8, 20.0]
    assert trials[interrupted.number].state == optuna.trial.TrialState.FAIL
    assert trials[enqueued.number].state == optuna.trial.TrialState.WAITING


def test_a_recorded_trial_without_its_objectives_runs_again(unit_config) -> None:
    cfg = unit_config
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="unit", storage=storage, directions=["maximize"] * 2)
    trial = study.ask()
    trial.set_user_attr(TUNE_TRIAL_ID, "t1")
    store = FakeStore([_row("t1", "completed", "none", 0.9, None)])
    state = reconcile(cfg, store, FakeTracker(), storage, [{"defense": "prune"}])
    assert study.get_trials()[0].state == optuna.trial.TrialState.FAIL
    assert state.done == 1 and state.points == [{"defense": "prune"}]


def test_no_optuna_study_yet_keeps_the_points_not_run(unit_config) -> None:
    state = reconcile(
        unit_config,
        FakeStore([_row("t1", "completed", "none", 0.9, 30.0)]),
        FakeTracker(),
        optuna.storages.InMemoryStorage(),
        [{"defense": "none"}, {"defense": "prune"}],
    )
    assert state.done == 1 and state.points == [{"defense": "prune"}]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"test_accuracy": 0.5, "attack_psnr_max": 12.0}, [0.5, 12.0]),
        ({"test_accuracy": 0.5, "attack_psnr_max": float("nan")}, None),
        ({"test_accuracy": 0.5}, None),
    ],
)
def test_objective_values(unit_config, row: dict, expected: list[float] | None) -> None:
    assert objective_values(unit_config, row) == expected

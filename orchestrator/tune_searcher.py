"""The study's Optuna searcher for Ray Tune."""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

from orchestrator.search_space import TUNE_TRIAL_ID


class RecordedFirstOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna of a trial's success only once the study's callback
    has written it to Parquet and MLflow (:meth:`release`; Ray Tune informs the searcher
    before the callbacks). A driver killed in between leaves the Optuna trial RUNNING, and
    resuming completes it from the recorded row (see ``Study._reconcile``), so Optuna never
    holds a completed trial whose results were lost. Each Optuna trial carries its Tune
    trial id as the user attribute ``tune_trial_id`` to make that match."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._held: dict[str, dict[str, Any]] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID, trial_id)
        return config

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if error or not result:
            super().on_trial_complete(trial_id, result, error)
        else:
            self._held[trial_id] = result

    def release(self, trial_id: str) -> None:
        """Tell Optuna of the held success of ``trial_id`` (no-op if none is held)."""
        result = self._held.pop(trial_id, None)
        if result is not None:
            super().on_trial_complete(trial_id, result)

    def discard(self, trial_id: str) -> None:
        """Tell Optuna that ``trial_id`` failed: its success is held but could not be recorded
        (the study's callback marked it failed)."""
        self._held.pop(trial_id, None)
        if trial_id in self._ot_trials:
            super().on_trial_complete(trial_id, None, error=True)

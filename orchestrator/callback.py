"""The driver-side Ray Tune callback that records each trial in Parquet and MLflow.

A write that fails while a trial is recorded (a full disk, a locked MLflow database) marks that
trial ``failed`` with the reason instead of ending the study; only when even that mark cannot be
written does the study stop, with one line naming the file (:class:`StudyIOError`). A finished
trial's round checkpoints and Ray Tune's pickled error are deleted at once
(:mod:`orchestrator.privacy`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune

from orchestrator.analysis import CONTROL
from orchestrator.config import StudyConfig
from orchestrator.privacy import purge_private, redact_tensors
from orchestrator.results import StudyIOError
from orchestrator.search_space import defense_params, trial_params
from orchestrator.tracking import TrackingError
from orchestrator.validity import check_study, validity_line
from orchestrator.values import finite_or_none

if TYPE_CHECKING:
    from orchestrator.results import ResultStore
    from orchestrator.tracking import StudyTracker
    from orchestrator.tune_searcher import RecordedFirstOptunaSearch


def _now() -> datetime:
    return datetime.now(timezone.utc)


class StudyCallback(tune.Callback):
    """Writes a row per trial to ``trials.parquet`` (running, then completed or failed), its
    rounds and attack records, and its MLflow child run; prints a line per finished trial."""

    def __init__(
        self,
        config: StudyConfig,
        store: ResultStore,
        tracker: StudyTracker,
        first_number: int = 0,
        searcher: RecordedFirstOptunaSearch | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.tracker = tracker
        self.searcher = searcher  # told of a completed trial after it is recorded
        self.numbers: dict[str, int] = {}
        self.next_number = first_number
        self.started: dict[str, datetime] = {}
        self.retries: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune may pickle its run config; the store and MLflow client stay in the driver.
        state = dict(self.__dict__)
        state["store"] = state["tracker"] = state["searcher"] = None
        return state

    def _params(self, trial: Any) -> tuple[str, dict[str, Any]]:
        """The trial's defense and every hyperparameter it ran with (defaults included)."""
        defense, params = trial_params(self.config, trial.config)
        return defense, defense_params(self.config, defense, params, with_defaults=True)

    def _base_row(self, trial: Any, status: str) -> dict[str, Any]:
        defense, params = self._params(trial)
        tid = trial.trial_id
        if tid not in self.numbers:
            self.numbers[tid] = self.next_number
            self.next_number += 1
        row: dict[str, Any] = {
            "trial_id": tid,
            "number": self.numbers[tid],
            "status": status,
            "error": None,
            "defense": defense,
            "mlflow_run_id": None,
            "pareto": False,
            "device": None,
            "started_at": self.started.get(tid),
            "finished_at": None,
            "retries": float(self.retries.get(tid, 0)),
        }
        for k, v in params.items():
            row[f"param_{k}"] = (
                v if v is None or isinstance(v, int | float | str | bool) else str(v)
            )
        return row

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = _now()
        self._guarded(trial, lambda: self.store.upsert_trial(self._base_row(trial, "running")))

    def _guarded(self, trial: Any, write: Callable[[], None]) -> bool:
        """Run a recording ``write``; when a file or MLflow write fails, mark the trial failed
        with the reason (:meth:`_record_failure`) and return False."""
        try:
            write()
        except (OSError, TrackingError) as err:
            self._record_failure(trial, err)
            return False
        return True

    def _record_failure(self, trial: Any, err: BaseException) -> None:
        """The trial as ``failed`` because recording it failed: Parquet first, then (unless
        MLflow was what failed) a FAILED MLflow run. A Parquet write that fails again stops
        the study with :class:`StudyIOError`."""
        reason = f"recording the trial failed: {err}"
        defense, params = self._params(trial)
        row = self._base_row(trial, "failed")
        row.update(error=reason, finished_at=_now())
        if not isinstance(err, TrackingError):
            try:
                row["mlflow_run_id"] = self._failed_run(trial, defense, params, reason)
            except TrackingError as again:
                print(f"[obscura] warning: {again}", flush=True)
        try:
            self.store.upsert_trial(row)
        except OSError as again:
            raise StudyIOError(
                f"{again}; the study stops (completed trials are kept: continue with --resume)"
            ) from err
        if self.searcher is not None:
            self.searcher.discard(trial.trial_id)
        print(f"[obscura] trial {row['number']} ({defense}) FAILED: {reason}", flush=True)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """A trial failed (its node was lost, it raised) and Ray Tune retries it
        (``search.max_failures``)."""
        self.retries[trial.trial_id] = self.retries.get(trial.trial_id, 0) + 1
        number = self.numbers.get(trial.trial_id, "?")
        print(
            f"[obscura] trial {number} failed and is retried "
            f"({self.retries[trial.trial_id]} of at most {self.config.search.max_failures})",
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        try:
            recorded = self._guarded(trial, lambda: self._record_completed(trial))
            if recorded and self.searcher is not None:
                self.searcher.release(trial.trial_id)
        finally:
            _drop_private(trial)

    def _record_completed(self, trial: Any) -> None:
        """The completed trial in MLflow (with its images) and Parquet; one line printed."""
        result = trial.last_result or {}
        row = self._base_row(trial, "completed")
        metrics = {m: finite_or_none(result.get(m)) for m in self.config.metric_names()}
        rounds = json.loads(result.get("rounds_json", "[]"))
        attacks = json.loads(result.get("attacks_json", "[]"))
        images = [Path(p) for p in json.loads(result.get("images_json", "[]"))]
        defense, params = self._params(trial)
        run_id = self.tracker.log_trial(
            trial.trial_id,
            params={"defense": defense, **params},
            metrics=metrics,
            rounds=rounds,
            tags=self._tags(defense, result),
            images=images,
        )
        row.update(metrics)
        row.update(mlflow_run_id=run_id, device=result.get("device"), finished_at=_now())
        self.store.add_rounds(trial.trial_id, rounds)
        self.store.add_attacks(trial.trial_id, attacks)
        self.store.upsert_trial(row)
        shown = ", ".join(
            f"{o.metric}={metrics.get(o.metric):.4g}"
            if metrics.get(o.metric) is not None
            else f"{o.metric}=n/a"
            for o in self.config.objectives
        )
        print(f"[obscura] trial {row['number']} ({defense}) completed: {shown}", flush=True)
        if defense == CONTROL:  # the study's validity is known as soon as its control is
            verdict = check_study(self.store.trials(), self.config.validity)
            print(validity_line(verdict), flush=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        error = _error_text(trial)
        try:
            self._guarded(trial, lambda: self._record_error(trial, error))
        finally:
            _drop_private(trial)

    def _record_error(self, trial: Any, error: str) -> None:
        """A trial that raised: a FAILED MLflow run and a ``failed`` row with its error."""
        row = self._base_row(trial, "failed")
        defense, params = self._params(trial)
        run_id = self._failed_run(trial, defense, params, error)
        row.update(error=error, mlflow_run_id=run_id, finished_at=_now())
        self.store.upsert_trial(row)
        print(
            f"[obscura] trial {row['number']} ({defense}) FAILED: {error.splitlines()[-1]}",
            flush=True,
        )

    def _failed_run(self, trial: Any, defense: str, params: dict[str, Any], error: str) -> str:
        """A FAILED MLflow child run of ``trial`` with ``error``; returns its run id."""
        return self.tracker.log_trial(
            trial.trial_id,
            params={"defense": defense, **params},
            metrics={},
            rounds=[],
            tags=self._tags(defense, {}),
            status="FAILED",
            error=error,
        )

    def _tags(self, defense: str, result: dict[str, Any]) -> dict[str, str]:
        from orchestrator.tracking import code_version

        cfg = self.config
        return {
            "defense": defense,
            "attacks": ",".join(a.key for a in cfg.attacks),
            "dataset": cfg.data.dataset,
            "model": cfg.model.name,
            "seed": str(cfg.seed),
            "code_version": code_version(),
            "device": str(result.get("device", "")),
            "gpu_ids": str(result.get("gpu_ids", "")),
        }


def _drop_private(trial: Any) -> None:
    """Delete a finished trial's round checkpoints and Ray Tune's pickled error (in the study
    folder and in Ray's local staging folder): they may hold its captured updates and the
    victims' private images, and are only needed while Ray Tune may still retry it. A file
    that cannot be deleted is named in a warning; the driver's final purge tries again."""
    for attr in ("path", "local_path"):
        path = getattr(trial, attr, None)
        if not path or not Path(path).is_dir():
            continue
        try:
            purge_private(Path(path))
        except StudyIOError as err:
            print(f"[obscura] warning: {err}", flush=True)


def _error_text(trial: Any) -> str:
    """The trial's error: Tune's error file when there is one."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        return redact_tensors(Path(path).read_text(errors="replace"))[-4000:]
    msg = getattr(trial, "error_msg", None)
    return redact_tensors(str(msg or "trial failed (no error message recorded by Ray Tune)"))

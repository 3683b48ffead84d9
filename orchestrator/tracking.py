"""MLflow tracking: one parent run per study, one child run per trial.

All MLflow writes happen in the study's driver process (a Ray Tune callback), so a SQLite
tracking store has a single writer. A child run is created when its trial finishes and closed at
once; a re-logged trial (after a resume) replaces its earlier child run, and child runs left
RUNNING by a killed driver are marked KILLED on resume, so a study never shows duplicate or
forever-running trials. A run that is replaced or dropped loses its artefacts (images included)
at once, not at ``mlflow gc``. An MLflow failure (a locked SQLite database) is one
:class:`TrackingError` line naming the store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeGuard

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

TRIAL_TAG = "obscura.trial_id"
STUDY_TAG = "obscura.study"
PARENT_TAG = "mlflow.parentRunId"
#: MLflow 3's experiment-kind tag; "custom_model_development" opens the runs table, not GenAI.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
#: The parent run's tag with :class:`orchestrator.validity.Validity`'s status.
VALIDITY_TAG = "validity"
#: The parent run's tag with the control's figures behind that status: its gain over the
#: population mean image and its identification rate, against the thresholds.
VALIDITY_FIGURES_TAG = "validity_figures"


class TrackingError(RuntimeError):
    """The MLflow tracking URI cannot be reached or used."""


SQLITE_PREFIX = "sqlite:///"


def store_name(uri: str) -> str:
    """The file of a SQLite tracking URI, else the URI (what an error message names)."""
    return uri[len(SQLITE_PREFIX) :] if uri.startswith(SQLITE_PREFIX) else uri


def delete_run_artifacts(client: MlflowClient, run_id: str) -> None:
    """Delete a run's artefacts from its artefact store, then (soft-)delete the run: a
    soft-deleted run keeps its files, private images included, until ``mlflow gc``.

    Args:
        client: the tracking client.
        run_id: the run.

    Raises:
        mlflow.exceptions.MlflowException: the store refuses (callers turn it into
            :class:`TrackingError`).

    Example:
        >>> delete_run_artifacts(MlflowClient("sqlite:///mlflow.db"), "0f1e2d")  # doctest: +SKIP
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    uri = client.get_run(run_id).info.artifact_uri
    if uri:
        get_artifact_repository(uri).delete_artifacts()
    client.delete_run(run_id)


def ensure_reachable(uri: str) -> None:
    """Raise TrackingError at once when an ``http(s)://`` tracking server does not answer
    (MLflow's own client would retry with back-off for minutes)."""
    from orchestrator.network import check_tracking_uri

    why = check_tracking_uri(uri)
    if why is not None:
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {uri!r} ({why}). Start it "
            "(`mlflow server`), fix tracking.mlflow_uri, or use a local file store such as "
            "sqlite:///mlflow.db"
        )


def code_version() -> str:
    """The package version plus the git commit of the source tree when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("obscura")
    except PackageNotFoundError:
        v = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return f"{v}+{commit}" if commit else v


class StudyTracker:
    """The MLflow side of one study."""

    def __init__(self, uri: str, study: str, folder: Path, *, resume: bool) -> None:
        ensure_reachable(uri)
        # MLflow's SQL store logs a traceback before raising a locked-database error; the
        # error itself reaches us and is reported as one line (:meth:`_mlflow`)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.folder = folder
        try:
            exp = self.client.get_experiment_by_name(study)
            self.experiment_id = (
                exp.experiment_id if exp is not None else self.client.create_experiment(study)
            )
            # MLflow 3's UI opens an experiment by its kind: the runs table for model training
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        except Exception as err:  # MLflow raises many types for an unreachable store
            raise TrackingError(
                f"cannot use the MLflow tracking URI {uri!r}: {err}. Check tracking.mlflow_uri "
                "(default sqlite:///mlflow.db) or start the tracking server."
            ) from err
        with self._mlflow("opening the study's parent run"):
            self.parent_run_id = self._parent(study, resume)

    def _parent(self, study: str, resume: bool) -> str:
        """The parent run: reopened from ``tracking.json`` on resume, else a new one recorded
        there (written atomically)."""
        from orchestrator.results import atomic_write

        state_file = self.folder / "tracking.json"
        if resume and state_file.exists():
            parent = str(json.loads(state_file.read_text())["parent_run_id"])
            if self.client.get_run(parent).info.status != "RUNNING":
                self.client.update_run(parent, status="RUNNING")
            self._close_orphans(parent)
            return parent
        run = self.client.create_run(self.experiment_id, run_name=study, tags={STUDY_TAG: study})
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"parent_run_id": run.info.run_id, "tracking_uri": self.uri})
        atomic_write(state_file, lambda fh: fh.write(text.encode("utf-8")))
        return str(run.info.run_id)

    @contextlib.contextmanager
    def _mlflow(self, what: str) -> Iterator[None]:
        """Turn an MLflow failure (a locked SQLite database, a server error) into one
        :class:`TrackingError` line naming the store and what to do."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as err:
            first = str(err.message).strip().splitlines()[0] if str(err.message) else repr(err)
            todo = (
                "another process is writing to it (a second study, an `mlflow` command?): "
                "stop it, then continue the study with --resume"
                if "locked" in first
                else "check tracking.mlflow_uri and the tracking server, then continue the "
                "study with --resume"
            )
            raise TrackingError(
                f"MLflow store {store_name(self.uri)}: {what} failed ({first}); {todo}"
            ) from err

    def _children(self, parent: str) -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent}'",
            max_results=10000,
        )

    def _close_orphans(self, parent: str) -> None:
        for run in self._children(parent):
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status="KILLED")

    def remove_trials(self, trial_ids: Iterable[str]) -> None:
        """Delete the child runs of ``trial_ids`` (a resumed study re-runs the trials a killed
        driver left unrecorded; a child run it had already finished would count twice)."""
        ids = set(trial_ids)
        if not ids:
            return
        with self._mlflow("deleting the runs of interrupted trials"):
            for run in self._children(self.parent_run_id):
                if run.data.tags.get(TRIAL_TAG) in ids:
                    delete_run_artifacts(self.client, run.info.run_id)

    def log_study(self, params: dict[str, Any], study_yaml: str) -> None:
        """Study-level parameters and the validated study file."""
        with self._mlflow("logging the study's parameters"):
            self.client.log_batch(
                self.parent_run_id,
                params=[Param(k[:250], str(v)[:6000]) for k, v in params.items()],
            )
            self.client.log_text(self.parent_run_id, study_yaml, "study.yaml")

    def log_trial(self, trial_id: str, **run: Any) -> str:
        """Create (or replace, artefacts deleted) the child run of a trial and close it;
        returns its run id. Keywords: ``params``, ``metrics``, ``rounds``, ``tags`` and
        optionally ``images``, ``status`` (default ``FINISHED``) and ``error``.

        Raises:
            TrackingError: MLflow refused (e.g. a locked SQLite database); one line.
        """
        with self._mlflow(f"logging trial {trial_id}"):
            return self._log_trial(trial_id, **run)

    def _log_trial(
        self,
        trial_id: str,
        *,
        params: dict[str, Any],
        metrics: dict[str, float | None],
        rounds: Iterable[dict[str, Any]],
        tags: dict[str, str],
        images: Iterable[Path] = (),
        status: str = "FINISHED",
        error: str | None = None,
    ) -> str:
        for run in self._children(self.parent_run_id):
            if run.data.tags.get(TRIAL_TAG) == trial_id:
                delete_run_artifacts(self.client, run.info.run_id)
        all_tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial_id, **tags}
        if error:
            all_tags["error"] = error[:5000]
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{tags.get('defense', 'trial')}-{trial_id}",
            tags=all_tags,
        )
        run_id: str = run.info.run_id
        now = int(time.time() * 1000)
        batch: list[Metric] = []
        last = -1
        for r in rounds:
            step = int(r["round"])
            last = max(last, step)
            for k, v in r.items():
                if k != "round" and _finite(v):
                    batch.append(Metric(k, float(v), now, step))
        # final values at the last round's step: for per-round metrics they are that round's
        batch += [Metric(k, float(v), now, max(last, 0)) for k, v in metrics.items() if _finite(v)]
        for start in range(0, len(batch), 900):
            self.client.log_batch(run_id, metrics=batch[start : start + 900])
        self.client.log_batch(
            run_id,
            params=[Param(k[:250], str(v)[:6000]) for k, v in params.items()],
            tags=[RunTag("status_detail", status)],
        )
        for path in images:
            self.client.log_artifact(run_id, str(path), artifact_path="images")
        self.client.set_terminated(run_id, status=status)
        return run_id

    def finish(
        self,
        artifacts: Iterable[Path],
        metrics: dict[str, float | None],
        tags: dict[str, str] | None = None,
    ) -> None:
        """Log the study's final artifacts (pareto plot, tables), metrics and ``tags`` (e.g.
        ``validity``) and close the parent run (a failure: :class:`TrackingError`)."""
        with self._mlflow("closing the study's parent run"):
            self._finish(artifacts, metrics, tags)

    def _finish(
        self,
        artifacts: Iterable[Path],
        metrics: dict[str, float | None],
        tags: dict[str, str] | None = None,
    ) -> None:
        for key, value in (tags or {}).items():
            self.client.set_tag(self.parent_run_id, key, value)
        for path in artifacts:
            if path.exists():
                self.client.log_artifact(self.parent_run_id, str(path))
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if _finite(v)]
        if batch:
            self.client.log_batch(self.parent_run_id, metrics=batch)
        self.client.set_terminated(
            self.parent_run_id, status=RunStatus.to_string(RunStatus.FINISHED)
        )

    def interrupt(self) -> None:
        """Mark the parent run KILLED (Ctrl-C); a resume reopens it."""
        with self._mlflow("marking the study interrupted"):
            self.client.set_terminated(self.parent_run_id, status="KILLED")


def _finite(v: Any) -> TypeGuard[float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))

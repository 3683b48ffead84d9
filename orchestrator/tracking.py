"""MLflow tracking: one parent run per study, one child run per trial.

All MLflow writes happen in the study's driver process (a Ray Tune callback), so a SQLite
tracking store has a single writer. A child run is created when its trial finishes and closed at
once; a re-logged trial (after a resume) replaces its earlier child run, and child runs left
RUNNING by a killed driver are marked KILLED on resume, so a study never shows duplicate or
forever-running trials.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

TRIAL_TAG = "obscura.trial_id"
STUDY_TAG = "obscura.study"
PARENT_TAG = "mlflow.parentRunId"


class TrackingError(RuntimeError):
    """The MLflow tracking URI cannot be reached or used."""


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
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.folder = folder
        try:
            exp = self.client.get_experiment_by_name(study)
            self.experiment_id = (
                exp.experiment_id if exp is not None else self.client.create_experiment(study)
            )
        except Exception as err:  # MLflow raises many types for an unreachable store
            raise TrackingError(
                f"cannot use the MLflow tracking URI {uri!r}: {err}. Check tracking.mlflow_uri "
                "(default sqlite:///mlflow.db) or start the tracking server."
            ) from err
        state_file = folder / "tracking.json"
        parent = None
        if resume and state_file.exists():
            parent = json.loads(state_file.read_text())["parent_run_id"]
            if self.client.get_run(parent).info.status != "RUNNING":
                self.client.update_run(parent, status="RUNNING")
            self._close_orphans(parent)
        if parent is None:
            run = self.client.create_run(
                self.experiment_id, run_name=study, tags={STUDY_TAG: study}
            )
            parent = run.info.run_id
            folder.mkdir(parents=True, exist_ok=True)
            tmp = state_file.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri}))
            tmp.replace(state_file)
        self.parent_run_id = parent

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
        for run in self._children(self.parent_run_id):
            if run.data.tags.get(TRIAL_TAG) in ids:
                self.client.delete_run(run.info.run_id)

    def log_study(self, params: dict[str, Any], study_yaml: str) -> None:
        """Study-level parameters and the validated study file."""
        self.client.log_batch(
            self.parent_run_id,
            params=[Param(k[:250], str(v)[:6000]) for k, v in params.items()],
        )
        self.client.log_text(self.parent_run_id, study_yaml, "study.yaml")

    def log_trial(
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
        """Create (or replace) the child run of a trial and close it; returns its run id."""
        for run in self._children(self.parent_run_id):
            if run.data.tags.get(TRIAL_TAG) == trial_id:
                self.client.delete_run(run.info.run_id)
        all_tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial_id, **tags}
        if error:
            all_tags["error"] = error[:5000]
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{tags.get('defense', 'trial')}-{trial_id}",
            tags=all_tags,
        )
        run_id = run.info.run_id
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

    def finish(self, artifacts: Iterable[Path], metrics: dict[str, float | None]) -> None:
        """Log the study's final artifacts (pareto plot, tables) and close the parent run."""
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
        self.client.set_terminated(self.parent_run_id, status="KILLED")


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))

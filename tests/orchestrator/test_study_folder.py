"""The study folder: one writer (a lock), resume refuses what it cannot continue, read and write
failures are one line, a failing callback write fails that trial only, and MLflow runs a resume
drops lose their artefacts. Real files, real processes, real SQLite, real Ray for the studies."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from defenses import Defense, register_defense, unregister_defense
from orchestrator.callback import StudyCallback
from orchestrator.cli import main
from orchestrator.config import StudyFileError, dump_study, load_study
from orchestrator.folder_lock import LOCK_FILE, FolderLockedError, StudyLock
from orchestrator.results import ResultStore, StudyIOError
from orchestrator.resume_check import check_study_folder, config_differences
from orchestrator.tracking import StudyTracker

ROOT = Path(__file__).resolve().parents[2]

_HOLD = """
import sys, time
from pathlib import Path
from orchestrator.folder_lock import StudyLock
lock = StudyLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process (a stand-in driver) holding the folder's lock until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(folder)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _stored_study(tiny_study, changes: dict | None = None) -> tuple[Path, object]:
    """A study file and its folder holding that study's ``study.yaml`` (as a run writes it)."""
    path = tiny_study(changes)
    cfg = load_study(path)
    cfg.folder.mkdir(parents=True)
    (cfg.folder / "study.yaml").write_text(dump_study(cfg))
    return path, cfg


def test_a_second_driver_exits_1_at_once_naming_the_holder(tiny_study, capsys) -> None:
    path, cfg = _stored_study(tiny_study)
    holder = _hold_lock(cfg.folder)
    try:
        started = time.perf_counter()
        assert main(["study", str(path), "--resume"]) == 1
        assert main(["study", str(path)]) == 1  # with or without --resume
        seconds = time.perf_counter() - started
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"pid {holder.pid} on host {socket.gethostname()}" in err, err
    assert "started 20" in err and "Traceback" not in err
    assert seconds < 30  # no Ray started, no trial touched
    assert not (cfg.folder / "trials.parquet").exists()


def test_a_stale_lock_is_taken_over_and_another_hosts_is_refused(tmp_path, capsys) -> None:
    folder = tmp_path / "study"
    holder = _hold_lock(folder)
    holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel drops the flock
    holder.wait()
    stale = json.loads((folder / LOCK_FILE).read_text())
    assert stale["pid"] == holder.pid
    with StudyLock(folder):
        mine = json.loads((folder / LOCK_FILE).read_text())
        assert mine["pid"] == os.getpid()
        with pytest.raises(FolderLockedError, match=f"pid {os.getpid()}"):
            StudyLock(folder).acquire()  # a second lock, even from this process
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and f"pid {holder.pid}" in err
    assert (folder / LOCK_FILE).read_text() == ""  # released: emptied, not deleted
    elsewhere = {"pid": 1, "host": "another-node", "started": "2026-01-01T00:00:00+00:00"}
    (folder / LOCK_FILE).write_text(json.dumps(elsewhere))
    with pytest.raises(FolderLockedError, match=f"another-node.*delete {folder / LOCK_FILE}"):
        StudyLock(folder).acquire()


def test_resume_refuses_a_changed_study_before_writing_anything(tiny_study, capsys) -> None:
    path, cfg = _stored_study(tiny_study)
    stored = (cfg.folder / "study.yaml").read_bytes()
    changed = tiny_study(
        {"seed": 1, "federation.rounds": 3, "defenses.prune": {}}, name="changed.yaml"
    )
    assert main(["study", str(changed), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "defenses.prune.percent" in err and "federation.rounds" in err and "seed" in err
    assert "Traceback" not in err
    assert (cfg.folder / "study.yaml").read_bytes() == stored  # compared before overwritten
    # what a resume may change: more trials, other concurrency, another output folder
    grown = load_study(path, {"search.trials": 9, "search.concurrency": 1})
    check_study_folder(grown, resume=True)
    assert config_differences({"output": "/a", "seed": 0}, {"output": "/b", "seed": 0}) == {}


def test_resume_without_a_study_or_with_another_tracking_uri_is_refused(
    tiny_study, tmp_path, capsys
) -> None:
    path = tiny_study()
    assert main(["study", str(path), "--resume"]) == 2
    assert "no study to resume" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    path, cfg = _stored_study(tiny_study)
    stored_uri = f"sqlite:///{tmp_path}/elsewhere.db"
    (cfg.folder / "tracking.json").write_text(
        json.dumps({"parent_run_id": "abc", "tracking_uri": stored_uri})
    )
    with pytest.raises(StudyFileError) as err:
        check_study_folder(cfg, resume=True)
    assert stored_uri in str(err.value) and cfg.tracking.mlflow_uri in str(err.value)


def _tables(folder: Path) -> ResultStore:
    store = ResultStore(folder)
    store.upsert_trial({"trial_id": "t0", "status": "completed", "defense": "none"})
    store.upsert_trial({"trial_id": "t1", "status": "running", "defense": "prune"})
    return store


def test_a_truncated_parquet_file_is_one_line_exit_1(tiny_study, capsys) -> None:
    path, cfg = _stored_study(tiny_study)
    store = _tables(cfg.folder)
    data = store.trials_path.read_bytes()
    store.trials_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StudyIOError, match=r"trials\.parquet.*truncated or corrupt"):
        ResultStore(cfg.folder)
    assert main(["study", str(path), "--resume"]) == 1
    assert main(["report", str(cfg.folder)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and all(str(store.trials_path) in line for line in lines), err
    assert "Traceback" not in err


def test_report_on_a_folder_without_a_completed_trial_says_so(tiny_study, capsys) -> None:
    _, cfg = _stored_study(tiny_study)
    store = ResultStore(cfg.folder)
    store.upsert_trial({"trial_id": "t0", "status": "failed", "defense": "none"})
    store.upsert_trial({"trial_id": "t1", "status": "running", "defense": "prune"})
    before = store.trials_path.read_bytes()
    assert main(["report", str(cfg.folder)]) == 1
    err = capsys.readouterr().err
    assert "no completed trial yet (1 failed, 1 running)" in err and "Traceback" not in err
    assert store.trials_path.read_bytes() == before
    assert not (cfg.folder / "report.html").exists()
    reader = ResultStore(cfg.folder, read_only=True)
    with pytest.raises(PermissionError, match="read-only"):
        reader.upsert_trial({"trial_id": "t2", "status": "running", "defense": "none"})
    assert store.trials_path.read_bytes() == before


def test_tracking_json_is_written_atomically(tmp_path) -> None:
    """The temporary file of tracking.json lands on a full disk (``/dev/full``): the error
    names tracking.json and says to free space, and no partial tracking.json is left."""
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / f"tracking.json.tmp-{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(StudyIOError, match=r"tracking\.json: No space left on device; free space"):
        StudyTracker(f"sqlite:///{tmp_path}/mlflow.db", "s", folder, resume=False)
    assert sorted(p.name for p in folder.iterdir()) == []


def _image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "grid.png"
    Image.new("L", (8, 8), color=200).save(path)
    return path


def _log(tracker: StudyTracker, trial_id: str, images: list[Path]) -> str:
    return tracker.log_trial(
        trial_id, params={}, metrics={"m": 1.0}, rounds=[], tags={}, images=images
    )


def test_dropped_and_replaced_runs_lose_their_artefacts(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # SQLite stores artefacts under ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = StudyTracker(uri, "s", tmp_path / "study", resume=False)
    client = MlflowClient(tracking_uri=uri)
    first = _log(tracker, "t0", [_image(tmp_path)])
    first_dir = Path(client.get_run(first).info.artifact_uri.removeprefix("file://"))
    assert (first_dir / "images" / "grid.png").is_file()
    second = _log(tracker, "t0", [_image(tmp_path)])  # a re-logged trial replaces its run
    assert not first_dir.exists()
    second_dir = Path(client.get_run(second).info.artifact_uri.removeprefix("file://"))
    tracker.remove_trials(["t0"])  # a resume drops the trial
    assert not second_dir.exists()
    assert client.get_run(second).info.lifecycle_stage == "deleted"


def _fake_trial(trial_id: str) -> SimpleNamespace:
    """What the callback reads of a Ray Tune trial (as in test_callback.py)."""
    result = {"test_accuracy": 0.5, "rounds_json": "[]", "attacks_json": "[]"}
    return SimpleNamespace(
        trial_id=trial_id, config={"defense": "none"}, path=None, last_result=result
    )


@pytest.mark.slow  # a real study or MLflow's 20 s busy wait
def test_a_locked_mlflow_database_fails_the_trial_not_the_study(unit_config, tmp_path) -> None:
    """A SQLite store locked by another process (MLflow gives up after its 20 s busy
    timeout): the trial is recorded failed in Parquet with the reason, nothing raises."""
    db = tmp_path / "mlflow.db"
    tracker = StudyTracker(f"sqlite:///{db}", "s", tmp_path / "study", resume=False)
    store = ResultStore(tmp_path / "study")
    callback = StudyCallback(unit_config, store, tracker)
    trial = _fake_trial("t0")
    callback.on_trial_start(0, [], trial)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        callback.on_trial_complete(0, [], trial)
    finally:
        other.execute("ROLLBACK")
        other.close()
    row = store.trials().iloc[0]
    assert row["status"] == "failed"
    assert f"MLflow store {db}" in row["error"] and "database is locked" in row["error"]
    assert "--resume" in row["error"]


@pytest.mark.slow  # a real study or MLflow's 20 s busy wait
def test_a_full_disk_fails_the_trial_and_the_study_goes_on(tiny_study, local_ray_run) -> None:
    """The first completed trial's rounds.parquet write lands on ``/dev/full`` (ENOSPC): that
    trial is recorded failed, saying to free space; the next one completes."""
    cfg = load_study(tiny_study({"search.trials": 2, "search.concurrency": 1}))
    cfg.folder.mkdir(parents=True)
    (cfg.folder / f"rounds.parquet.tmp-{os.getpid()}").symlink_to("/dev/full")
    local_ray_run(cfg)
    trials = pd.read_parquet(cfg.folder / "trials.parquet")
    assert sorted(trials["status"]) == ["completed", "failed"]
    error = trials.loc[trials["status"] == "failed", "error"].iloc[0]
    assert "rounds.parquet: No space left on device; free space on its disk" in error
    for name in ("ray", "images"):
        assert (cfg.folder / name).stat().st_mode & 0o777 == 0o700, name
    assert not list((cfg.folder / "ray").rglob("simulator.pt"))


@pytest.mark.slow  # a real study or MLflow's 20 s busy wait
def test_a_write_that_keeps_failing_ends_the_study_in_one_line(tiny_study, capsys) -> None:
    """trials.parquet cannot be written at all (its temporary name is taken by a folder): the
    trial cannot even be marked failed, so the study stops: exit 1, one line naming the file."""
    import ray

    path = tiny_study({"search.trials": 1})
    cfg = load_study(path)
    cfg.folder.mkdir(parents=True)
    (cfg.folder / f"trials.parquet.tmp-{os.getpid()}").mkdir()
    ray.shutdown()
    try:
        assert main(["study", str(path)]) == 1
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "trials.parquet" in lines[0] and "--resume" in lines[0], err
    assert "Traceback" not in err
    assert not list((cfg.folder / "ray").rglob("simulator.pt"))


class _RaisesWithImages(Defense):
    """A user's defense whose exception carries the batch itself: Ray Tune pickles the
    exception into the trial's ``error.pkl``, which would keep the private images."""

    def transform_batch(self, images, labels, model, ctx):
        raise ValueError("bad batch", images.clone())


@pytest.mark.slow  # a real study or MLflow's 20 s busy wait
def test_a_failed_trial_leaves_no_pickled_error(tiny_study, local_ray_run) -> None:
    register_defense("raises_with_images")(_RaisesWithImages)
    try:
        cfg = load_study(tiny_study({"defenses": {"raises_with_images": {}}, "search.trials": 1}))
        local_ray_run(cfg)
    finally:
        unregister_defense("raises_with_images")
    trials = pd.read_parquet(cfg.folder / "trials.parquet")
    assert list(trials["status"]) == ["failed"]
    assert list((cfg.folder / "ray").rglob("error.txt"))  # Ray's text of the error stays
    assert not list((cfg.folder / "ray").rglob("error.pkl"))


def test_python_api_overrides_are_validated_like_the_study_file(tiny_study) -> None:
    """``Study.run(trials=, concurrency=)`` goes through the same bounds as the study file."""
    import pydantic

    from orchestrator import Study

    study = Study.from_yaml(tiny_study())
    for trials, concurrency in ((0, None), (None, -2), (10**9, None)):
        with pytest.raises(pydantic.ValidationError):
            study._effective(trials, concurrency, None)
    assert study._effective(3, 2, None).search.trials == 3

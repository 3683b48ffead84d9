"""StudyCallback without a Ray cluster: fake Tune trials, a real Parquet store, a fake MLflow
tracker and searcher (no ../shared)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from orchestrator.callback import StudyCallback
from orchestrator.results import ResultStore, attack_record


class FakeTracker:
    """Records what the callback logs to MLflow."""

    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []

    def log_trial(self, trial_id: str, **run: Any) -> str:
        self.logged.append({"trial_id": trial_id, **run})
        return f"run-{trial_id}"


class FakeSearcher:
    def __init__(self) -> None:
        self.released: list[str] = []

    def release(self, trial_id: str) -> None:
        self.released.append(trial_id)


def _trial(trial_id: str, config: dict[str, Any], **extra: Any) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config=config, path=None, **extra)


def _result() -> dict[str, Any]:
    image = {"index": 0, "psnr": 21.5, "ssim": 0.4, "lpips": None, "label_correct": True}
    return {
        "test_accuracy": 0.75,
        "attack_psnr_max": float("nan"),  # a metric Ray reports as NaN
        "device": "cpu",
        "rounds_json": json.dumps([{"round": 0, "train_loss": 0.5, "seconds": 1.0}]),
        "attacks_json": json.dumps(
            [attack_record("idlg", 0, 1, image, seconds=2.0, diverged=False)]
        ),
        "images_json": "[]",
    }


def test_a_completed_trial_is_recorded_everywhere(unit_config, tmp_path: Path, capsys) -> None:
    store, tracker, searcher = ResultStore(tmp_path), FakeTracker(), FakeSearcher()
    callback = StudyCallback(unit_config, store, tracker, first_number=3, searcher=searcher)
    trial = _trial("t1", {"defense": "prune", "prune.percent": 40.0}, last_result=_result())
    callback.on_trial_start(0, [], trial)
    running = store.trials().set_index("trial_id").loc["t1"]
    assert running["status"] == "running" and running["number"] == 3
    callback.on_trial_complete(0, [], trial)

    row = store.trials().set_index("trial_id").loc["t1"]
    assert row["status"] == "completed" and row["mlflow_run_id"] == "run-t1"
    assert row["test_accuracy"] == 0.75 and row["param_percent"] == 40.0
    assert row["attack_psnr_max"] != row["attack_psnr_max"]  # NaN: stored as missing
    (logged,) = tracker.logged
    assert logged["params"]["defense"] == "prune" and logged["params"]["percent"] == 40.0
    assert logged["metrics"]["attack_psnr_max"] is None
    assert list(store.attacks()["psnr"]) == [21.5] and list(store.rounds()["round"]) == [0]
    assert searcher.released == ["t1"]  # Optuna is told only after the record
    assert "trial 3 (prune) completed: test_accuracy=0.75, attack_psnr_max=n/a" in (
        capsys.readouterr().out
    )


def test_a_failed_trial_is_recorded_with_its_error(unit_config, tmp_path: Path, capsys) -> None:
    store, tracker = ResultStore(tmp_path), FakeTracker()
    callback = StudyCallback(unit_config, store, tracker)
    trial = _trial("t2", {"defense": "none"}, error_file=None, error_msg="boom: bad input")
    callback.on_trial_start(0, [], trial)
    callback.on_trial_error(0, [], trial)
    row = store.trials().set_index("trial_id").loc["t2"]
    assert row["status"] == "failed" and row["error"] == "boom: bad input"
    assert tracker.logged[0]["status"] == "FAILED"
    assert "trial 0 (none) FAILED: boom: bad input" in capsys.readouterr().out

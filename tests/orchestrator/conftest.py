"""A tiny but real study for the orchestrator tests (real data, real Ray, real MLflow)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml


def tiny_raw(tmp_path: Path, shared_dir: Path) -> dict[str, Any]:
    """Four trials of seconds each: MLP on 16 px PneumoniaMNIST, FedSGD, iDLG."""
    return {
        "study": "tiny",
        "seed": 0,
        "data": {"dataset": "pneumoniamnist", "root": str(shared_dir / "data"), "image_size": 16},
        "model": {"name": "mlp", "hidden": [16]},
        "federation": {
            "algorithm": "fedsgd",
            "clients": 2,
            "clients_per_round": 2,
            "rounds": 2,
            "batch_size": 2,
            "lr": 0.1,
            "partition": {"scheme": "iid", "max_per_client": 16},
        },
        "defenses": {
            "none": {},
            "gradient_noise": {"scale": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
            "prune": {"percent": {"type": "float", "low": 10, "high": 90}},
        },
        "attacks": [{"name": "idlg", "rounds": [0], "victims": 1, "params": {"iterations": 2}}],
        "objectives": [
            {"metric": "test_accuracy", "mode": "max"},
            {"metric": "attack_psnr_max", "mode": "min"},
        ],
        "search": {"sampler": "random", "trials": 4, "concurrency": 2},
        "tracking": {"mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db", "log_images": "pairs"},
        "output": str(tmp_path / "results"),
        "lpips_backbone": str(shared_dir / "weights" / "lpips_alexnet_features.pth"),
    }


def write_study(
    folder: Path, shared_dir: Path, changes: dict[str, Any] | None = None, name: str = "study.yaml"
) -> Path:
    """Write the tiny study with ``changes`` (dotted keys) into ``folder``; return its path."""
    raw = copy.deepcopy(tiny_raw(folder, shared_dir))
    for key, value in (changes or {}).items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        if value is _DELETE:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    path = folder / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def completed_study(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path):
    """The tiny study (4 trials) run once on a local Ray: (config, results)."""
    from orchestrator.config import load_study

    folder = tmp_path_factory.mktemp("completed")
    cfg = load_study(write_study(folder, shared_dir))
    return cfg, run_on_local_ray(cfg)


def run_on_local_ray(cfg: Any) -> Any:
    """Run the study ``cfg`` quietly on a fresh 2-CPU local Ray, shut down afterwards."""
    import ray

    from orchestrator import Study

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        return Study(cfg).run(verbose=0)
    finally:
        ray.shutdown()


@pytest.fixture
def local_ray_run():
    """:func:`run_on_local_ray`, for test modules."""
    return run_on_local_ray


@pytest.fixture(scope="session")
def valid_raw(shared_dir: Path) -> dict[str, Any]:
    """The tiny study as a mapping (output in a folder that never exists)."""
    return tiny_raw(Path("/nonexistent-obscura-output"), shared_dir)


@pytest.fixture
def tiny_study(tmp_path: Path, shared_dir: Path):
    """A function writing the tiny study (with changes) to a YAML file and returning its path."""

    def write(changes: dict[str, Any] | None = None, name: str = "study.yaml") -> Path:
        return write_study(tmp_path, shared_dir, changes, name)

    return write


class _Delete:
    """Marker: remove the key."""


_DELETE = _Delete()


@pytest.fixture
def delete() -> _Delete:
    return _DELETE


@pytest.fixture
def unit_config() -> Any:
    """A valid study config for unit tests of the orchestration logic: no data is read, so it
    needs neither ../shared nor Ray."""
    from orchestrator.config import StudyConfig

    return StudyConfig.model_validate(
        {
            "study": "unit",
            "seed": 0,
            "data": {"dataset": "pneumoniamnist", "root": "/nonexistent", "image_size": 16},
            "model": {"name": "mlp", "hidden": [8]},
            "federation": {
                "algorithm": "fedsgd",
                "clients": 2,
                "clients_per_round": 2,
                "rounds": 1,
            },
            "defenses": {
                "none": {},
                "prune": {"percent": {"type": "float", "low": 10, "high": 90}},
                "gradient_noise": {},
            },
            "attacks": [{"name": "idlg", "rounds": [0], "params": {"iterations": 1}}],
            "objectives": [
                {"metric": "test_accuracy", "mode": "max"},
                {"metric": "attack_psnr_max", "mode": "min"},
            ],
            "search": {"sampler": "random", "trials": 6},
        }
    )

"""What a study folder allows before anything is written: a new study, or a resume of the same one.

A new study refuses a folder that already holds one (``study.yaml`` or ``trials.parquet``);
``--resume`` refuses a folder without one, a study file that differs from the stored
``study.yaml`` in anything but ``search.trials``, ``search.concurrency`` and ``output`` (the
trials would mix incompatible settings), and a tracking URI other than the one the study's
MLflow runs live in (``tracking.json``). Both are compared after validation, so a default
written out in one and omitted in the other is no difference. The stored Parquet tables are read
too, so a truncated one is reported before any work.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import StudyConfig, StudyFileError, parse_study
from orchestrator.results import ResultStore, StudyIOError

RESUMABLE_CHANGES: frozenset[str] = frozenset({"search.trials", "search.concurrency", "output"})
"""Study keys a resume may change (how many more trials, how many at once, where)."""

TRACKING_KEY = "tracking.mlflow_uri"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping/list as ``{dotted.key[index]: leaf}``.

    Example:
        >>> flatten({"a": {"b": 1}, "c": [2, {"d": 3}]})
        {'a.b': 1, 'c[0]': 2, 'c[1].d': 3}
    """
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out if out or not prefix else {prefix: {}}
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{i}]"))
        return out if out else {prefix: []}
    return {prefix: value}


def config_differences(
    stored: Mapping[str, Any], new: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """The fields (dotted keys) whose values differ, as ``{key: (stored, new)}``; keys a
    resume may change (:data:`RESUMABLE_CHANGES`) and the tracking URI are left out.

    Args:
        stored: the stored study (a ``model_dump(mode="json")`` mapping).
        new: the study being resumed, in the same form.

    Example:
        >>> config_differences({"seed": 0, "output": "a"}, {"seed": 1, "output": "b"})
        {'seed': (0, 1)}
    """
    left, right = flatten(stored), flatten(new)
    skip = RESUMABLE_CHANGES | {TRACKING_KEY}
    missing = "(absent)"
    return {
        key: (left.get(key, missing), right.get(key, missing))
        for key in sorted(set(left) | set(right))
        if key not in skip and left.get(key, missing) != right.get(key, missing)
    }


def _stored_study(path: Path) -> dict[str, Any]:
    """The stored ``study.yaml``, validated like a study file when it still validates (so
    defaults are filled), else as written."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise StudyIOError.about(
            path, err, "it is unreadable: restore it from a backup or the MLflow parent run"
        ) from err
    if not isinstance(raw, dict):
        raise StudyIOError(f"{path}: not a study (a YAML mapping); restore it from a backup")
    try:
        return parse_study(raw, str(path)).model_dump(mode="json")
    except StudyFileError:
        return raw


def _stored_tracking_uri(folder: Path, stored: Mapping[str, Any]) -> str | None:
    state = folder / "tracking.json"
    if state.exists():
        try:
            return str(json.loads(state.read_text(encoding="utf-8"))["tracking_uri"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StudyIOError.about(
                state, err, "it is unreadable: restore it, or start the study afresh"
            ) from err
    uri = stored.get("tracking", {}).get("mlflow_uri")
    return None if uri is None else str(uri)


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check_study_folder(cfg: StudyConfig, *, resume: bool) -> None:
    """Refuse what the study's folder cannot do (see the module docstring); read only.

    Args:
        cfg: the study as it would run now (with this run's overrides).
        resume: whether ``--resume`` was given.

    Raises:
        FileExistsError: a new study on a folder that holds one.
        StudyFileError: ``--resume`` without a study, with a changed study file or another
            tracking URI (the message names the fields, or both URIs).
        StudyIOError: the stored ``study.yaml``, ``tracking.json`` or a Parquet table cannot be
            read (truncated, corrupt).

    Example:
        >>> check_study_folder(load_study("studies/quickstart.yaml"), resume=True)  # doctest: +SKIP
    """
    folder = cfg.folder
    stored_file = folder / "study.yaml"
    if not resume:
        if stored_file.exists() or (folder / "trials.parquet").exists():
            raise FileExistsError(
                f"{folder} already holds a study; add --resume to continue it, or choose "
                "another --output or study name"
            )
        return
    if not stored_file.exists():
        raise StudyFileError(
            f"--resume: no study to resume in {folder} (no study.yaml); drop --resume to start "
            "it, or pass the --output and study name it ran with"
        )
    stored = _stored_study(stored_file)
    differences = config_differences(stored, cfg.model_dump(mode="json"))
    if differences:
        shown = "; ".join(f"{k}: {_shown(a)} -> {_shown(b)}" for k, (a, b) in differences.items())
        raise StudyFileError(
            f"--resume: the study file differs from the study in {folder} in "
            f"{', '.join(differences)} ({shown}); a resumed study keeps its settings (only "
            "search.trials, search.concurrency and output may change): restore them, or start "
            "a new study under another name or --output"
        )
    uri = _stored_tracking_uri(folder, stored)
    if uri is not None and uri != cfg.tracking.mlflow_uri:
        raise StudyFileError(
            f"--resume: tracking.mlflow_uri is {cfg.tracking.mlflow_uri!r} but the study's "
            f"MLflow runs are in {uri!r}; resume with --set tracking.mlflow_uri={uri}"
        )
    ResultStore(folder, read_only=True)  # a truncated or corrupt table: one line, before Ray

"""``python -m orchestrator report DIR``: the Pareto table and plot from a study's files."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import StudyFileError, load_study


def report(folder: Path) -> None:
    """Recompute the front from ``trials.parquet``, print it and write ``pareto.png``."""
    from orchestrator.results import ResultStore
    from orchestrator.summary import summarise

    if not (folder / "trials.parquet").exists():
        raise StudyFileError(f"{folder}: no trials.parquet here; pass a study's output folder")
    if not (folder / "study.yaml").exists():
        raise StudyFileError(f"{folder}: no study.yaml here; pass a study's output folder")
    cfg = load_study(folder / "study.yaml", {"output": str(folder.parent)})
    summarise(cfg, ResultStore(folder), None)

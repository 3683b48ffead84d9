"""The end of a study, published: the derived columns written to ``trials.parquet`` in one write,
the printed Pareto table, ``pareto.png``, ``pareto.txt`` and the parent run's final artifacts.
The numbers themselves come from :mod:`orchestrator.analysis`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from orchestrator.analysis import Analysis, StudyResults, analyse
from orchestrator.config import StudyConfig
from orchestrator.pareto import Objective
from orchestrator.plots import pareto_plot, pareto_table
from orchestrator.results import ResultStore, atomic_write
from orchestrator.tracking import VALIDITY_FIGURES_TAG, VALIDITY_TAG, StudyTracker
from orchestrator.validity import Validity, check_study, prior_baseline, validity_line


def objectives_of(cfg: StudyConfig) -> list[Objective]:
    """The study's objectives as :class:`orchestrator.pareto.Objective`."""
    return [Objective(o.metric, o.mode) for o in cfg.objectives]


def summarise(cfg: StudyConfig, store: ResultStore, tracker: StudyTracker | None) -> StudyResults:
    """Analyse the study's trials, write the derived columns (one write), print and plot the
    front, and close the MLflow parent run when ``tracker`` is given."""
    analysis = analyse(objectives_of(cfg), store.trials())
    if analysis.completed:
        store.set_derived(analysis.accuracy_drop, set(analysis.front["trial_id"].astype(str)))
    plot = cfg.folder / "pareto.png"
    verdict = check_study(analysis.trials, cfg.validity)
    if analysis.completed:
        publish_front(cfg, analysis, plot, verdict, store.attacks())
    if tracker is not None:
        tracker.finish(
            [plot, cfg.folder / "pareto.txt"],
            {
                "hypervolume": analysis.hypervolume,
                "trials_completed": analysis.completed,
                "trials_failed": analysis.failed,
            },
            {VALIDITY_TAG: verdict.status, VALIDITY_FIGURES_TAG: verdict.figures()},
        )
        print(mlflow_hint(tracker.uri, tracker.experiment_id), flush=True)
    return StudyResults(
        trials=store.trials(),
        front=analysis.front,
        hypervolume=analysis.hypervolume,
        folder=cfg.folder,
    )


def mlflow_hint(uri: str, experiment_id: str) -> str:
    """How to see the study in MLflow's UI on its runs table: MLflow 3's UI opens an
    experiment on its GenAI overview unless the page asks for ``workflowType=machine_learning``
    (the experiment's kind tag is not enough in MLflow 3.17)."""
    return (
        f"MLflow: mlflow ui --backend-store-uri {uri}  then open "
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning "
        "(the parent run with its trials nested under it)"
    )


def publish_front(
    cfg: StudyConfig,
    analysis: Analysis,
    plot: Path,
    verdict: Validity,
    attacks: pd.DataFrame,
) -> None:
    """``pareto.png`` (with the population mean image's line), ``pareto.txt`` and the front
    printed on the console, each with the study's validity verdict."""
    objectives = objectives_of(cfg)
    trials = analysis.trials
    baseline = prior_baseline(objectives[1].metric, attacks) if len(objectives) > 1 else None
    pareto_plot(trials, objectives, plot, title=f"{cfg.study}: Pareto front", baseline=baseline)
    params = sorted(c for c in trials.columns if c.startswith("param_"))
    table = pareto_table(analysis.front, objectives, params)
    line = validity_line(verdict)
    atomic_write(
        cfg.folder / "pareto.txt",
        lambda handle: handle.write(f"{table}\n\n{line}\n".encode()),
    )
    volume = analysis.hypervolume
    print(
        f"\nPareto front of {cfg.study} ({analysis.completed} completed, {analysis.failed} failed"
        + (f", hypervolume {volume:.4g}" if volume is not None else "")
        + "):"
    )
    print(table)
    print(f"\n{line}")
    print(f"\nResults: {cfg.folder} (trials.parquet, rounds.parquet, attacks.parquet, pareto.png)")

"""The end of a study, published: the derived columns written to ``trials.parquet`` in one write,
the printed Pareto table, ``pareto.png``, ``pareto.txt`` and the parent run's final artifacts.
The numbers themselves come from :mod:`orchestrator.analysis`."""

from __future__ import annotations

from pathlib import Path

from orchestrator.analysis import Analysis, StudyResults, analyse
from orchestrator.config import StudyConfig
from orchestrator.pareto import Objective
from orchestrator.plots import pareto_plot, pareto_table
from orchestrator.results import ResultStore
from orchestrator.tracking import StudyTracker


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
    if analysis.completed:
        publish_front(cfg, analysis, plot)
    if tracker is not None:
        tracker.finish(
            [plot, cfg.folder / "pareto.txt"],
            {
                "hypervolume": analysis.hypervolume,
                "trials_completed": analysis.completed,
                "trials_failed": analysis.failed,
            },
        )
    return StudyResults(
        trials=store.trials(),
        front=analysis.front,
        hypervolume=analysis.hypervolume,
        folder=cfg.folder,
    )


def publish_front(cfg: StudyConfig, analysis: Analysis, plot: Path) -> None:
    """``pareto.png``, ``pareto.txt`` and the front printed on the console."""
    objectives = objectives_of(cfg)
    trials = analysis.trials
    pareto_plot(trials, objectives, plot, title=f"{cfg.study}: Pareto front")
    params = sorted(c for c in trials.columns if c.startswith("param_"))
    table = pareto_table(analysis.front, objectives, params)
    (cfg.folder / "pareto.txt").write_text(table + "\n")
    volume = analysis.hypervolume
    print(
        f"\nPareto front of {cfg.study} ({analysis.completed} completed, {analysis.failed} failed"
        + (f", hypervolume {volume:.4g}" if volume is not None else "")
        + "):"
    )
    print(table)
    print(f"\nResults: {cfg.folder} (trials.parquet, rounds.parquet, attacks.parquet, pareto.png)")

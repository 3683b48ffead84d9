"""The end of a study: accuracy drop against the control, the Pareto front, its hypervolume,
the printed table, ``pareto.png``, and the parent run's final artifacts."""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator.config import StudyConfig
from orchestrator.pareto import Objective, hypervolume, pareto_front
from orchestrator.plots import pareto_plot, pareto_table


def front_and_volume(cfg: StudyConfig, df: Any) -> tuple[Any, float | None]:
    """The completed trials' Pareto front over the study's objectives, and its hypervolume."""
    objectives = [Objective(o.metric, o.mode) for o in cfg.objectives]
    if df.empty or not (df["status"] == "completed").any():
        return df.iloc[0:0], None
    front = pareto_front(df, objectives)
    hv = None
    done = df[df["status"] == "completed"]
    cols = [o.metric for o in objectives]
    if all(c in done for c in cols):
        pts = done[cols].to_numpy(dtype=float)
        pts = pts[~np.isnan(pts).any(axis=1)]
        if len(pts) and len(cols) <= 3:
            hv = float(hypervolume(pts, [o.mode for o in objectives]))
    return front, hv


def summarise(cfg: StudyConfig, store: Any, tracker: Any | None) -> Any:
    """Fill derived columns, flag the front, print and plot it; returns StudyResults."""
    from orchestrator.study import StudyResults

    df = store.trials()
    if not df.empty and "test_accuracy" in df:
        control = df[(df["defense"] == "none") & (df["status"] == "completed")]
        if not control.empty:
            base = float(control["test_accuracy"].max())
            for _, row in df[df["status"] == "completed"].iterrows():
                if row.get("test_accuracy") is None or np.isnan(row["test_accuracy"]):
                    continue
                updated = {k: (None if _isnan(v) else v) for k, v in row.to_dict().items()}
                updated["accuracy_drop"] = base - float(row["test_accuracy"])
                store.upsert_trial(updated)
        df = store.trials()
    front, hv = front_and_volume(cfg, df)
    store.set_pareto(set(front["trial_id"]) if not front.empty else set())
    df = store.trials()
    objectives = [Objective(o.metric, o.mode) for o in cfg.objectives]
    plot = cfg.folder / "pareto.png"
    completed = int((df["status"] == "completed").sum()) if not df.empty else 0
    failed = int((df["status"] == "failed").sum()) if not df.empty else 0
    if completed:
        pareto_plot(df, objectives, plot, title=f"{cfg.study}: Pareto front")
        params = sorted(c for c in df.columns if c.startswith("param_"))
        table = pareto_table(front, objectives, params)
        (cfg.folder / "pareto.txt").write_text(table + "\n")
        print(
            f"\nPareto front of {cfg.study} ({completed} completed, {failed} failed"
            + (f", hypervolume {hv:.4g}" if hv is not None else "")
            + "):"
        )
        print(table)
        print(
            f"\nResults: {cfg.folder} (trials.parquet, rounds.parquet, attacks.parquet, pareto.png)"
        )
    if tracker is not None:
        tracker.finish(
            [plot, cfg.folder / "pareto.txt"],
            {"hypervolume": hv, "trials_completed": completed, "trials_failed": failed},
        )
    return StudyResults(trials=df, front=front, hypervolume=hv, folder=cfg.folder)


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and np.isnan(v)

"""orchestrator.analysis: the accuracy drop, the front and its hypervolume from a table alone."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from orchestrator.analysis import accuracy_drop, analyse, front_and_volume
from orchestrator.pareto import Objective

OBJECTIVES = [Objective("test_accuracy", "max"), Objective("attack_psnr_max", "min")]


def _trials(*rows: tuple[str, str, str, float | None, float | None]) -> pd.DataFrame:
    return pd.DataFrame(
        rows, columns=["trial_id", "status", "defense", "test_accuracy", "attack_psnr_max"]
    )


def test_accuracy_drop_is_against_the_best_completed_control() -> None:
    t = _trials(
        ("c1", "completed", "none", 0.90, 30.0),
        ("c2", "completed", "none", 0.92, 31.0),
        ("c3", "failed", "none", None, None),
        ("p", "completed", "prune", 0.85, 20.0),
        ("n", "completed", "noise", None, 25.0),
    )
    drops = accuracy_drop(t)
    assert drops.keys() == {"c1", "c2", "p"}  # no accuracy: no drop; failed trials: none
    assert drops["c2"] == 0.0 and drops["p"] == pytest.approx(0.07)
    assert accuracy_drop(t[t["defense"] != "none"]) == {}  # no control, nothing to compare
    assert accuracy_drop(t.iloc[0:0]) == {}


def test_front_flags_and_hypervolume() -> None:
    t = _trials(
        ("a", "completed", "none", 0.9, 30.0),
        ("b", "completed", "prune", 0.8, 20.0),
        ("c", "completed", "noise", 0.7, 25.0),  # dominated by b
        ("d", "running", "noise", None, None),
    )
    result = analyse(OBJECTIVES, t)
    assert set(result.front["trial_id"]) == {"a", "b"}
    assert result.trials.set_index("trial_id")["pareto"].to_dict() == {
        "a": True,
        "b": True,
        "c": False,
        "d": False,
    }
    assert (result.completed, result.failed) == (3, 0)
    # reference point: worst + 10 % of the range per objective (0.68, 31)
    expected = (0.9 - 0.68) * (31 - 30) + (0.8 - 0.68) * (30 - 20)
    assert result.hypervolume == pytest.approx(expected)
    assert "accuracy_drop" in result.trials and "accuracy_drop" not in t  # input untouched


def test_accuracy_drop_can_be_an_objective() -> None:
    t = _trials(("a", "completed", "none", 0.9, 30.0), ("b", "completed", "prune", 0.5, 29.0))
    result = analyse([Objective("accuracy_drop", "min"), Objective("attack_psnr_max", "min")], t)
    assert set(result.front["trial_id"]) == {"a", "b"}
    assert result.trials.set_index("trial_id")["accuracy_drop"]["b"] == pytest.approx(0.4)


def test_no_completed_trial_gives_an_empty_front() -> None:
    t = _trials(("a", "failed", "none", None, None))
    front, volume = front_and_volume(OBJECTIVES, t)
    assert front.empty and volume is None
    result = analyse(OBJECTIVES, t)
    assert result.front.empty and result.hypervolume is None and result.failed == 1
    assert not result.trials["pareto"].any()
    empty = analyse(OBJECTIVES, t.iloc[0:0])
    assert empty.completed == 0 and empty.trials.empty


def test_trials_missing_an_objective_are_left_out_of_the_volume() -> None:
    t = _trials(("a", "completed", "none", 0.9, 30.0), ("b", "completed", "prune", 0.8, None))
    _, volume = front_and_volume(OBJECTIVES, t)
    assert volume is not None and math.isfinite(volume)

"""Pareto front, hypervolume, the front plot and the front table."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from orchestrator import results
from orchestrator.pareto import (
    Objective,
    default_reference,
    hypervolume,
    pareto_front,
    pareto_mask,
)
from orchestrator.plots import pareto_plot, pareto_table

NAN = float("nan")
UTILITY_PRIVACY = [Objective("test_accuracy", "max"), Objective("attack_psnr", "min")]


# ------------------------------------------------------------------------------------ mask


def test_mask_2d_minimisation() -> None:
    values = np.array([[1, 3], [2, 2], [3, 1], [2, 3], [4, 4], [3, 1]], dtype=float)
    # (2,3) dominated by (1,3)/(2,2); (4,4) by all; (3,1) twice: duplicates both on the front
    assert pareto_mask(values, ["min", "min"]).tolist() == [True, True, True, False, False, True]


def test_mask_2d_max_min_mix() -> None:
    # accuracy (max) vs attack PSNR (min)
    values = np.array([[0.9, 30.0], [0.8, 15.0], [0.7, 16.0], [0.6, 10.0], [0.9, 31.0]])
    assert pareto_mask(values, ["max", "min"]).tolist() == [True, True, False, True, False]
    # flipping both directions flips which extreme wins
    assert pareto_mask(values, ["min", "max"]).tolist() == [False, False, True, True, True]


def test_mask_ties_in_one_objective() -> None:
    # equal first objective: the better second one dominates the other
    values = np.array([[1.0, 2.0], [1.0, 3.0], [0.0, 5.0]])
    assert pareto_mask(values, ["min", "min"]).tolist() == [True, False, True]


def test_mask_nan_rows_never_on_front_and_never_dominate() -> None:
    values = np.array([[NAN, 0.0], [1.0, 1.0], [2.0, NAN], [2.0, 2.0]])
    assert pareto_mask(values, ["min", "min"]).tolist() == [False, True, False, False]
    assert pareto_mask(np.array([[NAN, NAN]]), ["max", "max"]).tolist() == [False]


def test_mask_3d_known_front() -> None:
    values = np.array(
        [
            [1, 1, 5],  # front
            [1, 5, 1],  # front
            [5, 1, 1],  # front
            [2, 2, 2],  # front (no point is <= in all three)
            [2, 2, 6],  # dominated by (1,1,5)
            [3, 3, 3],  # dominated by (2,2,2)
            [1, 1, 5],  # duplicate of a front point
        ],
        dtype=float,
    )
    assert pareto_mask(values, ["min"] * 3).tolist() == [1, 1, 1, 1, 0, 0, 1]
    # maximising the third objective instead
    expected = pareto_mask(values * np.array([1, 1, -1]), ["min"] * 3)
    assert pareto_mask(values, ["min", "min", "max"]).tolist() == expected.tolist()


def test_mask_edge_cases() -> None:
    assert pareto_mask(np.zeros((0, 2)), ["min", "min"]).tolist() == []
    assert pareto_mask([[1.0, 2.0]], ["min", "max"]).tolist() == [True]
    with pytest.raises(ValueError, match="modes"):
        pareto_mask(np.zeros((2, 2)), ["min"])
    with pytest.raises(ValueError, match="'min' or 'max'"):
        pareto_mask(np.zeros((2, 2)), ["min", "up"])
    with pytest.raises(ValueError, match="2-D"):
        pareto_mask(np.zeros(3), ["min"])


def test_mask_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    for k in (2, 3):
        values = rng.integers(0, 4, size=(25, k)).astype(float)
        values[rng.random(25) < 0.1, 0] = NAN
        modes = ["max" if j % 2 else "min" for j in range(k)]
        signed = values * np.array([1 if m == "min" else -1 for m in modes])
        expected = []
        for i in range(len(values)):
            if np.isnan(values[i]).any():
                expected.append(False)
                continue
            dominated = any(
                not np.isnan(signed[j]).any()
                and np.all(signed[j] <= signed[i])
                and np.any(signed[j] < signed[i])
                for j in range(len(values))
            )
            expected.append(not dominated)
        assert pareto_mask(values, modes).tolist() == expected


# ------------------------------------------------------------------------------------ front


def _trials_frame() -> pd.DataFrame:
    """Trials as ResultStore.trials() would return them (defenses, statuses, a NaN metric)."""
    return pd.DataFrame(
        {
            "trial_id": ["t0", "t1", "t2", "t3", "t4", "t5", "t6"],
            "status": ["completed"] * 5 + ["failed", "completed"],
            "defense": ["none", "dp_sgd", "dp_sgd", "soteria", "precode", "dp_sgd", "noise"],
            "test_accuracy": [0.92, 0.85, 0.70, 0.80, 0.88, 0.99, NAN],
            "attack_psnr": [32.0, 14.0, 11.0, 15.0, 20.0, 5.0, 8.0],
            "param_noise_multiplier": [NAN, 1.0, 2.0, NAN, NAN, 0.1, NAN],
            "param_prune_ratio": [NAN, NAN, NAN, 0.5, NAN, NAN, NAN],
        }
    )


def test_pareto_front_completed_sorted_best_first() -> None:
    df = _trials_frame()
    front = pareto_front(df, UTILITY_PRIVACY)
    # t5 is better than all but failed; t6 has NaN accuracy; t3 dominated by t1
    assert front["trial_id"].tolist() == ["t0", "t4", "t1", "t2"]
    assert front.index.tolist() == [0, 4, 1, 2]  # df's index kept
    assert list(front.columns) == list(df.columns)
    all_rows = pareto_front(df, UTILITY_PRIVACY, status_col=None)
    assert all_rows["trial_id"].tolist() == ["t5"]


def test_pareto_front_min_first_objective_and_nullable_dtypes() -> None:
    df = pd.DataFrame(
        {
            "status": ["completed"] * 4,
            "psnr": pd.array([10.0, 20.0, None, 10.0], dtype="Float64"),
            "acc": [0.5, 0.9, 0.99, 0.6],
        }
    )
    front = pareto_front(df, [Objective("psnr", "min"), Objective("acc", "max")])
    assert front.index.tolist() == [3, 1]


def test_pareto_front_errors() -> None:
    df = _trials_frame()
    with pytest.raises(KeyError, match="missing_metric"):
        pareto_front(df, [Objective("missing_metric", "max")])
    with pytest.raises(KeyError, match="state"):
        pareto_front(df, UTILITY_PRIVACY, status_col="state")
    with pytest.raises(ValueError, match="mode"):
        Objective("x", "largest")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ hypervolume


def _grid_hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Brute-force hypervolume (minimisation) for integer points: count dominated unit cells."""
    count = 0
    for cell in itertools.product(*(range(int(r)) for r in ref)):
        if any(np.all(p <= np.array(cell)) for p in points):
            count += 1
    return float(count)


def test_hypervolume_2d_known() -> None:
    points = np.array([[1, 3], [2, 2], [3, 1]], dtype=float)
    assert hypervolume(points, ["min", "min"], np.array([4.0, 4.0])) == pytest.approx(6.0)
    # dominated points, duplicates and NaN rows change nothing
    noisy = np.vstack([points, [[3, 3], [2, 2], [NAN, 0.0]]])
    assert hypervolume(noisy, ["min", "min"], [4, 4]) == pytest.approx(6.0)
    # the same configuration in max/min units: x -> -x, reference mirrored
    mixed = points * np.array([-1, 1])
    assert hypervolume(mixed, ["max", "min"], [-4, 4]) == pytest.approx(6.0)
    # a point outside the reference box adds nothing
    assert hypervolume([[5.0, 0.0], [1.0, 3.0]], ["min", "min"], [4, 4]) == pytest.approx(3.0)
    assert hypervolume(np.zeros((0, 2)), ["min", "min"], [1, 1]) == 0.0


def test_hypervolume_3d_known() -> None:
    # one box: 1 x 2 x 3
    assert hypervolume([[1, 1, 1]], ["min"] * 3, [2, 3, 4]) == pytest.approx(6.0)
    # three 2x1x1 slabs in a 2x2x2 reference cube; pairwise and triple overlaps are the unit
    # cube [1,2]^3: inclusion-exclusion 3*2 - 3*1 + 1 = 4
    corners = [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
    assert hypervolume(corners, ["min"] * 3, [2, 2, 2]) == pytest.approx(4.0)
    # adding the origin covers the whole cube
    assert hypervolume([*corners, [0, 0, 0]], ["min"] * 3, [2, 2, 2]) == pytest.approx(8.0)
    # maximising all three objectives of the mirrored set gives the same volume
    mirrored = -np.array(corners, dtype=float)
    assert hypervolume(mirrored, ["max"] * 3, [-2, -2, -2]) == pytest.approx(4.0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_hypervolume_matches_grid_count(k: int) -> None:
    rng = np.random.default_rng(k)
    ref = np.full(k, 6.0)
    for _ in range(3):
        points = rng.integers(0, 6, size=(12, k)).astype(float)
        assert hypervolume(points, ["min"] * k, ref) == pytest.approx(
            _grid_hypervolume(points, ref)
        )


def test_hypervolume_default_reference() -> None:
    points = np.array([[1, 3], [2, 2], [3, 1]], dtype=float)
    ref = default_reference(points, ["min", "min"])
    np.testing.assert_allclose(ref, [3.2, 3.2])  # worst 3 + 10% of range 2
    # (1,3),(2,2),(3,1) with reference (3.2, 3.2): staircase area
    expected = 1 * 0.2 + 1 * 1.2 + 0.2 * 2.2
    assert hypervolume(points, ["min", "min"]) == pytest.approx(expected)
    # maximisation: worst is the minimum minus 10% of the range
    np.testing.assert_allclose(default_reference(points, ["max", "min"]), [0.8, 3.2])
    # a single point: zero range -> 10% of |worst|, or 1.0 at zero
    np.testing.assert_allclose(default_reference([[2.0, 0.0]], ["min", "max"]), [2.2, -1.0])
    assert hypervolume([[2.0, 0.0]], ["min", "max"]) == pytest.approx(0.2 * 1.0)
    assert hypervolume(np.full((1, 2), NAN), ["min", "min"]) == 0.0


def test_hypervolume_errors() -> None:
    with pytest.raises(ValueError, match="infinite"):
        hypervolume([[np.inf, 1.0]], ["min", "min"], [2, 2])
    with pytest.raises(ValueError, match="shape"):
        hypervolume([[1.0, 1.0]], ["min", "min"], [2, 2, 2])
    with pytest.raises(NotImplementedError, match="objectives"):
        rng = np.random.default_rng(0)
        points = rng.random((400, 4))
        points[:, 3] = 1.0 - points[:, :3].sum(axis=1)  # all non-dominated
        hypervolume(points, ["min"] * 4, np.full(4, 2.0))


# ------------------------------------------------------------------------------------ plots


def _png_size(path: Path) -> tuple[int, int]:
    """Pixel size of a PNG, opened with PIL (fails if the file is not a valid PNG)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def test_pareto_plot_several_defenses(tmp_path: Path) -> None:
    out = pareto_plot(
        _trials_frame(), UTILITY_PRIVACY, tmp_path / "plots" / "front.png", title="demo"
    )
    assert out == tmp_path / "plots" / "front.png"
    width, height = _png_size(out)
    assert width > 300 and height > 200
    assert [p.name for p in out.parent.iterdir()] == ["front.png"]  # no temp file left


def test_pareto_plot_one_trial_one_defense_and_empty(tmp_path: Path) -> None:
    df = _trials_frame()
    _png_size(pareto_plot(df.iloc[[0]], UTILITY_PRIVACY, tmp_path / "one.png"))
    only_dp = df[df["defense"] == "dp_sgd"]
    _png_size(pareto_plot(only_dp, UTILITY_PRIVACY, tmp_path / "dp.png"))
    _png_size(pareto_plot(df.iloc[[6]], UTILITY_PRIVACY, tmp_path / "nan_only.png"))
    reversed_modes = [Objective("attack_psnr", "max"), Objective("test_accuracy", "min")]
    _png_size(pareto_plot(df, reversed_modes, tmp_path / "reversed.png"))


def test_pareto_plot_failed_write_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = pareto_plot(_trials_frame(), UTILITY_PRIVACY, tmp_path / "front.png")
    before = path.read_bytes()

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("no space left")

    monkeypatch.setattr(results.os, "replace", failing_replace)
    with pytest.raises(OSError, match="no space"):
        pareto_plot(_trials_frame().iloc[:2], UTILITY_PRIVACY, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["front.png"]


def test_pareto_plot_needs_two_objectives(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="two objectives"):
        pareto_plot(_trials_frame(), UTILITY_PRIVACY[:1], tmp_path / "x.png")


# ------------------------------------------------------------------------------------ table


def test_pareto_table_aligned() -> None:
    df = _trials_frame()
    front = pareto_front(df, UTILITY_PRIVACY)
    text = pareto_table(front, UTILITY_PRIVACY, ["param_noise_multiplier", "param_prune_ratio"])
    lines = text.splitlines()
    assert lines[0].split() == [
        "trial",
        "defense",
        "test_accuracy",
        "(max)",
        "attack_psnr",
        "(min)",
        "params",
    ]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + len(front)
    assert lines[2].split() == ["t0", "none", "0.92", "32"]
    assert lines[4].split() == ["t1", "dp_sgd", "0.85", "14", "noise_multiplier=1"]
    # objective columns are right-aligned: values end where their header ends
    end = lines[0].index("(max)") + len("(max)")
    assert lines[2][:end].endswith("0.92") and lines[3][:end].endswith("0.88")


def test_pareto_table_empty() -> None:
    empty = _trials_frame().iloc[0:0]
    text = pareto_table(empty, UTILITY_PRIVACY, [])
    assert text.splitlines()[-1] == "(no trials on the front)"
    with pytest.raises(KeyError, match="param_missing"):
        pareto_table(empty, UTILITY_PRIVACY, ["param_missing"])

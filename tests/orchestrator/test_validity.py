"""The study-validity verdict: does the undefended control leak enough to rank defenses?"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from orchestrator.validity import check_validity, flat_baseline


def _trials(*rows: tuple[str, str, float | None, float | None]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "trial_id": f"t{i}",
                "status": status,
                "defense": defense,
                "attack_psnr_gain_max": gain,
                "attack_ssim_max": ssim,
            }
            for i, (defense, status, gain, ssim) in enumerate(rows)
        ]
    )


def test_a_leaking_control_is_ok_and_a_weak_one_is_flagged() -> None:
    leaking = check_validity(
        _trials(("none", "completed", 6.5, 0.6), ("prune", "completed", 0.1, 0.1))
    )
    assert leaking.status == "ok" and leaking.gain_db == 6.5 and leaking.control_trial == "t0"
    assert "ok" in leaking.message()
    weak = check_validity(
        _trials(("none", "completed", 0.4, 0.2), ("prune", "completed", 9.0, 0.9))
    )
    assert weak.status == "attacks_too_weak" and weak.gain_db == 0.4
    assert "+0.40 dB" in weak.message() and "knows_bn_stats" in weak.message()


def test_the_best_completed_control_counts_and_the_ssim_floor_applies() -> None:
    trials = _trials(
        ("none", "completed", 1.0, 0.1),
        ("none", "completed", 4.0, 0.3),
        ("none", "failed", 30.0, 1.0),
    )
    assert check_validity(trials).status == "ok"
    assert check_validity(trials, min_gain_db=5.0).status == "attacks_too_weak"
    strict = check_validity(trials, min_ssim=0.5)
    assert strict.status == "attacks_too_weak" and "SSIM 0.300" in strict.message()


def test_without_a_completed_control_the_study_cannot_check() -> None:
    for trials in (
        pd.DataFrame(),
        _trials(("prune", "completed", 9.0, 0.9)),
        _trials(("none", "running", None, None)),
    ):
        verdict = check_validity(trials)
        assert verdict.status == "no_control" and "cannot check" in verdict.message()
    missing = check_validity(_trials(("none", "completed", None, None)))
    assert missing.status == "attacks_too_weak"


def test_flat_baseline_follows_the_metric() -> None:
    rows = pd.DataFrame({"psnr": [14.0, 20.0, 11.0], "psnr_gain": [1.0, 6.0, None]})
    assert flat_baseline("attack_psnr_gain_max", rows) == 0.0
    assert flat_baseline("attack_psnr_mean", rows) == 13.5
    assert flat_baseline("ig_psnr_max", rows) == 14.0
    assert flat_baseline("attack_lpips_min", rows) is None
    assert flat_baseline("attack_psnr_max", pd.DataFrame()) is None


def _run_tiny(tiny_study, name: str, attacks: list[dict], local_ray_run):
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load_study
    from orchestrator.report import report

    path = tiny_study(
        {
            "study": name,
            "attacks": attacks,
            "defenses": {"none": {}, "prune": {}},
            "search.trials": 2,
            "objectives": [
                {"metric": "test_accuracy", "mode": "max"},
                {"metric": "attack_psnr_gain_max", "mode": "min"},
            ],
        },
        name=f"{name}.yaml",
    )
    cfg = load_study(path)
    local_ray_run(cfg)
    client = MlflowClient(cfg.tracking.mlflow_uri)
    parent = json.loads((cfg.folder / "tracking.json").read_text())["parent_run_id"]
    experiment = client.get_experiment_by_name(cfg.study)
    _, md = report(cfg.folder)
    return (
        client.get_run(parent).data.tags.get("validity"),
        experiment.tags.get("mlflow.experimentKind"),
        (cfg.folder / "pareto.txt").read_text().strip().splitlines()[-1],
        md.read_text(),
    )


@pytest.mark.slow
def test_a_crippled_study_warns_and_a_leaking_one_says_ok(
    tiny_study, local_ray_run, capsys
) -> None:
    """Real tiny studies: iDLG at one iteration cannot break the control, the analytic attack
    recovers it exactly; the console, pareto.txt, the MLflow tag and the report agree."""
    weak = _run_tiny(
        tiny_study,
        "weak",
        [{"name": "idlg", "rounds": [0], "victims": 1, "params": {"iterations": 1}}],
        local_ray_run,
    )
    weak_out = capsys.readouterr().out
    analytic = [{"name": "analytic", "rounds": [0], "victims": 1}]
    leak = _run_tiny(tiny_study, "leak", analytic, local_ray_run)
    leak_out = capsys.readouterr().out
    tag, kind, last_line, md = weak
    assert tag == "attacks_too_weak" and kind == "custom_model_development"
    assert "[obscura] warning: the attacks do not break the undefended control" in weak_out
    assert weak_out.count("attacks do not break") >= 2  # when the control completes, at the end
    assert last_line.startswith("[obscura] warning:") and "knows_bn_stats" in last_line
    assert md.index("## Can this study rank defenses?") < md.index("## Settings")
    assert "**No." in md and "attacks_too_weak" in md
    tag, kind, last_line, md = leak
    assert tag == "ok" and "study validity ok" in leak_out and "warning" not in last_line
    assert "**Yes." in md


def test_every_study_file_states_its_validity_in_its_header() -> None:
    """Each shipped study says in its header what its control's validity check gave."""
    from pathlib import Path

    studies = sorted((Path(__file__).resolve().parents[2] / "studies").glob("*.yaml"))
    assert studies
    for path in studies:
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        assert any(line.startswith("# Validity") for line in header), path.name

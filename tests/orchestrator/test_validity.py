"""The study-validity verdict: does the undefended control leak enough to rank defenses?"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from orchestrator.validity import check_validity, prior_baseline


def _trials(
    *rows: tuple[str, str, float | None, float | None], identified: float | None = 0.0
) -> pd.DataFrame:
    """Trials with (defense, status, gain over the mean image, SSIM); each control's flat gain
    is 3 dB above its gain over the mean image (the X-rays' mean image beats a flat one)."""
    return pd.DataFrame(
        [
            {
                "trial_id": f"t{i}",
                "status": status,
                "defense": defense,
                "attack_prior_gain_max": gain,
                "attack_psnr_gain_max": None if gain is None else gain + 3.0,
                "attack_identification_rate": identified,
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
    assert "ok" in leaking.message() and "mean image" in leaking.message()
    weak = check_validity(
        _trials(("none", "completed", 0.4, 0.2), ("prune", "completed", 9.0, 0.9))
    )
    assert weak.status == "attacks_too_weak" and weak.gain_db == 0.4
    assert "+0.40 dB over the population mean image" in weak.message()
    assert "+3.40 dB over a flat image" in weak.message() and "knows_bn_stats" in weak.message()


def test_a_gain_over_the_flat_image_alone_does_not_pass() -> None:
    """What the old check passed: +5 dB over a flat image, -0.5 dB against the mean image."""
    verdict = check_validity(_trials(("none", "completed", -0.5, 0.5)))
    assert verdict.flat_gain_db == 2.5 and verdict.status == "attacks_too_weak"
    flat_only = pd.DataFrame(
        {
            "trial_id": ["a"],
            "status": ["completed"],
            "defense": ["none"],
            "attack_psnr_gain_max": [8.0],
        }
    )  # trials written before the mean image: the verdict cannot rest on the flat image
    old = check_validity(flat_only)
    assert old.status == "attacks_too_weak" and old.gain_db is None and "n/a" in old.message()


def test_identifying_victims_passes_without_the_gain() -> None:
    trials = _trials(("none", "completed", 1.0, 0.3), identified=0.5)
    verdict = check_validity(trials)
    assert verdict.status == "ok" and verdict.identified == 0.5 and "50%" in verdict.message()
    assert check_validity(trials, min_identified=0.75).status == "attacks_too_weak"


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
    missing = check_validity(_trials(("none", "completed", None, None), identified=None))
    assert missing.status == "attacks_too_weak"


def test_the_baseline_line_is_the_mean_image() -> None:
    rows = pd.DataFrame(
        {
            "psnr": [14.0, 20.0, 11.0],
            "psnr_gain": [1.0, 6.0, None],
            "prior_psnr": [17.0, 19.0, 16.0],
            "prior_ssim": [0.5, 0.7, 0.6],
            "prior_gain": [-3.0, 1.0, -5.0],
        }
    )
    assert prior_baseline("attack_prior_gain_max", rows) == 0.0
    assert prior_baseline("attack_psnr_mean", rows) == pytest.approx(52.0 / 3)
    assert prior_baseline("ig_psnr_max", rows) == 19.0
    assert prior_baseline("attack_ssim_max", rows) == 0.7
    # a flat gain's line: the mean image's PSNR minus the flat image's (rows with both)
    assert prior_baseline("attack_psnr_gain_max", rows) == pytest.approx(max(17 - 13, 19 - 14))
    assert prior_baseline("attack_lpips_min", rows) is None
    assert prior_baseline("attack_psnr_max", pd.DataFrame()) is None


def test_rows_without_the_mean_image_keep_the_flat_line() -> None:
    rows = pd.DataFrame({"psnr": [14.0, 20.0, 11.0], "psnr_gain": [1.0, 6.0, None]})
    assert prior_baseline("attack_psnr_gain_max", rows) == 0.0
    assert prior_baseline("attack_psnr_mean", rows) == 13.5
    assert prior_baseline("ig_psnr_max", rows) == 14.0


def _register_mean_image_attack(shared_dir) -> str:
    """A plugin attack that ignores the update and returns the population's mean image (the
    tiny study's test split at 16 px): it knows nothing that needs a client."""
    import torch

    from attacks import available_attacks, register_attack
    from attacks.base import Attack, AttackParams, Attempt
    from fl import data
    from fl.simulation.observation import Observation

    name = "population_mean_image"
    if name in available_attacks():
        return name
    test = data.load("pneumoniamnist", root=shared_dir / "data", split="test", image_size=16)
    mean_image = test.float_images().mean(dim=0)

    @register_attack(name)
    class MeanImage(Attack[AttackParams]):
        def attempt(self, obs: Observation, generator: torch.Generator, restart: int) -> Attempt:
            n = obs.num_examples or 1
            std = torch.tensor(obs.std).view(1, -1, 1, 1)
            mean = torch.tensor(obs.mean).view(1, -1, 1, 1)
            inputs = ((mean_image.unsqueeze(0) - mean) / std).expand(n, -1, -1, -1).clone()
            return Attempt(inputs=inputs.to(obs.device), labels=None, loss=0.0, iterations=0)

    return name


def test_validity_fails_a_control_whose_attack_returns_the_population_mean(
    tiny_study, shared_dir
) -> None:
    """A real trial of the tiny study (in-process): the mean image scores well over a flat
    image, yet gains nothing over the prior and identifies no one, so the control fails."""
    from orchestrator.config import load_study
    from orchestrator.trial import run_trial

    attack = _register_mean_image_attack(shared_dir)
    cfg = load_study(tiny_study({"attacks": [{"name": attack, "rounds": [0], "victims": 2}]}))
    metrics = run_trial(cfg, "none", {}).metrics
    assert metrics["attack_psnr_gain_max"] > 3.0  # the old check (3 dB over flat) passed it
    assert abs(metrics["attack_prior_gain_max"]) < 1e-4  # float32 normalisation round trip
    assert metrics["attack_identification_rate"] == 0.0
    row = {"trial_id": "t0", "status": "completed", "defense": "none", **metrics}
    verdict = check_validity(pd.DataFrame([row]))
    assert verdict.status == "attacks_too_weak", verdict.message()
    assert "+0.00 dB over the population mean image" in verdict.message()


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
                {"metric": "attack_prior_gain_max", "mode": "min"},
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
    tags = client.get_run(parent).data.tags
    assert "over the population mean image" in tags["validity_figures"]
    return (
        tags.get("validity"),
        experiment.tags.get("mlflow.experimentKind"),
        (cfg.folder / "pareto.txt").read_text().strip().splitlines()[-1],
        md.read_text(),
    )


@pytest.mark.slow
def test_a_crippled_study_warns_and_a_leaking_one_says_ok(
    tiny_study, shared_dir, local_ray_run, capsys
) -> None:
    """Real tiny studies on Ray: a plugin attack returning the population mean image cannot
    break the control (the issue's case; iDLG at one iteration no longer serves: on this MLP one
    L-BFGS step already picks a patient out at 12.8 dB), the analytic attack recovers it
    exactly; the console, pareto.txt, the MLflow tags and the report agree."""
    attack = _register_mean_image_attack(shared_dir)
    weak = _run_tiny(
        tiny_study, "weak", [{"name": attack, "rounds": [0], "victims": 1}], local_ray_run
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

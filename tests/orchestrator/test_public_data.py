"""Public data in a study file: validation that names the field, and a trial whose learned
attacks train on the held-out share of the train split with the trial's defense."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from orchestrator.config import StudyConfig, StudyFileError, load_study, parse_study
from orchestrator.trial import run_trial

LEARNED = {"examples": 60, "epochs": 2, "hidden": 32, "depth": 1}


def _with_attack(raw: dict[str, Any], attack: dict[str, Any], **federation: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    out["attacks"] = [attack]
    out["federation"].update(federation)
    return out


def _error(raw: dict[str, Any]) -> str:
    with pytest.raises(StudyFileError) as info:
        parse_study(raw)
    return str(info.value)


def test_a_learned_attack_without_public_data_names_the_grant(valid_raw) -> None:
    message = _error(_with_attack(valid_raw, {"name": "learned_inversion"}))
    assert "public_data" in message and "capabilities" in message
    start = {"name": "inverting_gradients", "params": {"init": "learned"}}
    assert "public_data" in _error(_with_attack(valid_raw, start))
    assert "public_data" in _error(_with_attack(valid_raw, {"name": "gias"}))


def test_public_data_that_is_the_clients_is_refused_at_validation(valid_raw) -> None:
    train = {"name": "feature_inversion", "capabilities": {"public_data": {"split": "train"}}}
    assert "attacks.0.capabilities.public_data.split" in _error(_with_attack(valid_raw, train))
    holdout = {"name": "feature_inversion", "capabilities": {"public_data": {"split": "holdout"}}}
    assert "federation.partition.holdout" in _error(_with_attack(valid_raw, holdout))
    unknown = {
        "name": "feature_inversion",
        "capabilities": {"public_data": {"dataset": "no-such-set"}},
    }
    assert "no-such-set" in _error(_with_attack(valid_raw, unknown))
    granted = {"name": "feature_inversion", "capabilities": {"public_data": {"split": "holdout"}}}
    partition = {**valid_raw["federation"]["partition"], "holdout": 0.5}
    cfg = parse_study(_with_attack(valid_raw, granted, partition=partition))
    assert isinstance(cfg, StudyConfig)


def test_a_trial_trains_learned_attacks_on_the_holdout(tiny_study) -> None:
    public = {"split": "holdout", "count": 40}
    path = tiny_study(
        {
            "federation.partition": {"scheme": "iid", "max_per_client": 16, "holdout": 0.5},
            "attacks": [
                {"name": "idlg", "params": {"iterations": 2}},
                {
                    "name": "feature_inversion",
                    "params": LEARNED,
                    "capabilities": {"public_data": public},
                },
                {
                    "name": "inverting_gradients",
                    "label": "ig_learned",
                    "params": {"iterations": 2, "init": "learned", "learned": LEARNED},
                    "capabilities": {"public_data": public},
                },
                {
                    "name": "learned_inversion",
                    "label": "prior_only",
                    "params": {**LEARNED, "sketch": 64, "ablation": "prior_only"},
                    "capabilities": {"public_data": public},
                },
                {
                    "name": "gias",
                    "params": {
                        "iterations": 2,
                        "latent_restarts": 1,
                        "finetune_iterations": 2,
                        "generator": {"epochs": 1, "width": 8, "latent": 16},
                    },
                    "capabilities": {"public_data": public},
                },
            ],
            "tracking.log_images": "none",
        }
    )
    cfg = load_study(path)
    out = run_trial(cfg, "gradient_noise", {"scale": 0.01})
    m = out.metrics
    assert m["feature_inversion_public_images"] == 40 and m["prior_only_public_images"] == 40
    assert m["idlg_public_images"] is None
    assert m["feature_inversion_prior_gain_max"] is not None
    assert m["prior_only_prior_gain_max"] is not None
    assert m["feature_inversion_seconds"] > 0
    assert m["ig_learned_public_images"] == 40 and m["ig_learned_psnr_max"] is not None
    assert m["gias_public_images"] == 40 and m["gias_prior_gain_max"] is not None


def test_the_report_and_mlflow_name_each_attackers_public_data(valid_raw) -> None:
    from orchestrator.report import _settings_section
    from orchestrator.study import _flat_params

    granted = {
        "name": "feature_inversion",
        "capabilities": {"public_data": {"split": "test", "count": 300}},
    }
    cfg = parse_study(_with_attack(valid_raw, granted))
    expected = "300 images of pneumoniamnist's test split"
    assert _flat_params(cfg)["attack.feature_inversion.public_data"] == expected
    _, html, markdown = _settings_section(cfg)
    assert f"public data: {expected}" in markdown, markdown
    assert expected.replace("'", "&#x27;") in html, html

"""Trial metric names and per-attack aggregation (orchestrator.metrics), on real scored images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.scoring.metrics import score_images
from attacks.scoring.population import Reference
from orchestrator.metrics import (
    PRIVACY,
    WORST,
    attack_summary,
    builtin_names,
    validate_metric,
    worst_case,
)
from tests._support.samples import sample_images


def _scored(
    noise: float, flat: tuple[float, ...], reference: Reference | None = None
) -> list[dict]:
    """``per_image`` of eight real 16 px photographs reconstructed with Gaussian noise."""
    truth = sample_images(16, 8).double()
    gen = torch.Generator().manual_seed(0)
    rec = (truth + noise * torch.randn(truth.shape, generator=gen, dtype=truth.dtype)).clamp(0, 1)
    return score_images(rec, truth, lpips=False, flat=flat, reference=reference)["per_image"]


def test_attack_summary_reports_the_prior_gain_and_identification() -> None:
    """The other photographs as the reference: a faint copy identifies every victim, a copy
    drowned in noise fewer; rows scored without a reference give None."""
    reference = Reference.from_images(sample_images(16, 30)[8:])
    clear = attack_summary(_scored(0.02, (0.5,), reference), 20.0)
    rows = _scored(0.02, (0.5,), reference)
    assert clear["prior_gain_max"] == max(r["prior_gain"] for r in rows)
    assert clear["identification_rate"] == 1.0 and clear["identification_rate_lpips"] is None
    drowned = attack_summary(_scored(2.0, (0.5,), reference), 20.0)
    assert drowned["identification_rate"] < 1.0
    assert drowned["prior_gain_max"] < clear["prior_gain_max"]
    worst = worst_case({"clear": clear, "drowned": drowned})
    assert worst["attack_identification_rate"] == 1.0
    assert worst["attack_prior_gain_max"] == clear["prior_gain_max"]
    without = attack_summary(_scored(0.02, (0.5,)), 20.0)
    assert without["identification_rate"] is None
    assert without["prior_gain_max"] == without["psnr_gain_max"]  # the flat image, said so


def test_attack_summary_reports_psnr_gain() -> None:
    rows = _scored(0.05, (0.45, 0.4, 0.35))
    summary = attack_summary(rows, 20.0)
    assert set(summary) == set(PRIVACY)
    gains = [r["psnr_gain"] for r in rows]
    assert summary["psnr_gain_mean"] == pytest.approx(float(np.mean(gains)), abs=1e-12)
    assert summary["psnr_gain_max"] == max(gains)
    assert 0.0 < summary["psnr_gain_max"] < summary["psnr_max"]  # a flat image scores > 0 dB
    assert attack_summary([], 20.0)["psnr_gain_max"] is None


def test_rows_without_gain_give_none_but_keep_the_rest() -> None:
    rows = [{k: v for k, v in r.items() if k != "psnr_gain"} for r in _scored(0.1, (0.5,))]
    summary = attack_summary(rows, 20.0)
    assert summary["psnr_gain_mean"] is None and summary["psnr_gain_max"] is None
    assert summary["psnr_max"] is not None


def test_worst_case_takes_the_largest_gain_over_attacks() -> None:
    weak = attack_summary(_scored(0.2, (0.5,)), 20.0)
    strong = attack_summary(_scored(0.02, (0.5,)), 20.0)
    assert weak["psnr_gain_max"] < strong["psnr_gain_max"]
    worst = worst_case({"weak": weak, "strong": strong})
    assert WORST["psnr_gain_max"] == WORST["psnr_gain_mean"] == "max"
    assert worst["attack_psnr_gain_max"] == strong["psnr_gain_max"]
    assert worst["attack_psnr_gain_mean"] == strong["psnr_gain_mean"]


def test_gain_names_are_known_metrics() -> None:
    names = builtin_names(["idlg"])
    for name in (
        "idlg_psnr_gain_mean",
        "idlg_psnr_gain_max",
        "attack_psnr_gain_max",
        "attack_prior_gain_max",
        "idlg_identification_rate",
        "attack_identification_rate_lpips",
    ):
        assert name in names
        validate_metric(name, ["idlg"])  # usable as a study objective
    with pytest.raises(ValueError, match="known metrics"):
        validate_metric("psnr_gain", ["idlg"])

"""Can a study rank defenses? Its undefended control must leak: if no attack beats a flat image
on the ``none`` trial, every defense lands on the front at "no leakage" and the front says
nothing. Data in, data out: the verdict from the trials table and the study's thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from orchestrator.analysis import CONTROL

Status = Literal["ok", "attacks_too_weak", "no_control"]

#: What to try when the control does not leak, named in every warning.
ADVICE = (
    "more attack iterations, see_through_gradients or inverting_gradients with bn_prior and "
    "capabilities: {knows_bn_stats: true}, analytic for a Linear first layer, or a stronger "
    "threat model"
)


@dataclass(frozen=True)
class Validity:
    """The verdict on a study's control: ``status`` (``ok``, ``attacks_too_weak`` or
    ``no_control``), the control's strongest attack's PSNR gain over the flat image and SSIM
    (None without a completed control), and the thresholds they were held to."""

    status: Status
    gain_db: float | None
    ssim: float | None
    min_gain_db: float
    min_ssim: float | None
    control_trial: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the front can rank defenses."""
        return self.status == "ok"

    def figures(self) -> str:
        """The control's figures against the thresholds, in words."""
        if self.gain_db is None:
            return "no completed undefended control (defense 'none') to check"
        text = f"control's best attack: {self.gain_db:+.2f} dB over a flat image"
        text += f" (needs >= {self.min_gain_db:g} dB)"
        if self.min_ssim is not None:
            ssim = "n/a" if self.ssim is None else f"{self.ssim:.3f}"
            text += f", SSIM {ssim} (needs >= {self.min_ssim:g})"
        return text

    def message(self) -> str:
        """One line for the console, ``pareto.txt`` and the report."""
        if self.status == "ok":
            return f"study validity ok: {self.figures()}; the front can rank defenses"
        if self.status == "no_control":
            return (
                "this study cannot check whether its attacks are strong enough: it has no "
                "completed undefended control (defense 'none'); add 'none' to defenses"
            )
        return (
            f"the attacks do not break the undefended control ({self.figures()}), so the front "
            f"cannot rank defenses: every defense looks private. Try {ADVICE}"
        )


def validity_line(verdict: Validity) -> str:
    """The verdict as the console prints it: ``[obscura] warning: ...`` unless ``ok``."""
    prefix = "[obscura] " if verdict.ok else "[obscura] warning: "
    return prefix + verdict.message()


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _column(rows: pd.DataFrame, name: str) -> list[float | None]:
    if name not in rows:
        return [None] * len(rows)
    return [_number(v) for v in rows[name]]


def check_validity(
    trials: pd.DataFrame, min_gain_db: float = 3.0, min_ssim: float | None = None
) -> Validity:
    """The validity of a trials table: its completed control trials' strongest attack
    (``attack_psnr_gain_max``, and ``attack_ssim_max`` when ``min_ssim`` is set) held to the
    thresholds; the best control trial counts.

    Args:
        trials: the study's trials table (``trials.parquet`` rows).
        min_gain_db: least PSNR gain over the flat image the control must show (dB).
        min_ssim: least SSIM the control must show, or None for no SSIM floor.

    Example:
        >>> t = pd.DataFrame({"trial_id": ["a"], "status": ["completed"], "defense": ["none"],
        ...                   "attack_psnr_gain_max": [0.4], "attack_ssim_max": [0.1]})
        >>> check_validity(t).status
        'attacks_too_weak'
    """
    done = trials
    if not trials.empty and "status" in trials:
        done = trials[(trials["status"] == "completed") & (trials["defense"] == CONTROL)]
    if trials.empty or done.empty:
        return Validity("no_control", None, None, min_gain_db, min_ssim)
    gains, ssims = _column(done, "attack_psnr_gain_max"), _column(done, "attack_ssim_max")
    best = max(range(len(done)), key=lambda i: -math.inf if gains[i] is None else gains[i])
    gain, ssim = gains[best], ssims[best]
    weak = gain is None or gain < min_gain_db
    if min_ssim is not None:
        weak = weak or ssim is None or ssim < min_ssim
    return Validity(
        "attacks_too_weak" if weak else "ok",
        gain,
        ssim,
        min_gain_db,
        min_ssim,
        str(done["trial_id"].iloc[best]),
    )


def flat_baseline(metric: str, attacks: pd.DataFrame) -> float | None:
    """The value a flat image would score on the privacy ``metric`` (the "no information" line
    of the Pareto plot): 0 for a PSNR gain; for a PSNR, the flat image's PSNR against the
    attacked images (``psnr - psnr_gain`` of the ``attacks.parquet`` rows), their mean for a
    ``_mean`` metric and their maximum for a ``_max`` one; None for other metrics or without
    rows.

    Example:
        >>> rows = pd.DataFrame({"psnr": [14.0, 20.0], "psnr_gain": [1.0, 6.0]})
        >>> flat_baseline("attack_psnr_mean", rows), flat_baseline("attack_psnr_gain_max", rows)
        (13.5, 0.0)
    """
    if "psnr_gain" in metric:
        return 0.0
    if not metric.endswith(("psnr_mean", "psnr_max")) or attacks.empty:
        return None
    if "psnr_gain" not in attacks or "psnr" not in attacks:
        return None
    flat = pd.to_numeric(attacks["psnr"], errors="coerce") - pd.to_numeric(
        attacks["psnr_gain"], errors="coerce"
    )
    flat = flat[flat.notna() & (flat.abs() != math.inf)]
    if flat.empty:
        return None
    return float(flat.max() if metric.endswith("_max") else flat.mean())

"""Can a study rank defenses? Its undefended control must leak: if no attack says more about the
victims than is known without any client, every defense lands on the front at "no leakage" and
the front says nothing. What is known without a client is the population's mean image (the
prior baseline of :mod:`attacks.scoring.metrics`), not a flat image: on chest X-rays the mean
image alone beats a flat image by about 3 dB. The control passes when its strongest attack gains
``min_gain_db`` over the mean image on its best image, or identifies ``min_identified`` of its
victims among the reference pool. Data in, data out: the verdict from the trials table and the
study's thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import pandas as pd

from orchestrator.analysis import CONTROL

Status = Literal["ok", "attacks_too_weak", "no_control"]

#: What to try when the control does not leak, named in every warning.
ADVICE = (
    "more attack iterations, see_through_gradients or inverting_gradients with bn_prior and "
    "capabilities: {knows_bn_stats: true}, analytic for a Linear first layer, or a stronger "
    "threat model"
)

#: Default share of the control's victims its attacks must identify (``validity.min_identified``).
DEFAULT_MIN_IDENTIFIED = 0.25


@dataclass(frozen=True)
class Validity:
    """The verdict on a study's control: ``status`` (``ok``, ``attacks_too_weak`` or
    ``no_control``), the control's strongest attack's PSNR gain over the population mean image
    (``gain_db``), its identification rate, its gain over a flat image and SSIM (None without a
    completed control or in trials written before the figure existed), and the thresholds."""

    status: Status
    gain_db: float | None
    ssim: float | None
    min_gain_db: float
    min_ssim: float | None
    control_trial: str | None = None
    identified: float | None = None
    min_identified: float = DEFAULT_MIN_IDENTIFIED
    flat_gain_db: float | None = None

    @property
    def ok(self) -> bool:
        """Whether the front can rank defenses."""
        return self.status == "ok"

    def figures(self) -> str:
        """The control's figures against the thresholds, in words."""
        if self.status == "no_control":
            return "no completed undefended control (defense 'none') to check"
        gain = "n/a" if self.gain_db is None else f"{self.gain_db:+.2f} dB"
        ident = "n/a" if self.identified is None else f"{self.identified:.0%}"
        text = (
            f"control's best attack: {gain} over the population mean image (needs >= "
            f"{self.min_gain_db:g} dB) or identifies {ident} of its victims (needs >= "
            f"{self.min_identified:.0%})"
        )
        if self.flat_gain_db is not None:
            text += f"; {self.flat_gain_db:+.2f} dB over a flat image"
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
        # a table cell of any type: float() raising TypeError for a non-number is the check
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _column(rows: pd.DataFrame, name: str) -> list[float | None]:
    if name not in rows:
        return [None] * len(rows)
    return [_number(v) for v in rows[name]]


def _at_least(value: float | None, floor: float) -> bool:
    """Whether a measured ``value`` (None: not measured) reaches ``floor``."""
    return value is not None and value >= floor


def check_validity(
    trials: pd.DataFrame,
    min_gain_db: float = 3.0,
    min_ssim: float | None = None,
    min_identified: float = DEFAULT_MIN_IDENTIFIED,
) -> Validity:
    """The validity of a trials table: its completed control trials' strongest attack held to the
    thresholds; the best control trial counts. The control passes when its gain over the
    population mean image (``attack_prior_gain_max``) reaches ``min_gain_db`` or its
    identification rate (``attack_identification_rate``) reaches ``min_identified``, and, when
    ``min_ssim`` is set, its ``attack_ssim_max`` reaches that too.

    Args:
        trials: the study's trials table (``trials.parquet`` rows).
        min_gain_db: least PSNR gain over the population mean image the control must show (dB).
        min_ssim: least SSIM the control must show, or None for no SSIM floor.
        min_identified: least share of the control's victims its attacks must identify.

    Example:
        >>> t = pd.DataFrame({"trial_id": ["a"], "status": ["completed"], "defense": ["none"],
        ...                   "attack_prior_gain_max": [0.4], "attack_ssim_max": [0.1],
        ...                   "attack_identification_rate": [0.0]})
        >>> check_validity(t).status
        'attacks_too_weak'
    """
    done = trials
    if not trials.empty and "status" in trials:
        done = trials[(trials["status"] == "completed") & (trials["defense"] == CONTROL)]
    if trials.empty or done.empty:
        return Validity("no_control", None, None, min_gain_db, min_ssim, None, None, min_identified)
    gains, ids = _column(done, "attack_prior_gain_max"), _column(done, "attack_identification_rate")
    ssims, flats = _column(done, "attack_ssim_max"), _column(done, "attack_psnr_gain_max")

    def passes(i: int) -> bool:
        leak = _at_least(gains[i], min_gain_db) or _at_least(ids[i], min_identified)
        return leak and (min_ssim is None or _at_least(ssims[i], min_ssim))

    def strength(i: int) -> tuple[bool, float, float]:
        gain = gains[i]
        return passes(i), gain if gain is not None else -math.inf, ids[i] or 0.0

    best = max(range(len(done)), key=strength)
    return Validity(
        "ok" if passes(best) else "attacks_too_weak",
        gains[best],
        ssims[best],
        min_gain_db,
        min_ssim,
        str(done["trial_id"].iloc[best]),
        ids[best],
        min_identified,
        flats[best],
    )


class Thresholds(Protocol):
    """A study's ``validity`` section (:class:`orchestrator.config.ValiditySection`)."""

    min_gain_db: float
    min_ssim: float | None
    min_identified: float


def check_study(trials: pd.DataFrame, thresholds: Thresholds) -> Validity:
    """:func:`check_validity` with a study's ``validity`` section's thresholds."""
    return check_validity(
        trials, thresholds.min_gain_db, thresholds.min_ssim, thresholds.min_identified
    )


def prior_baseline(metric: str, attacks: pd.DataFrame) -> float | None:
    """The value the population's mean image would score on the privacy ``metric``: the "no
    information" line of the Pareto plot. 0 for a gain over the mean image (``prior_gain``);
    otherwise taken from the ``attacks.parquet`` rows, the mean over images for a ``_mean``
    metric and the maximum for a ``_max`` one: the mean image's PSNR (``prior_psnr``) for a
    PSNR, its SSIM (``prior_ssim``) for an SSIM, ``prior_psnr`` minus the flat image's PSNR for a
    gain over a flat image. Rows written before the mean image existed give the flat image's line
    (0 for a flat gain, ``psnr - psnr_gain`` for a PSNR). None for other metrics or without rows.

    Example:
        >>> rows = pd.DataFrame({"psnr": [14.0, 20.0], "psnr_gain": [1.0, 6.0],
        ...                      "prior_psnr": [17.0, 18.0], "prior_gain": [-3.0, 2.0]})
        >>> prior_baseline("attack_psnr_mean", rows), prior_baseline("attack_prior_gain_max", rows)
        (17.5, 0.0)
    """
    if "prior_gain" in metric:
        return 0.0
    stat = "max" if metric.endswith("_max") else "mean" if metric.endswith("_mean") else None
    if stat is None or attacks.empty:
        return None
    values = _baseline_values(metric, attacks)
    if values is None:
        return None
    values = values[values.notna() & (values.abs() != math.inf)]
    if values.empty:
        return None
    return float(values.max() if stat == "max" else values.mean())


def _number_column(attacks: pd.DataFrame, name: str) -> pd.Series | None:
    """A numeric column of the attacks rows, None when absent or all null."""
    if name not in attacks:
        return None
    column = pd.to_numeric(attacks[name], errors="coerce").astype("float64")
    return None if column.isna().all() else column


def _baseline_values(metric: str, attacks: pd.DataFrame) -> pd.Series | None:
    """Per attacked image, the mean image's value of ``metric`` (the flat image's in rows
    without the mean image), or None when the metric has no such line."""
    psnr, gain = _number_column(attacks, "psnr"), _number_column(attacks, "psnr_gain")
    prior_psnr = _number_column(attacks, "prior_psnr")
    flat = None if psnr is None or gain is None else psnr - gain
    if "psnr_gain" in metric:
        if prior_psnr is None or flat is None:
            return None if flat is None else flat * 0.0
        return prior_psnr - flat
    if "psnr" in metric:
        return prior_psnr if prior_psnr is not None else flat
    if "ssim" in metric:
        return _number_column(attacks, "prior_ssim")
    return None

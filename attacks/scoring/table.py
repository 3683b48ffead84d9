"""The one table of per-image reconstruction metrics: everything else is derived from it.

Each :class:`ImageMetric` says once what a per-image metric is: its name (the key of a scored
image and the ``attacks.parquet`` column), its Parquet type, whether it may be null, which way is
better for the attacker, how it is computed from a scored batch, and which statistics are kept
per batch (:func:`attacks.scoring.metrics.score_images`) and per attack in a trial
(``<attack>_<statistic>`` and the worst case over attacks, ``attack_<statistic>``). From
:data:`METRICS` follow the batch summaries, the trial metric names and their worst case
(:mod:`orchestrator.metrics`), the ``attacks.parquet`` schema (:mod:`orchestrator.results`),
MLflow's trial metrics and the documentation's metric reference (:func:`reference_markdown`).

Adding a metric is one entry here: a compute function (per true image, in ground-truth order,
from a :class:`ScoringContext`) and an :class:`ImageMetric` appended to :data:`METRICS` with the
next ``schema_version`` (older ``attacks.parquet`` files then read back with the column null).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, cast

import numpy as np
import torch

from attacks.scoring._primitives import flat_psnrs, psnr_array, ssim_array
from attacks.scoring.lpips_net import lpips_features, lpips_from_features
from attacks.scoring.population import Reference, identification_ranks, pixel_ranks

Direction = Literal["max", "min"]
"""Which way a number is better for the attacker (worse for privacy)."""
Dtype = Literal["float64", "int64", "bool"]
"""The Parquet (Arrow) type of a per-image metric."""
Value = float | int | bool | None
"""One image's value of one metric; None where it was not measured."""
Reducer = Callable[[Sequence[Any], float], float | None]
"""A statistic of the values present (None dropped) given the success PSNR threshold."""


@dataclass(frozen=True)
class Statistic:
    """A summary of one metric over many images: over a scored batch, and (``per_trial``) over
    every image an attack reconstructed in a trial, all rounds and victims."""

    name: str
    """The summary's name (``psnr_max``); a trial reports ``<attack>_<name>`` and
    ``attack_<name>``."""
    reduce: Reducer
    worst: Direction
    """How the worst case for privacy is taken over attacks (``attack_<name>``)."""
    per_trial: bool
    description: str


@dataclass(frozen=True)
class ScoringContext:
    """One scored batch, reconstructions already put in ground-truth order by the Hungarian
    assignment: what every metric's compute function reads."""

    truth: torch.Tensor
    """(B, C, H, W) float64 ground truth, clamped to [0, 1]."""
    ordered: torch.Tensor
    """(B, C, H, W) float64 reconstructions in ground-truth order, clamped to [0, 1]."""
    flat: np.ndarray
    """The flat baseline image's per-channel values."""
    reference: Reference | None
    lpips: np.ndarray | None
    """D[i, j] = LPIPS(truth i, reconstruction j) in the caller's order; None without LPIPS."""
    assignment: list[int]
    rec_labels: np.ndarray | None
    true_labels: np.ndarray | None
    device: str | torch.device = "cpu"
    backbone: str | None = None

    @cached_property
    def truth_hwc(self) -> np.ndarray:
        """The ground truth as (B, H, W, C) float64."""
        return self.truth.permute(0, 2, 3, 1).numpy()

    @cached_property
    def rec_hwc(self) -> np.ndarray:
        """The ordered reconstructions as (B, H, W, C) float64."""
        return self.ordered.permute(0, 2, 3, 1).numpy()

    @cached_property
    def prior_hwc(self) -> np.ndarray:
        """The prior image (HWC): the reference's mean image, or the flat image without one."""
        if self.reference is None:
            return np.broadcast_to(self.flat, self.truth_hwc.shape[1:])
        return self.reference.mean_image.to(torch.float64).permute(1, 2, 0).numpy()

    @cached_property
    def flat_psnr(self) -> list[float]:
        """The flat image's PSNR against each true image."""
        return flat_psnrs(self.truth, self.flat)


Computed = Mapping[str, Sequence[Value]]
"""The metrics computed so far (earlier entries of :data:`METRICS`), by name."""
Compute = Callable[[ScoringContext, Computed], Sequence[Value] | None]
"""Per true image, a metric's values; None when it cannot be measured for this batch."""


@dataclass(frozen=True)
class ImageMetric:
    """One per-image metric, declared once (see the module docstring)."""

    name: str
    dtype: Dtype
    attacker: Direction
    """Which way is better for the attacker."""
    nullable: bool
    description: str
    compute: Compute
    batch: tuple[str, ...] = ()
    """Order statistics kept per batch (``mean``, ``median``, ``max``, ``min``)."""
    trial: tuple[str, ...] = ()
    """Those of ``batch`` also kept per attack in a trial."""
    rates: tuple[Statistic, ...] = ()
    """Other statistics (shares of images), kept per batch and per trial."""
    schema_version: int = 1
    """The ``attacks.parquet`` schema version that added the column."""

    @property
    def statistics(self) -> tuple[Statistic, ...]:
        """Every statistic of this metric, order statistics first."""
        return tuple(_order_statistic(self, s) for s in self.batch) + self.rates


_ORDER: dict[str, Callable[[np.ndarray], Any]] = {
    "mean": np.mean,
    "median": np.median,
    "max": np.max,
    "min": np.min,
}


def _order_statistic(metric: ImageMetric, stat: str) -> Statistic:
    """The ``stat`` (mean, median, max, min) of ``metric``; its worst case follows the metric's
    direction (the largest mean PSNR over attacks, the smallest mean LPIPS)."""
    fn = _ORDER[stat]

    def reduce(values: Sequence[Any], _success: float) -> float | None:
        return _finite(float(fn(np.asarray(values, dtype=np.float64)))) if values else None

    what = {"mean": "mean", "median": "median", "max": "largest", "min": "smallest"}[stat]
    return Statistic(
        f"{metric.name}_{stat}",
        reduce,
        metric.attacker,
        stat in metric.trial,
        f"the {what} `{metric.name}` over the images",
    )


def _finite(value: float) -> float | None:
    """``value``, or None when it is NaN or infinite."""
    return value if np.isfinite(value) else None


def _share(name: str, hit: Callable[[Any, float], bool], description: str) -> Statistic:
    """The share of images whose (present) value is a hit; worst case: the largest share."""

    def reduce(values: Sequence[Any], success: float) -> float | None:
        return float(np.mean([hit(v, success) for v in values])) if values else None

    return Statistic(name, reduce, "max", True, description)


# --------------------------------------------------------------------------- compute functions


def _psnr(ctx: ScoringContext, _: Computed) -> list[float]:
    return [psnr_array(ctx.rec_hwc[i], ctx.truth_hwc[i]) for i in range(len(ctx.rec_hwc))]


def _numbers(values: Sequence[Value]) -> list[float]:
    """Values of a metric that is never null (PSNR) as floats."""
    return [float(cast(float, v)) for v in values]


def _psnr_gain(ctx: ScoringContext, done: Computed) -> list[float]:
    return [p - f for p, f in zip(_numbers(done["psnr"]), ctx.flat_psnr, strict=True)]


def _prior_psnr(ctx: ScoringContext, _: Computed) -> list[float]:
    return [psnr_array(ctx.prior_hwc, t) for t in ctx.truth_hwc]


def _prior_ssim(ctx: ScoringContext, _: Computed) -> list[float]:
    prior = np.ascontiguousarray(ctx.prior_hwc)
    return [ssim_array(prior, t) for t in ctx.truth_hwc]


def _prior_gain(ctx: ScoringContext, done: Computed) -> list[float]:
    pairs = zip(_numbers(done["psnr"]), _numbers(done["prior_psnr"]), strict=True)
    return [p - q for p, q in pairs]


def _ssim(ctx: ScoringContext, _: Computed) -> list[float]:
    return [ssim_array(ctx.rec_hwc[i], ctx.truth_hwc[i]) for i in range(len(ctx.rec_hwc))]


def _lpips(ctx: ScoringContext, _: Computed) -> list[float] | None:
    if ctx.lpips is None:
        return None
    return [float(ctx.lpips[i, j]) for i, j in enumerate(ctx.assignment)]


def _id_rank(ctx: ScoringContext, _: Computed) -> list[int] | None:
    if ctx.reference is None:
        return None
    return pixel_ranks(ctx.ordered, ctx.truth, ctx.reference)


def _id_rank_lpips(ctx: ScoringContext, _: Computed) -> list[int] | None:
    """Ranks by LPIPS against the batch's true images and the reference pool (whose features
    the reference caches)."""
    if ctx.reference is None or ctx.lpips is None:
        return None
    where: dict[str, Any] = {"device": ctx.device, "backbone": ctx.backbone}
    pool = ctx.reference.pool_lpips_features(ctx.device, ctx.backbone)
    truths = lpips_features(ctx.truth, **where)
    candidates = [torch.cat([t, p]) for t, p in zip(truths, pool, strict=True)]
    dist = lpips_from_features(lpips_features(ctx.ordered, **where), candidates, **where)
    return identification_ranks(dist)


def _identified(ctx: ScoringContext, done: Computed) -> list[bool] | None:
    ranks = done["id_rank"]
    return None if ranks[0] is None else [r == 1 for r in ranks]


def _label_correct(ctx: ScoringContext, _: Computed) -> list[bool] | None:
    if ctx.rec_labels is None or ctx.true_labels is None:
        return None
    return [bool(x) for x in ctx.rec_labels[np.asarray(ctx.assignment)] == ctx.true_labels]


# --------------------------------------------------------------------------- the table

_ALL = ("mean", "median", "max", "min")

METRICS: tuple[ImageMetric, ...] = (
    ImageMetric(
        "psnr", "float64", "max", False,
        "PSNR (dB, data range 1, capped at 100) of the matched reconstruction",
        _psnr, _ALL, ("mean", "max"),
        (_share("success_rate", lambda v, s: v >= s,
                "the share of images with PSNR at or above the study's `success_psnr`"),),
    ),
    ImageMetric(
        "psnr_gain", "float64", "max", True,
        "`psnr` minus the PSNR of a flat image at the dataset mean (0.5 without "
        "normalisation) against the same true image: a weak baseline",
        _psnr_gain, _ALL, ("mean", "max"), schema_version=2,
    ),
    ImageMetric(
        "prior_psnr", "float64", "max", True,
        "PSNR of the population's mean image (the reference) against the true image: what is "
        "known without any client (the flat image without a reference)",
        _prior_psnr, ("mean",), schema_version=3,
    ),
    ImageMetric(
        "prior_ssim", "float64", "max", True,
        "SSIM of that mean image against the true image",
        _prior_ssim, ("mean",), schema_version=3,
    ),
    ImageMetric(
        "prior_gain", "float64", "max", True,
        "`psnr` minus `prior_psnr`: the headline gain over what is known without any client",
        _prior_gain, _ALL, ("mean", "max"), schema_version=3,
    ),
    ImageMetric(
        "ssim", "float64", "max", False,
        "SSIM (skimage, uniform 7x7 window, data range 1) of the matched reconstruction",
        _ssim, ("mean", "median", "max"), ("mean", "max"),
    ),
    ImageMetric(
        "lpips", "float64", "min", True,
        "LPIPS distance (AlexNet, v0.1) of the matched reconstruction; null without real "
        "LPIPS weights",
        _lpips, ("mean", "median", "min"), ("mean", "min"),
    ),
    ImageMetric(
        "id_rank", "int64", "min", True,
        "rank (1 = nearest) of the true image among the batch's true images and the reference "
        "pool by pixel distance to the reconstruction; null without a reference",
        _id_rank, schema_version=3,
    ),
    ImageMetric(
        "id_rank_lpips", "int64", "min", True,
        "the same rank by LPIPS; null without LPIPS or a reference",
        _id_rank_lpips,
        rates=(_share("identification_rate_lpips", lambda v, _s: v == 1,
                      "the share of images whose victim is the reconstruction's nearest "
                      "neighbour by LPIPS"),),
        schema_version=3,
    ),
    ImageMetric(
        "identified", "bool", "max", True,
        "`id_rank` is 1: the reconstruction picks its victim out of the pool",
        _identified,
        rates=(_share("identification_rate", lambda v, _s: bool(v),
                      "the share of images whose victim is the reconstruction's nearest "
                      "neighbour in pixel space (Yin et al., CVPR 2021)"),),
        schema_version=3,
    ),
    ImageMetric(
        "label_correct", "bool", "max", True,
        "the inferred label of the matched reconstruction is right; null without labels",
        _label_correct,
        rates=(_share("label_accuracy", lambda v, _s: bool(v),
                      "the share of images whose inferred label is right"),),
    ),
)  # fmt: skip
"""Every per-image metric, in ``attacks.parquet``'s column order (a metric may read those
before it)."""

STATISTICS: tuple[Statistic, ...] = tuple(s for m in METRICS for s in m.statistics)
"""Every statistic kept per batch."""
TRIAL_STATISTICS: tuple[Statistic, ...] = tuple(s for s in STATISTICS if s.per_trial)
"""The statistics kept per attack in a trial: ``<attack>_<name>`` and ``attack_<name>``."""
SCHEMA_VERSION: int = max(m.schema_version for m in METRICS)
"""The ``attacks.parquet`` schema version the table describes."""


def compute(ctx: ScoringContext) -> dict[str, list[Value]]:
    """Every metric of :data:`METRICS` for the batch, per true image (None where not measured).

    Example:
        >>> truth = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
        >>> ctx = ScoringContext(truth, truth + 0.1, np.array([0.5]), None, None, [0], None, None)
        >>> round(compute(ctx)["psnr"][0], 6), compute(ctx)["identified"]
        (20.0, [None])
    """
    done: dict[str, list[Value]] = {}
    n = ctx.truth.shape[0]
    for metric in METRICS:
        values = metric.compute(ctx, done)
        done[metric.name] = [None] * n if values is None else list(values)
    return done


def summarise(
    images: Iterable[Mapping[str, Any]], success_psnr: float, *, per_trial: bool
) -> dict[str, float | None]:
    """The statistics of per-image records (a batch's, or every image an attack reconstructed
    in a trial with ``per_trial``); each skips images without its metric's value and is None
    when none has one.

    Example:
        >>> summarise([{"psnr": 22.0, "psnr_gain": 9.5}], 20.0, per_trial=True)["psnr_gain_max"]
        9.5
    """
    rows = list(images)
    out: dict[str, float | None] = {}
    for metric in METRICS:
        values = [r[metric.name] for r in rows if r.get(metric.name) is not None]
        for stat in metric.statistics:
            if stat.per_trial or not per_trial:
                out[stat.name] = stat.reduce(values, success_psnr)
    return out


def reference_markdown() -> str:
    """The metric reference as Markdown tables (for the documentation site): per-image metrics
    and the statistics a trial reports."""
    lines = [
        "| per-image metric | type | nullable | better for the attacker | since schema | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for m in METRICS:
        null = "yes" if m.nullable else "no"
        lines.append(
            f"| `{m.name}` | {m.dtype} | {null} | {m.attacker} | {m.schema_version} | "
            f"{m.description} |"
        )
    lines += [
        "",
        "| trial metric | worst case over attacks | meaning |",
        "|---|---|---|",
    ]
    lines += [
        f"| `<attack>_{s.name}`, `attack_{s.name}` | {s.worst} | {s.description} |"
        for s in TRIAL_STATISTICS
    ]
    return "\n".join(lines) + "\n"

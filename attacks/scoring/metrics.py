"""Obscura's single reconstruction-metric protocol: every number the tool reports comes from here.

Papers and their reference code disagree on how to score reconstructions (greedy best match per
metric, best match over a whole dataset, CW-SSIM instead of SSIM, unclamped images, ...). Obscura
uses one protocol for every attack and defense:

1. Reconstructions and ground truth are (B, C, H, W) images already denormalised to [0, 1] by the
   caller; both are clamped to [0, 1] here anyway. PSNR and SSIM are computed on CPU in float64
   numpy. Non-finite reconstruction pixels (a diverged attack) are replaced before clamping
   (NaN -> 0, +inf -> 1, -inf -> 0) and counted in ``rec_nonfinite_pixels``; non-finite ground
   truth is a caller error (ValueError).
2. One Hungarian assignment per batch (``scipy.optimize.linear_sum_assignment``) on a declared cost,
   the B×B LPIPS distance matrix when LPIPS is available, otherwise the B×B MSE matrix. The cost
   used is returned as ``assignment_cost`` (``"lpips"`` or ``"mse"``). Reconstructions, and the
   reconstructed labels, are reordered by that assignment and every metric is computed in that
   order; ``assignment[i]`` is the index of the reconstruction matched to true image ``i``.
3. PSNR with data range 1: ``10 * log10(1 / mse)``, capped at :data:`PSNR_CAP` (100 dB), which is
   also the value for identical images, so results never hold ``inf`` and averages and Parquet
   columns stay finite. SSIM: ``skimage.metrics.structural_similarity`` with ``data_range=1.0``,
   uniform 7×7 window (``gaussian_weights=False``, skimage's default K1=0.01, K2=0.03,
   ``use_sample_covariance=True``), ``channel_axis=-1`` for colour images (mean over channels),
   on HWC float64 arrays; images whose shorter side is below 7 px use the largest odd window that
   fits (at least 3 px is required). LPIPS: see :mod:`attacks.scoring.lpips_net` (lpips package,
   alex,
   v0.1, ``normalize=True``, grey repeated to RGB, images under 32 px upsampled to 64 px).
4. Label accuracy is the fraction of reordered reconstructed labels equal to the true labels. It is
   ``None`` (never NaN) when the attack gave no labels or no true labels were passed.
5. Per-batch summaries (see :func:`score_images`) plus ``per_image`` records and ``assignment``.
   When LPIPS is unavailable or disabled, the LPIPS entries are ``None`` and ``lpips_status`` says
   why; a randomly initialised backbone is never used.
6. A trivial-image baseline: PSNR depends on the image (a flat grey image already scores about
   12 dB on fundus photographs), so every PSNR is also reported as ``psnr_gain`` = PSNR minus the
   PSNR of a *flat* image against the same true image, computed by :func:`flat_image_psnr` with
   the protocol above (clamped to [0, 1], data range 1, capped at :data:`PSNR_CAP`). The flat
   image's per-channel value is public, never the truth: the observation's input normalisation
   mean (the training set's per-channel mean in [0, 1]), or :data:`FLAT_VALUE` (0.5) when the
   observation does not normalise (see :func:`flat_value`). A gain of 0 dB means the attack did
   no better than painting the dataset mean; a perfect reconstruction gains ``100 - flat PSNR``.
7. The prior baseline, the headline: a flat image is a weak "no information" guess (on chest
   X-rays the population's *mean image* beats it by 3 dB without any client). With a
   :class:`~attacks.scoring.population.Reference` (images of the population disjoint from the
   victims),
   every image also gets ``prior_psnr`` / ``prior_ssim`` (the reference's per-pixel mean image
   against the true image) and ``prior_gain`` = PSNR minus ``prior_psnr``; without one the prior
   is the flat image (``prior`` says which: ``"mean_image"`` or ``"flat"``). A reconstruction
   that is the population mean gains 0 dB over the prior.
8. Identification (Yin et al., CVPR 2021, "image identifiability precision"): with a reference,
   ``id_rank`` is the rank of the true image among the batch's true images and the reference
   pool by pixel distance (mean squared difference) to its matched reconstruction;
   ``identified`` means rank 1. ``id_rank_lpips`` ranks by LPIPS when it is available. The batch
   summary gives ``identification_rate`` (and ``identification_rate_lpips``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from attacks.scoring._primitives import (
    PSNR_CAP,
    SSIM_WIN_SIZE,
    flat_psnrs,
    psnr_array,
    ssim_array,
)
from attacks.scoring.lpips_net import LpipsUnavailable, lpips_matrix
from attacks.scoring.population import Reference
from attacks.scoring.table import ScoringContext, Value, compute, summarise

__all__ = [
    "DEFAULT_SUCCESS_PSNR",
    "FLAT_VALUE",
    "PSNR_CAP",
    "SSIM_WIN_SIZE",
    "ImageScore",
    "Reference",
    "Score",
    "flat_image_psnr",
    "flat_value",
    "match",
    "psnr",
    "score",
    "score_images",
    "ssim",
]

logger = logging.getLogger(__name__)

DEFAULT_SUCCESS_PSNR = 20.0
"""Default PSNR (dB) at or above which a reconstruction counts as a success."""

FLAT_VALUE = 0.5
"""Per-channel value (mid grey) of the flat baseline image for inputs without normalisation."""

CostName = Literal["lpips", "mse"]
FlatValue = float | Sequence[float]
"""A flat image's value: one number for every channel, or one per channel, in [0, 1]."""


# --------------------------------------------------------------------------- input handling


def _as_batch(images: Any, name: str) -> torch.Tensor:
    """Return ``images`` as a detached CPU float64 (B, C, H, W) tensor (not yet clamped)."""
    x = torch.as_tensor(images).detach().to("cpu", torch.float64)
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    return x


def _truth_batch(images: Any) -> torch.Tensor:
    """Validate and clamp ground-truth images; non-finite values are a caller error."""
    x = _as_batch(images, "true_images")
    if not torch.isfinite(x).all():
        raise ValueError("true_images contain non-finite values")
    return x.clamp(0.0, 1.0)


def _reconstruction_batch(images: Any) -> tuple[torch.Tensor, int]:
    """Clamp reconstructions after replacing non-finite pixels; return them and how many there were.

    NaN becomes 0, +inf 1 and -inf 0 so that a diverged attack scores as a (bad) image instead of
    turning the batch's metrics into NaN.
    """
    x = _as_batch(images, "rec_images")
    nonfinite = int((~torch.isfinite(x)).sum().item())
    if nonfinite:
        x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0)
    return x.clamp(0.0, 1.0), nonfinite


def _single_image(image: Any, name: str) -> np.ndarray:
    """Return one (C, H, W) image in [0, 1] as a clamped HWC float64 numpy array."""
    x = torch.as_tensor(image).detach().to("cpu", torch.float64)
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (C, H, W), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")
    return x.clamp(0.0, 1.0).permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------- PSNR / SSIM


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two (C, H, W) images in [0, 1] (clamped), data range 1.

    ``10 * log10(1 / mse)``; identical images give :data:`PSNR_CAP` (100 dB), which also bounds
    every value so results are always finite.
    """
    x, y = _single_image(a, "a"), _single_image(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} and {y.shape}")
    return psnr_array(x, y)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM of two (C, H, W) images in [0, 1] (clamped) with ``skimage.metrics``.

    ``structural_similarity(data_range=1.0, win_size=7, gaussian_weights=False)`` with skimage's
    other defaults (K1=0.01, K2=0.03, sample covariance); ``channel_axis=-1`` (mean over channels)
    for C > 1; images whose shorter side is under 7 px use the largest odd window that fits.
    """
    return ssim_array(_single_image(a, "a"), _single_image(b, "b"))


# --------------------------------------------------------------------------- flat baseline


def flat_value(mean: Sequence[float], std: Sequence[float]) -> tuple[float, ...]:
    """The flat baseline image's per-channel value for an input normalisation ``mean``/``std``.

    The normalisation ``mean`` (the training set's per-channel mean, in [0, 1] image units) when
    the model's input is normalised; ``(FLAT_VALUE,)`` (0.5) when it is not, which an observation
    says with an empty ``mean`` or with ``mean`` all 0.0 and ``std`` all 1.0 (the defaults of
    :func:`fl.simulation.simulator.observe_client_step`). Public facts only: it never looks at
    the private images.

    Args:
        mean: per-channel normalisation mean (``Observation.mean``).
        std: per-channel normalisation standard deviation (``Observation.std``).

    Raises:
        ValueError: a mean value is not finite.

    Example:
        >>> flat_value((0.3,), (0.2,)), flat_value((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        ((0.3,), (0.5,))
    """
    values = tuple(float(m) for m in mean)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"normalisation mean must be finite, got {values}")
    if not values or (all(v == 0.0 for v in values) and all(float(s) == 1.0 for s in std)):
        return (FLAT_VALUE,)
    return values


def _flat_channels(value: FlatValue, channels: int) -> np.ndarray:
    """``value`` as ``channels`` float64 entries in [0, 1] (one number is broadcast)."""
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, channels)
    if arr.size != channels:
        raise ValueError(f"flat value has {arr.size} entries for images with {channels} channels")
    if not np.isfinite(arr).all():
        raise ValueError(f"flat value must be finite, got {arr.tolist()}")
    return np.clip(arr, 0.0, 1.0)


def flat_image_psnr(true_images: torch.Tensor, value: FlatValue = FLAT_VALUE) -> list[float]:
    """PSNR (dB) of a flat image at ``value`` against each true image: the ``psnr_gain`` baseline.

    Same protocol as every PSNR here (images clamped to [0, 1], data range 1, capped at
    :data:`PSNR_CAP`); ``value`` is clamped to [0, 1] too.

    Args:
        true_images: (B, C, H, W) ground truth in [0, 1].
        value: the flat image's value, one number or one per channel (see :func:`flat_value`).

    Raises:
        ValueError: wrong shape, non-finite truth or value, or a per-channel value whose length
            is neither 1 nor C.

    Example:
        >>> flat_image_psnr(torch.zeros(1, 1, 8, 8), 0.1)  # MSE 0.01
        [20.0]
    """
    truth = _truth_batch(true_images)
    return flat_psnrs(truth, _flat_channels(value, truth.shape[1]))


# --------------------------------------------------------------------------- assignment


def _mse_matrix(truth: torch.Tensor, rec: torch.Tensor) -> np.ndarray:
    """Return M (float64) with M[i, j] = mean squared error between truth[i] and rec[j]."""
    t = truth.reshape(truth.shape[0], -1)
    r = rec.reshape(rec.shape[0], -1)
    out = np.empty((t.shape[0], r.shape[0]), dtype=np.float64)
    for i in range(t.shape[0]):
        out[i] = ((r - t[i]) ** 2).mean(dim=1).numpy()
    return out


def _hungarian(cost: np.ndarray) -> list[int]:
    """Return ``assignment`` with assignment[i] = column matched to row i (minimum total cost)."""
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(cost.shape[0], dtype=np.int64)
    order[rows] = cols
    return [int(c) for c in order]


def _check_same_shape(rec: torch.Tensor, truth: torch.Tensor) -> None:
    """Raise ValueError unless reconstructions and ground truth have identical shapes."""
    if rec.shape != truth.shape:
        raise ValueError(
            f"rec_images {tuple(rec.shape)} and true_images {tuple(truth.shape)} differ in shape"
        )


def match(
    rec_images: torch.Tensor,
    true_images: torch.Tensor,
    cost: CostName = "lpips",
    *,
    device: str | torch.device = "cpu",
) -> list[int]:
    """Hungarian-match reconstructions to ground truth; result[i] = reconstruction for true i.

    ``cost="lpips"`` minimises the total LPIPS distance (raises
    :class:`~attacks.scoring.lpips_net.LpipsUnavailable` when LPIPS has no real weights);
    ``cost="mse"``
    the total mean squared error. Both batches are (B, C, H, W) in [0, 1] and are clamped.
    """
    rec, _ = _reconstruction_batch(rec_images)
    truth = _truth_batch(true_images)
    _check_same_shape(rec, truth)
    if cost == "lpips":
        matrix = lpips_matrix(truth, rec, device=device).numpy()
    elif cost == "mse":
        matrix = _mse_matrix(truth, rec)
    else:
        raise ValueError(f"cost must be 'lpips' or 'mse', got {cost!r}")
    return _hungarian(matrix)


# --------------------------------------------------------------------------- scoring


def _labels(labels: Any, n: int, name: str) -> np.ndarray | None:
    """Return labels as an int64 vector of length ``n``, or None when none were given."""
    if labels is None:
        return None
    arr = torch.as_tensor(labels).detach().to("cpu")
    if arr.is_floating_point() or arr.is_complex():
        raise ValueError(f"{name} must be integer class indices, got dtype {arr.dtype}")
    flat = arr.reshape(-1).to(torch.int64).numpy()
    if flat.shape[0] != n:
        raise ValueError(f"{name} has {flat.shape[0]} entries for {n} images")
    return flat


@dataclass(frozen=True, eq=False)
class ImageScore(Mapping[str, Any]):
    """One true image's scores: ``index`` (its place in the client's batch) and one value per
    metric of :data:`attacks.scoring.table.METRICS` (None where not measured). Reads like the
    mapping it replaces: ``image["psnr"]``, ``image.get("lpips")``."""

    index: int
    metrics: Mapping[str, Value]  # not ``values``: that would hide Mapping.values()

    def __getitem__(self, key: str) -> Any:
        return self.index if key == "index" else self.metrics[key]

    def __iter__(self) -> Iterator[str]:
        yield "index"
        yield from self.metrics

    def __len__(self) -> int:
        return 1 + len(self.metrics)


@dataclass(frozen=True, eq=False)
class Score(Mapping[str, Any]):
    """A scored batch (see :func:`score_images`): the assignment, the baselines, the batch's
    statistics (``statistics``, named by :data:`attacks.scoring.table.STATISTICS`) and the
    per-image scores. ``score["psnr_max"]`` reads a statistic or a field by name."""

    n_images: int
    assignment_cost: CostName
    assignment: list[int]
    flat_value: list[float]
    flat_psnr_mean: float
    prior: Literal["mean_image", "flat"]
    identification_pool: int | None
    success_psnr: float
    lpips_status: str
    rec_nonfinite_pixels: int
    statistics: Mapping[str, float | None]
    per_image: list[ImageScore]

    def __getitem__(self, key: str) -> Any:
        if key in self.statistics:
            return self.statistics[key]
        if key in _SCORE_FIELDS:
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        yield from (f for f in _SCORE_FIELDS if f != "statistics")
        yield from self.statistics

    def __len__(self) -> int:
        return len(_SCORE_FIELDS) - 1 + len(self.statistics)


_SCORE_FIELDS = tuple(f.name for f in fields(Score))


def score_images(
    rec_images: torch.Tensor,
    true_images: torch.Tensor,
    rec_labels: torch.Tensor | None = None,
    true_labels: torch.Tensor | None = None,
    *,
    success_psnr: float = DEFAULT_SUCCESS_PSNR,
    lpips: bool = True,
    device: str | torch.device = "cpu",
    lpips_backbone: str | os.PathLike[str] | None = None,
    flat: FlatValue = FLAT_VALUE,
    reference: Reference | None = None,
) -> Score:
    """Score a batch of reconstructions against ground truth with the Obscura protocol.

    ``rec_images``, ``true_images``: (B, C, H, W) in [0, 1]; labels (B,) integers or None.
    ``lpips=False`` skips LPIPS (the assignment then uses MSE) run on ``device`` with the
    ``lpips_backbone`` file (None: :func:`attacks.scoring.lpips_net.configure`); ``flat``: the flat
    image of ``psnr_gain`` (:func:`flat_value`); ``reference``: the victims' population
    (:class:`~attacks.scoring.population.Reference`, disjoint from them) for the prior baseline and
    identification (points 7 and 8 of the module docstring). Returns a :class:`Score`:

    * ``n_images``, ``assignment_cost`` (``"lpips"``/``"mse"``), ``assignment`` (list[int],
      assignment[i] = reconstruction matched to true image i);
    * ``statistics``: every batch statistic of the metric table
      (:data:`attacks.scoring.table.STATISTICS`), e.g. ``psnr_mean, psnr_median, psnr_max,
      psnr_min``, the same of ``psnr_gain`` and ``prior_gain``, ``ssim_max``, ``lpips_min``,
      ``prior_psnr_mean``, ``identification_rate``, ``label_accuracy``, ``success_rate``
      (None where not measured: LPIPS without weights, identification without a reference,
      label accuracy without labels on either side);
    * ``flat_value`` (per-channel floats used), ``flat_psnr_mean`` (the flat image's mean PSNR),
      ``prior`` (``"mean_image"`` with a reference, else ``"flat"``), ``identification_pool``
      (candidates per image: the batch plus the pool; None without a reference);
    * ``success_psnr``, ``lpips_status`` (``"ok"``, or why LPIPS is None),
      ``rec_nonfinite_pixels`` (replaced non-finite reconstruction values);
    * ``per_image``: one :class:`ImageScore` per true image, in ground-truth order, with every
      metric of the table. No value is ever NaN or inf.

    Raises:
        ValueError: shapes differ or are not (B, C, H, W), non-finite ground truth or
            ``success_psnr`` or ``flat``, labels of the wrong length or dtype, a reference of
            another image shape.

    Example:
        >>> truth, grey = torch.zeros(1, 1, 8, 8), torch.full((1, 1, 8, 8), 0.5)
        >>> s = score_images(grey, truth, lpips=False)  # the flat image itself: no gain
        >>> round(s["psnr_max"], 2), s["psnr_gain_max"], s.flat_value, s.prior
        (6.02, 0.0, [0.5], 'flat')
    """
    rec, nonfinite = _reconstruction_batch(rec_images)
    truth = _truth_batch(true_images)
    _check_inputs(rec, truth, reference, success_psnr)
    n = truth.shape[0]
    lpips_dist, lpips_status = _lpips_distances(truth, rec, lpips, device, lpips_backbone)
    assignment = _hungarian(_mse_matrix(truth, rec) if lpips_dist is None else lpips_dist)
    ctx = ScoringContext(
        truth=truth,
        ordered=rec[assignment],
        flat=_flat_channels(flat, truth.shape[1]),
        reference=reference,
        lpips=lpips_dist,
        assignment=assignment,
        rec_labels=_labels(rec_labels, n, "rec_labels"),
        true_labels=_labels(true_labels, n, "true_labels"),
        device=device,
        backbone=None if lpips_backbone is None else str(lpips_backbone),
    )
    return _scored(ctx, success_psnr, lpips_status, nonfinite)


def _scored(ctx: ScoringContext, success_psnr: float, lpips_status: str, nonfinite: int) -> Score:
    """The :class:`Score` of a batch: every metric of the table per image, and its statistics."""
    n = ctx.truth.shape[0]
    values = compute(ctx)
    images = [ImageScore(i, {k: v[i] for k, v in values.items()}) for i in range(n)]
    return Score(
        n_images=n,
        assignment_cost="mse" if ctx.lpips is None else "lpips",
        assignment=ctx.assignment,
        flat_value=[float(v) for v in ctx.flat],
        flat_psnr_mean=float(np.mean(ctx.flat_psnr)),
        prior="flat" if ctx.reference is None else "mean_image",
        identification_pool=None if ctx.reference is None else n + len(ctx.reference.pool),
        success_psnr=float(success_psnr),
        lpips_status=lpips_status,
        rec_nonfinite_pixels=nonfinite,
        statistics=summarise(images, success_psnr, per_trial=False),
        per_image=images,
    )


def _check_inputs(
    rec: torch.Tensor, truth: torch.Tensor, reference: Reference | None, success_psnr: float
) -> None:
    """Raise ValueError unless the batches match, the reference images have their shape and
    ``success_psnr`` is finite."""
    _check_same_shape(rec, truth)
    if reference is not None and tuple(reference.mean_image.shape) != tuple(truth.shape[1:]):
        raise ValueError(
            f"reference images are {tuple(reference.mean_image.shape)}, the true images "
            f"{tuple(truth.shape[1:])}: the reference must come from the same population"
        )
    if not math.isfinite(success_psnr):
        raise ValueError(f"success_psnr must be finite, got {success_psnr}")


def _lpips_distances(
    truth: torch.Tensor,
    rec: torch.Tensor,
    wanted: bool,
    device: str | torch.device,
    backbone: str | os.PathLike[str] | None,
) -> tuple[np.ndarray | None, str]:
    """The LPIPS matrix D[i, j] = LPIPS(truth[i], rec[j]) and ``"ok"``, or None and why not."""
    if not wanted:
        return None, "disabled (lpips=False)"
    try:
        return lpips_matrix(truth, rec, device=device, backbone=backbone).numpy(), "ok"
    except LpipsUnavailable as exc:
        logger.warning("LPIPS unavailable, scoring without it (MSE assignment): %s", exc)
        return None, f"unavailable: {exc}"


_MISSING = object()


def score(
    rec: Any,
    truth: Any,
    *,
    success_psnr: float = DEFAULT_SUCCESS_PSNR,
    lpips: bool = True,
    device: str | torch.device = "cpu",
    lpips_backbone: str | os.PathLike[str] | None = None,
    reference: Reference | None = None,
) -> Score:
    """Score an attack's reconstruction against the client's batch (see :func:`score_images`).

    ``rec`` and ``truth`` are any objects with ``.images`` ((B, C, H, W) float tensor in [0, 1])
    and ``.labels`` ((B,) long tensor, or None / absent when the attack recovered no labels).
    ``psnr_gain`` is measured against a flat image at ``rec.flat_value`` (a
    :class:`~attacks.reconstruction.Reconstruction` carries the observation's normalisation
    mean there), or at :data:`FLAT_VALUE` when ``rec`` has no such attribute; ``prior_gain`` and
    identification against ``reference`` (the flat image and no identification without one).

    Raises:
        TypeError: ``rec`` or ``truth`` has no ``.images``.
        ValueError: as :func:`score_images`.

    Example:
        >>> s = score(attack.run(obs), truth)  # doctest: +SKIP
        >>> s["psnr_max"], s["psnr_gain_max"]  # doctest: +SKIP
    """
    for obj, name in ((rec, "rec"), (truth, "truth")):
        if getattr(obj, "images", _MISSING) is _MISSING:
            raise TypeError(f"{name} must have an .images attribute, got {type(obj).__name__}")
    return score_images(
        rec.images,
        truth.images,
        getattr(rec, "labels", None),
        getattr(truth, "labels", None),
        success_psnr=success_psnr,
        lpips=lpips,
        device=device,
        lpips_backbone=lpips_backbone,
        flat=getattr(rec, "flat_value", FLAT_VALUE),
        reference=reference,
    )

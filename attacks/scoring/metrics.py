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
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

from attacks.scoring.lpips_net import (
    LpipsUnavailable,
    lpips_features,
    lpips_from_features,
    lpips_matrix,
)
from attacks.scoring.population import Reference, identification_ranks, pixel_ranks

__all__ = [
    "DEFAULT_SUCCESS_PSNR",
    "FLAT_VALUE",
    "PSNR_CAP",
    "SSIM_WIN_SIZE",
    "Reference",
    "flat_image_psnr",
    "flat_value",
    "match",
    "psnr",
    "score",
    "score_images",
    "ssim",
]

logger = logging.getLogger(__name__)

PSNR_CAP = 100.0
"""PSNR (dB) reported for identical images and the upper bound of every PSNR (never ``inf``)."""

DEFAULT_SUCCESS_PSNR = 20.0
"""Default PSNR (dB) at or above which a reconstruction counts as a success."""

SSIM_WIN_SIZE = 7
"""SSIM uniform window side (px); smaller images use the largest odd side that fits."""

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


def _psnr_np(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB, data range 1) of two equally shaped arrays in [0, 1], capped at PSNR_CAP."""
    mse = float(np.mean((a - b) ** 2))
    if mse <= 0.0:
        return PSNR_CAP
    return min(10.0 * math.log10(1.0 / mse), PSNR_CAP)


def _ssim_window(height: int, width: int) -> int:
    """Return the SSIM window side: 7, or the largest odd side <= min(H, W) for small images."""
    side = min(height, width)
    if side >= SSIM_WIN_SIZE:
        return SSIM_WIN_SIZE
    win = side if side % 2 == 1 else side - 1
    if win < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 px, got {height}x{width}")
    return win


def _ssim_np(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two HWC float64 arrays in [0, 1] (protocol settings, see module docstring)."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} and {b.shape}")
    win = _ssim_window(a.shape[0], a.shape[1])
    if a.shape[2] == 1:
        value = structural_similarity(a[..., 0], b[..., 0], data_range=1.0, win_size=win)
    else:
        value = structural_similarity(a, b, data_range=1.0, win_size=win, channel_axis=-1)
    return float(value)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two (C, H, W) images in [0, 1] (clamped), data range 1.

    ``10 * log10(1 / mse)``; identical images give :data:`PSNR_CAP` (100 dB), which also bounds
    every value so results are always finite.
    """
    x, y = _single_image(a, "a"), _single_image(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} and {y.shape}")
    return _psnr_np(x, y)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM of two (C, H, W) images in [0, 1] (clamped) with ``skimage.metrics``.

    ``structural_similarity(data_range=1.0, win_size=7, gaussian_weights=False)`` with skimage's
    other defaults (K1=0.01, K2=0.03, sample covariance); ``channel_axis=-1`` (mean over channels)
    for C > 1; images whose shorter side is under 7 px use the largest odd window that fits.
    """
    return _ssim_np(_single_image(a, "a"), _single_image(b, "b"))


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


def _flat_psnrs(truth: torch.Tensor, channels: np.ndarray) -> list[float]:
    """Per image of a clamped (B, C, H, W) float64 truth batch, the PSNR of the flat image with
    per-channel values ``channels`` (from :func:`_flat_channels`)."""
    truth_np = truth.permute(0, 2, 3, 1).numpy()
    flat = np.broadcast_to(channels, truth_np.shape[1:])
    return [_psnr_np(flat, truth_np[i]) for i in range(truth_np.shape[0])]


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
    return _flat_psnrs(truth, _flat_channels(value, truth.shape[1]))


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
    arr = arr.reshape(-1).to(torch.int64).numpy()
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries for {n} images")
    return arr


def _summary(values: Sequence[float] | None, stats: Sequence[str]) -> list[float | None]:
    """Return the requested statistics of ``values`` as Python floats (None when no values)."""
    if values is None:
        return [None] * len(stats)
    arr = np.asarray(values, dtype=np.float64)
    funcs = {"mean": np.mean, "median": np.median, "max": np.max, "min": np.min}
    return [float(funcs[s](arr)) for s in stats]


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
) -> dict[str, Any]:
    """Score a batch of reconstructions against ground truth with the Obscura protocol.

    ``rec_images``, ``true_images``: (B, C, H, W) in [0, 1]; labels (B,) integers or None.
    ``lpips=False`` skips LPIPS (the assignment then uses MSE) run on ``device`` with the
    ``lpips_backbone`` file (None: :func:`attacks.scoring.lpips_net.configure`); ``flat``: the flat
    image of ``psnr_gain`` (:func:`flat_value`); ``reference``: the victims' population
    (:class:`~attacks.scoring.population.Reference`, disjoint from them) for the prior baseline and
    identification (points 7 and 8 of the module docstring). Returns a dict with

    * ``n_images``, ``assignment_cost`` (``"lpips"``/``"mse"``), ``assignment`` (list[int],
      assignment[i] = reconstruction matched to true image i);
    * ``psnr_``, ``psnr_gain_`` and ``prior_gain_`` ``mean, median, max, min``, ``ssim_mean,
      ssim_median, ssim_max, lpips_mean, lpips_median, lpips_min`` (LPIPS: None without it);
    * ``flat_value`` (list of per-channel floats used), ``flat_psnr_mean`` (the flat image's mean
      PSNR over the batch); ``prior`` (``"mean_image"`` with a reference, else ``"flat"``),
      ``prior_psnr_mean``, ``prior_ssim_mean``;
    * ``identification_rate``, ``identification_rate_lpips`` and ``identification_pool``
      (candidates per image: the batch plus the pool); None where not measured;
    * ``label_accuracy`` (None when either side has no labels), ``success_rate`` (share with
      PSNR >= ``success_psnr``), ``success_psnr``, ``lpips_status`` (``"ok"``, or why LPIPS is
      None), ``rec_nonfinite_pixels`` (replaced non-finite reconstruction values);
    * ``per_image``: ``{"index", "psnr", "psnr_gain", "prior_psnr", "prior_ssim", "prior_gain",
      "ssim", "lpips", "id_rank", "id_rank_lpips", "identified", "label_correct"}`` in
      ground-truth order (None where not measured). No value is ever NaN or inf.

    Raises:
        ValueError: shapes differ or are not (B, C, H, W), non-finite ground truth or
            ``success_psnr`` or ``flat``, labels of the wrong length or dtype, a reference of
            another image shape.

    Example:
        >>> truth, grey = torch.zeros(1, 1, 8, 8), torch.full((1, 1, 8, 8), 0.5)
        >>> s = score_images(grey, truth, lpips=False)  # the flat image itself: no gain
        >>> round(s["psnr_max"], 2), s["psnr_gain_max"], s["flat_value"], s["prior"]
        (6.02, 0.0, [0.5], 'flat')
    """
    rec, nonfinite = _reconstruction_batch(rec_images)
    truth = _truth_batch(true_images)
    _check_inputs(rec, truth, reference, success_psnr)
    n = truth.shape[0]
    channels = _flat_channels(flat, truth.shape[1])
    rec_lab = _labels(rec_labels, n, "rec_labels")
    true_lab = _labels(true_labels, n, "true_labels")
    lpips_dist, lpips_status = _lpips_distances(truth, rec, lpips, device, lpips_backbone)
    assignment_cost: CostName = "mse" if lpips_dist is None else "lpips"
    assignment = _hungarian(_mse_matrix(truth, rec) if lpips_dist is None else lpips_dist)

    ordered = rec[assignment]
    values = _image_metrics(truth, ordered, channels, lpips_dist, assignment, reference)
    ids = _identification(truth, ordered, reference, lpips_dist is not None, device, lpips_backbone)
    correct = _label_correct(rec_lab, true_lab, assignment)
    psnrs = values.psnr
    return {
        "n_images": n,
        "assignment_cost": assignment_cost,
        "assignment": assignment,
        **_summaries(psnrs, values.psnr_gain, values.prior_gain, values.ssim, values.lpips),
        **values.baselines(channels, reference),
        **ids.summary(),
        "label_accuracy": None if correct is None else float(np.mean(correct)),
        "success_rate": float(np.mean([p >= success_psnr for p in psnrs])),
        "success_psnr": float(success_psnr),
        "lpips_status": lpips_status,
        "rec_nonfinite_pixels": nonfinite,
        "per_image": _per_image(values, ids, correct),
    }


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


class _ImageMetrics(NamedTuple):
    """Per true image, the metrics of its matched reconstruction (ground-truth order) and of the
    baselines (flat image, prior image)."""

    psnr: list[float]
    flat_psnr: list[float]
    psnr_gain: list[float]
    prior_psnr: list[float]
    prior_ssim: list[float]
    prior_gain: list[float]
    ssim: list[float]
    lpips: list[float] | None

    def baselines(self, channels: np.ndarray, reference: Reference | None) -> dict[str, Any]:
        """The batch's baseline figures: the flat image's value and mean PSNR, which prior was
        used (``mean_image`` or ``flat``) and its mean PSNR and SSIM."""
        return {
            "flat_value": [float(v) for v in channels],
            "flat_psnr_mean": float(np.mean(self.flat_psnr)),
            "prior": "flat" if reference is None else "mean_image",
            "prior_psnr_mean": float(np.mean(self.prior_psnr)),
            "prior_ssim_mean": float(np.mean(self.prior_ssim)),
        }


def _image_metrics(
    truth: torch.Tensor,
    ordered: torch.Tensor,
    channels: np.ndarray,
    lpips_dist: np.ndarray | None,
    assignment: list[int],
    reference: Reference | None,
) -> _ImageMetrics:
    """PSNR, SSIM and LPIPS (None without LPIPS) of each true image and its matched
    reconstruction (``ordered`` = reconstructions reordered), the flat image's PSNR and the
    prior image's PSNR and SSIM (the reference's mean image, or the flat image without one)."""
    n = truth.shape[0]
    truth_np = truth.permute(0, 2, 3, 1).numpy()
    rec_np = ordered.permute(0, 2, 3, 1).numpy()
    if reference is None:
        prior = np.broadcast_to(channels, truth_np.shape[1:])
    else:
        prior = reference.mean_image.to(torch.float64).permute(1, 2, 0).numpy()
    psnrs = [_psnr_np(rec_np[i], truth_np[i]) for i in range(n)]
    flat_psnrs = _flat_psnrs(truth, channels)
    prior_psnrs = [_psnr_np(prior, truth_np[i]) for i in range(n)]
    lpipss = None if lpips_dist is None else [float(lpips_dist[i, assignment[i]]) for i in range(n)]
    return _ImageMetrics(
        psnr=psnrs,
        flat_psnr=flat_psnrs,
        psnr_gain=[p - f for p, f in zip(psnrs, flat_psnrs, strict=True)],
        prior_psnr=prior_psnrs,
        prior_ssim=[_ssim_np(np.ascontiguousarray(prior), truth_np[i]) for i in range(n)],
        prior_gain=[p - f for p, f in zip(psnrs, prior_psnrs, strict=True)],
        ssim=[_ssim_np(rec_np[i], truth_np[i]) for i in range(n)],
        lpips=lpipss,
    )


class _Identification(NamedTuple):
    """Per true image, its rank among the candidates (pixel space, LPIPS); None: not measured."""

    pixel: list[int] | None
    lpips: list[int] | None
    candidates: int | None

    def summary(self) -> dict[str, float | int | None]:
        """The batch's identification rates (share of rank 1) and candidates per image."""

        def rate(ranks: list[int] | None) -> float | None:
            return None if ranks is None else float(np.mean([r == 1 for r in ranks]))

        return {
            "identification_rate": rate(self.pixel),
            "identification_rate_lpips": rate(self.lpips),
            "identification_pool": self.candidates,
        }


def _identification(
    truth: torch.Tensor,
    ordered: torch.Tensor,
    reference: Reference | None,
    with_lpips: bool,
    device: str | torch.device,
    backbone: str | os.PathLike[str] | None,
) -> _Identification:
    """Identification ranks of each true image by its matched reconstruction against the
    batch's true images and the reference pool, in pixel space and (``with_lpips``) in LPIPS."""
    if reference is None:
        return _Identification(None, None, None)
    pixel = pixel_ranks(ordered, truth, reference)
    candidates = truth.shape[0] + int(reference.pool.shape[0])
    if not with_lpips:
        return _Identification(pixel, None, candidates)
    where: dict[str, Any] = {"device": device, "backbone": backbone}
    pool = reference.pool_lpips_features(device, backbone)
    truths = lpips_features(truth, **where)
    candidates_feats = [torch.cat([t, p]) for t, p in zip(truths, pool, strict=True)]
    dist = lpips_from_features(lpips_features(ordered, **where), candidates_feats, **where)
    return _Identification(pixel, identification_ranks(dist), candidates)


def _per_image(
    values: _ImageMetrics, ids: _Identification, correct: list[bool] | None
) -> list[dict[str, Any]]:
    """The ``per_image`` records of :func:`score_images` in ground-truth order."""
    return [
        {
            "index": i,
            "psnr": values.psnr[i],
            "psnr_gain": values.psnr_gain[i],
            "prior_psnr": values.prior_psnr[i],
            "prior_ssim": values.prior_ssim[i],
            "prior_gain": values.prior_gain[i],
            "ssim": values.ssim[i],
            "lpips": None if values.lpips is None else values.lpips[i],
            "id_rank": None if ids.pixel is None else ids.pixel[i],
            "id_rank_lpips": None if ids.lpips is None else ids.lpips[i],
            "identified": None if ids.pixel is None else ids.pixel[i] == 1,
            "label_correct": None if correct is None else correct[i],
        }
        for i in range(len(values.psnr))
    ]


def _label_correct(
    rec_labels: np.ndarray | None, true_labels: np.ndarray | None, assignment: list[int]
) -> list[bool] | None:
    """Per true image, whether its assigned reconstruction's label is right (None: no labels)."""
    if rec_labels is None or true_labels is None:
        return None
    return [bool(x) for x in rec_labels[np.asarray(assignment)] == true_labels]


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


def _summaries(
    psnrs: list[float],
    gains: list[float],
    prior_gains: list[float],
    ssims: list[float],
    lpipss: list[float] | None,
) -> dict[str, float | None]:
    """Per-batch mean, median and worst case (max PSNR, PSNR gains and SSIM, min LPIPS), and the
    minimum PSNR and PSNR gains."""
    names = {
        "psnr": (psnrs, ("mean", "median", "max", "min")),
        "psnr_gain": (gains, ("mean", "median", "max", "min")),
        "prior_gain": (prior_gains, ("mean", "median", "max", "min")),
        "ssim": (ssims, ("mean", "median", "max")),
        "lpips": (lpipss, ("mean", "median", "min")),
    }
    out: dict[str, float | None] = {}
    for metric, (values, stats) in names.items():
        out.update(
            {f"{metric}_{k}": v for k, v in zip(stats, _summary(values, stats), strict=True)}
        )
    return out


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
) -> dict[str, Any]:
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

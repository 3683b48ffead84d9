"""What is known about the victims' images without any client: the population prior baseline and
the identification pool.

A reconstruction only shows leakage where it says more than the attacker knew before the round.
A server (or anyone) holding images of the same population already knows their per-pixel mean:
on chest X-rays that mean image alone scores about 19 dB against a patient's image, where a flat
image scores 16 dB (``docs/metrics.md``). Hatamizadeh et al. (IEEE TMI 2023) likewise measure
leakage relative to a prior image. A :class:`Reference` holds that mean image and a pool of
other images of the population for *image identifiability* (Yin et al., CVPR 2021, §4, "IIP";
breaching ``analysis/metrics.py``): a reconstruction identifies its victim when the victim is its
nearest neighbour among the victim, the other images of the batch and the pool.

The reference images must be disjoint from the victims (a study uses its evaluation split, which
no client trains on); images are (N, C, H, W) in [0, 1].
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from attacks.scoring.lpips_net import lpips_features

__all__ = ["DEFAULT_POOL", "MIN_POOL", "Reference", "identification_ranks", "pixel_ranks"]

DEFAULT_POOL = 1024
"""Most reference images kept for identification (all of them when there are fewer)."""

MIN_POOL = 256
"""Fewest pool images for an identification rate worth reporting (Yin et al. use whole
validation sets; the chance of a blind guess identifying a victim is 1 / (pool + batch))."""

_CHUNK = 4096  # images per step when averaging a large reference set


@dataclass(frozen=True)
class Reference:
    """The population prior: the per-pixel ``mean_image`` (C, H, W) of ``size`` reference images
    and a ``pool`` (P, C, H, W) of them for identification, all float32 in [0, 1] on the CPU.

    Build it with :meth:`from_images`; pass it to :func:`attacks.scoring.metrics.score_images`.
    """

    mean_image: torch.Tensor
    pool: torch.Tensor
    size: int
    _lpips: dict[tuple[str, str | None], list[torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def from_images(
        cls, images: torch.Tensor, *, pool_size: int = DEFAULT_POOL, seed: int = 0
    ) -> Reference:
        """The reference of ``images`` (N, C, H, W) in [0, 1] (floats) or 0-255 (``uint8``).

        The mean image is taken over all ``images``; the identification pool is ``pool_size``
        of them chosen by ``seed`` (all when there are fewer).

        Args:
            images: the reference set, disjoint from the victims.
            pool_size: most images kept for identification (at least 1).
            seed: which images the pool keeps when there are more than ``pool_size``.

        Raises:
            ValueError: not a non-empty (N, C, H, W) batch, non-finite values, or
                ``pool_size`` < 1.

        Example:
            >>> ref = Reference.from_images(torch.rand(300, 1, 8, 8), pool_size=256)
            >>> tuple(ref.mean_image.shape), ref.pool.shape[0], ref.size
            ((1, 8, 8), 256, 300)
        """
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(
                f"reference images must be a non-empty (N, C, H, W) batch, got "
                f"{tuple(images.shape)}"
            )
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        scale = 255.0 if images.dtype == torch.uint8 else 1.0
        total = torch.zeros(images.shape[1:], dtype=torch.float64)
        for start in range(0, images.shape[0], _CHUNK):
            chunk = images[start : start + _CHUNK].detach().to("cpu", torch.float64) / scale
            if not torch.isfinite(chunk).all():
                raise ValueError("reference images contain non-finite values")
            total += chunk.clamp(0.0, 1.0).sum(dim=0)
        n = int(images.shape[0])
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:pool_size]
        pool = (images[keep.sort().values].detach().to("cpu", torch.float32) / scale).clamp(0, 1)
        return cls((total / n).to(torch.float32), pool.contiguous(), n)

    def pool_lpips_features(
        self, device: str | torch.device, backbone: str | os.PathLike[str] | None
    ) -> list[torch.Tensor]:
        """The pool's LPIPS features (:func:`attacks.scoring.lpips_net.lpips_features`), computed
        once per device and backbone: every scored batch compares its reconstructions with them."""
        key = (str(torch.device(device)), None if backbone is None else str(backbone))
        if key not in self._lpips:
            self._lpips[key] = lpips_features(self.pool, device=device, backbone=backbone)
        return self._lpips[key]

    def describe(self) -> dict[str, Any]:
        """What the result records about this reference: its size and pool size."""
        return {"reference_size": self.size, "identification_pool": int(self.pool.shape[0])}


def _pixel_distances(rec: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """D[i, j] = mean squared pixel difference of ``rec[i]`` and ``candidates[j]`` (float64)."""
    r = rec.reshape(rec.shape[0], -1).to(torch.float64)
    c = candidates.reshape(candidates.shape[0], -1).to(torch.float64)
    return torch.cdist(r, c).square() / r.shape[1]


def identification_ranks(distances: torch.Tensor) -> list[int]:
    """Per true image ``i``, its rank among the candidates by distance to its matched
    reconstruction: 1 + the number of candidates strictly nearer.

    ``distances`` is (B, B + P), row ``i`` the distances of reconstruction ``i`` (matched to true
    image ``i``): columns 0..B-1 are the batch's true images, the rest the pool.
    A candidate at the very same distance as the truth (a duplicate of it) does not push it down.

    Example:
        >>> d = torch.tensor([[0.0, 0.5, 0.2], [0.3, 0.1, 0.05]])
        >>> identification_ranks(d)
        [1, 2]
    """
    n = distances.shape[0]
    own = distances[torch.arange(n), torch.arange(n)].unsqueeze(1)
    return [int(v) + 1 for v in (distances < own).sum(dim=1).tolist()]


def pixel_ranks(ordered_rec: torch.Tensor, truth: torch.Tensor, ref: Reference) -> list[int]:
    """:func:`identification_ranks` in pixel space (mean squared difference) against the batch's
    true images and ``ref``'s pool; images (B, C, H, W) in [0, 1]."""
    candidates = torch.cat([truth.to(torch.float64), ref.pool.to(torch.float64)])
    return identification_ranks(_pixel_distances(ordered_rec, candidates))

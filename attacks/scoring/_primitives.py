"""Numeric primitives of the metric protocol: PSNR and SSIM of HWC float64 arrays in [0, 1].

Private: :mod:`attacks.scoring.metrics` is the public surface, :mod:`attacks.scoring.table` the
per-image metrics built on these.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import structural_similarity

PSNR_CAP = 100.0
"""PSNR (dB) reported for identical images and the upper bound of every PSNR (never ``inf``)."""

SSIM_WIN_SIZE = 7
"""SSIM uniform window side (px); smaller images use the largest odd side that fits."""


def psnr_array(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB, data range 1) of two equally shaped arrays in [0, 1], capped at PSNR_CAP."""
    mse = float(np.mean((a - b) ** 2))
    if mse <= 0.0:
        return PSNR_CAP
    return min(10.0 * math.log10(1.0 / mse), PSNR_CAP)


def ssim_window(height: int, width: int) -> int:
    """Return the SSIM window side: 7, or the largest odd side <= min(H, W) for small images."""
    side = min(height, width)
    if side >= SSIM_WIN_SIZE:
        return SSIM_WIN_SIZE
    win = side if side % 2 == 1 else side - 1
    if win < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 px, got {height}x{width}")
    return win


def ssim_array(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two HWC float64 arrays in [0, 1] (the protocol of :mod:`attacks.scoring.metrics`)."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} and {b.shape}")
    win = ssim_window(a.shape[0], a.shape[1])
    # skimage ships py.typed, but its structural_similarity has no annotations
    if a.shape[2] == 1:
        value = structural_similarity(  # type: ignore[no-untyped-call]  # no hints in skimage
            a[..., 0], b[..., 0], data_range=1.0, win_size=win
        )
    else:
        value = structural_similarity(  # type: ignore[no-untyped-call]  # no hints in skimage
            a, b, data_range=1.0, win_size=win, channel_axis=-1
        )
    return float(value)


def flat_psnrs(truth: torch.Tensor, channels: np.ndarray) -> list[float]:
    """Per image of a clamped (B, C, H, W) float64 truth batch, the PSNR of the flat image with
    per-channel values ``channels`` (clamped to [0, 1])."""
    truth_np = truth.permute(0, 2, 3, 1).numpy()
    flat = np.broadcast_to(channels, truth_np.shape[1:])
    return [psnr_array(flat, truth_np[i]) for i in range(truth_np.shape[0])]

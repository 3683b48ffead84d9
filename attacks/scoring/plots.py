"""Figures of reconstructions for MLflow artifacts and HTML reports (matplotlib, Agg, PNG)."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from attacks.scoring.metrics import psnr as _psnr

__all__ = ["save_pair_grid"]

_MAX_COLUMNS = 8
_TITLE_POINTS = 10


def wrap_title(title: str, width_inches: float, points: int = _TITLE_POINTS) -> list[str]:
    """``title`` in lines that fit a figure ``width_inches`` wide at ``points`` (an average
    character ~0.6 em), broken at spaces and hyphens, never inside a word (a word wider than
    the figure gets a line of its own; :func:`save_pair_grid` widens the figure to fit it).

    Example:
        >>> wrap_title("inverting_gradients, round 0, client 3", 2.0)
        ['inverting_gradients,', 'round 0, client 3']
    """
    chars = max(8, int(width_inches * 72 / (0.6 * points)))
    return textwrap.wrap(title, chars, break_long_words=False) or [title]


def _to_hwc(images: Any, name: str) -> np.ndarray:
    """Return a (B, C, H, W) batch in [0, 1] as a clamped (B, H, W, C) float array for imshow."""
    x = torch.as_tensor(images).detach().to("cpu", torch.float64)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be (B, C, H, W) with C in (1, 3), got {tuple(x.shape)}")
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    return x.permute(0, 2, 3, 1).numpy()


def _psnr_values(
    truth: np.ndarray, rec: np.ndarray, n: int, psnr: Sequence[float] | None
) -> list[float]:
    """The first ``n`` PSNRs: ``psnr`` when given, else computed on the shown pairs."""
    if psnr is not None:
        return [float(v) for v in psnr[:n]]
    return [
        _psnr(
            torch.from_numpy(rec[i]).permute(2, 0, 1), torch.from_numpy(truth[i]).permute(2, 0, 1)
        )
        for i in range(n)
    ]


def save_pair_grid(
    truth_images: Any | None,
    rec_images: Any,
    path: str | os.PathLike[str],
    *,
    psnr: Sequence[float] | None = None,
    title: str | None = None,
    max_images: int = 16,
) -> Path:
    """Save a PNG with ground truth above its reconstruction, for the first ``max_images`` pairs.

    Both batches are (B, C, H, W) in [0, 1] (grey or RGB, clamped for display) and must already be
    in matched order (e.g. reordered by ``score()["assignment"]``). At most 8 pairs per row; more
    images wrap into further truth/reconstruction row pairs. Under each reconstruction its PSNR is
    printed: the values of ``psnr`` when given (one per image), else computed here with
    :func:`attacks.scoring.metrics.psnr` on the shown pair. With ``truth_images=None`` only the
    reconstructions are drawn (``psnr`` is then required): what ``log_images: reconstructions``
    stores, keeping the private originals out of tracking. Parent folders are created. Returns
    the path.
    """
    rec = _to_hwc(rec_images, "rec_images")
    show_truth = truth_images is not None
    if not show_truth and psnr is None:
        raise ValueError("psnr values are required when truth_images is None")
    truth = _to_hwc(truth_images, "truth_images") if show_truth else rec
    if truth.shape != rec.shape:
        raise ValueError(f"truth {truth.shape} and reconstruction {rec.shape} differ in shape")
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if psnr is not None and len(psnr) != truth.shape[0]:
        raise ValueError(f"got {len(psnr)} PSNR values for {truth.shape[0]} images")
    n = min(truth.shape[0], max_images)
    values = _psnr_values(truth, rec, n, psnr)

    cols = min(n, _MAX_COLUMNS)
    pairs = math.ceil(n / cols)
    per = 2 if show_truth else 1
    longest = max((len(word) for word in (title or "").split()), default=0)
    width = max(1.4 * cols + 0.6, (longest + 2) * 0.6 * _TITLE_POINTS / 72)
    lines = wrap_title(title, width) if title else []
    fig = Figure(figsize=(width, 1.45 * per * pairs + 0.2 + 0.18 * len(lines)), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(per * pairs, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_axis_off()
    grey = truth.shape[-1] == 1
    for i in range(n):
        row, col = per * (i // cols), i % cols
        panels = [(axes[row, col], truth[i])] if show_truth else []
        panels.append((axes[row + per - 1, col], rec[i]))
        for ax, img in panels:
            ax.set_axis_on()
            for spine in ax.spines.values():
                spine.set_visible(False)
            if grey:
                ax.imshow(img[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
        axes[row + per - 1, col].set_xlabel(f"{values[i]:.1f} dB", fontsize=8)
        if col == 0:
            if show_truth:
                axes[row, col].set_ylabel("truth", fontsize=8)
            axes[row + per - 1, col].set_ylabel("recon", fontsize=8)
    if lines:
        fig.suptitle("\n".join(lines), fontsize=_TITLE_POINTS)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out

"""Input normalisation shared by clients, the server and attacks.

Images travel through Obscura in [0, 1]; the model sees ``(x - mean) / std`` per channel. The
observation records ``mean`` and ``std`` so that attacks can work in the model's input space and
return reconstructions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _stats(values: Sequence[float], channels: int, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(list(values), dtype=like.dtype, device=like.device)
    if t.numel() == 1 and channels > 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(
            f"normalisation has {t.numel()} values but the images have {channels} channels"
        )
    return t.view(1, channels, 1, 1)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Map images in [0, 1] of shape (B, C, H, W) to the model's input space."""
    c = images.shape[1]
    return (images - _stats(mean, c, images)) / _stats(std, c, images)


def denormalize(inputs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Map model inputs back to images in [0, 1] (not clamped: callers clamp when scoring)."""
    c = inputs.shape[1]
    return inputs * _stats(std, c, inputs) + _stats(mean, c, inputs)

"""Choosing the torch device a run uses."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return the device to run on.

    ``"auto"`` (or ``None``) picks ``cuda`` -- the first GPU *visible* to this process, so
    ``CUDA_VISIBLE_DEVICES`` and Ray's GPU assignment are respected -- when CUDA is available,
    otherwise the CPU. Any explicit value (``"cpu"``, ``"cuda"``, ``"cuda:1"``) overrides; asking
    for CUDA on a machine without it is an error that says so rather than a late crash.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} was requested but CUDA is not available in this process; "
            "use device='auto' or 'cpu'"
        )
    return resolved

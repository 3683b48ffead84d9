"""What an attack returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attacks.scoring.metrics import FLAT_VALUE


@dataclass
class Reconstruction:
    """An attack's reconstruction of one client step's private batch.

    Attributes:
        images: reconstructed images in [0, 1], shape (B, C, H, W), on the CPU.
        labels: reconstructed (or given) labels (B,), or None if the attack recovers none.
        attack: the registered attack name.
        loss: the attack's own final objective value of the chosen restart.
        iterations: optimiser iterations run for the chosen restart.
        seconds: wall time of the whole attack (all restarts).
        diverged: True when the optimisation hit NaN/inf and stopped early with what it had.
        restart_losses: the final objective of every restart (the lowest is chosen).
        label_source: "known", "inferred", "optimised" or "none".
        extras: attack-specific values (e.g. DLM's learned scale).
        flat_value: per-channel value in [0, 1] of the flat baseline image that scoring's
            ``psnr_gain`` is measured against: the observation's normalisation mean, or 0.5
            without normalisation (:func:`attacks.scoring.metrics.flat_value`). A public fact of the
            observation, not of the private batch.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    attack: str
    loss: float
    iterations: int
    seconds: float
    diverged: bool = False
    restart_losses: list[float] = field(default_factory=list)
    label_source: str = "none"
    extras: dict[str, float] = field(default_factory=dict)
    flat_value: tuple[float, ...] = (FLAT_VALUE,)

"""What an attack returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

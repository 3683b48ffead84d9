"""Magnitude pruning of the outgoing update (gradient compression / sparsification).

Zhu, Liu, Han, "Deep Leakage from Gradients", NeurIPS 2019, sec. 5 ("Gradient compression and
sparsification"); the DLM paper's sparsification defense (Zhao, Luo, Ding, CPAL 2024,
Zihao-Kevin/DLM ``defense.py: sparsification``); the Soteria code's "model compression" baseline
(jeremy313/Soteria ``GS_attack/reconstruct_image.py``, ``--defense=prune --pruning_rate=60``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from defenses.base import Defense, DefenseParams, ParamSpec, register_defense
from fl.simulation.hooks import ClientContext

__all__ = ["Prune", "PruneParams", "percentile", "prune_tensor"]


def percentile(values: torch.Tensor, percent: float) -> torch.Tensor:
    """The ``percent``-th percentile of ``values`` with linear interpolation between order
    statistics (``numpy.percentile``'s default, which the Soteria code uses): position
    ``p/100 * (n - 1)`` in the sorted values. Unlike :func:`torch.quantile` it has no size limit.
    """
    if not 0 <= percent <= 100:
        raise ValueError(f"percent must be in [0, 100]; got {percent}")
    flat = values.detach().flatten()
    if flat.numel() == 0:
        raise ValueError("percentile of an empty tensor")
    ordered = torch.sort(flat).values
    pos = percent / 100 * (flat.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, flat.numel() - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def prune_tensor(value: torch.Tensor, percent: float) -> torch.Tensor:
    """``value`` with the entries whose magnitude is below the ``percent``-th percentile of
    ``|value|`` set to zero (``np.where(abs(g) < thresh, 0, g)`` of the Soteria code)."""
    thresh = percentile(value.abs(), percent)
    return torch.where(value.abs() < thresh, torch.zeros_like(value), value)


class PruneParams(DefenseParams):
    """Pruning rate in percent; default 60 as in the Soteria code's pruning baseline."""

    percent: float = Field(
        60.0, ge=0, le=100, description="Percentile of |u| below which entries are zeroed."
    )


@register_defense("prune")
class Prune(Defense[PruneParams]):
    """Per-tensor magnitude pruning of the update (DLG, Zhu et al., NeurIPS 2019, sec. 5; DLM,
    Zhao et al., CPAL 2024).

    :meth:`process_update` zeroes, in each tensor separately, the entries whose magnitude lies
    below that tensor's ``percent``-th percentile of magnitudes (linear interpolation, as
    ``np.percentile`` in the Soteria code), so about ``percent`` % of every tensor is zero (more
    when magnitudes tie) and the largest entries are kept unchanged. FedSGD: the gradient is
    pruned (the DLG/Soteria setting). FedAvg: the weight change ``W_new - W_global`` is pruned
    and the server receives ``W_global + pruned change``. The DLM code prunes the transmitted
    weights before and after the local step instead; pruning the change is what a
    communication-sparsifying client sends and what reaches the server, since it knows
    ``W_global``.
    """

    concurrent_clients: ClassVar[bool] = True  # stateless

    Params = PruneParams
    search_space: ClassVar[dict[str, ParamSpec]] = {
        "percent": ParamSpec(type="float", low=10.0, high=99.0),
    }

    def process_update(
        self, update: dict[str, torch.Tensor], ctx: ClientContext
    ) -> dict[str, torch.Tensor]:
        """Prune every tensor of ``update`` by its own magnitude percentile."""
        p = self.params
        return {name: prune_tensor(value, p.percent) for name, value in update.items()}

"""The server's aggregation rule as a pure function (in the style of Flower's ``aggregate.py``).

:func:`aggregate` is FedAvg's weighted mean of the clients' state dicts; the simulator applies
its result to the global model (FedSGD steps along the mean gradient, FedAvg moves towards the
mean weights, at the server's learning rate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch


@torch.no_grad()
def aggregate(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The weighted mean of the clients' ``updates`` (state dicts with the same keys), with
    ``weights`` (e.g. each client's number of examples) normalised to sum to one.

    Floating-point tensors are averaged in their own dtype, client by client in order; integer
    tensors (BatchNorm's ``num_batches_tracked``) take the clients' largest value. The keys are
    those of the first update; the inputs are not modified.

    >>> a, b = {"w": torch.tensor([0.0, 4.0])}, {"w": torch.tensor([4.0, 8.0])}
    >>> aggregate([a, b], [1, 3])["w"]
    tensor([3., 7.])
    """
    if len(updates) == 0:
        raise ValueError("aggregate() needs at least one client update; got none")
    if len(weights) != len(updates):
        raise ValueError(
            f"aggregate() needs one weight per update; got {len(weights)} weights for "
            f"{len(updates)} updates"
        )
    raw = torch.tensor(list(weights), dtype=torch.float64)
    if bool((raw < 0).any()) or not float(raw.sum()) > 0:
        raise ValueError(
            f"aggregate() needs non-negative weights with a positive sum; got {weights}"
        )
    share: list[float] = (raw / raw.sum()).tolist()
    out: dict[str, torch.Tensor] = {}
    for name, first in updates[0].items():
        if first.is_floating_point():
            # sum() from 0, client by client, in the tensor's dtype (a Python float times a tensor)
            mean = sum(w * u[name] for w, u in zip(share, updates, strict=True))
            out[name] = cast(torch.Tensor, mean)
        else:
            out[name] = torch.stack([u[name] for u in updates]).amax(0)
    return out

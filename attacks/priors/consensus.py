"""Registering and averaging several reconstructions of one batch: GradInversion's group
consensus (Yin et al., CVPR 2021, sec. 3.4), used by its group consistency and by
``restart_average`` (the mean of an attack's restarts)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def registration(
    reference: torch.Tensor,
    images: torch.Tensor,
    reference_labels: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> list[int]:
    """The order of ``images`` that puts each on the ``reference`` image it matches: a
    Hungarian assignment on squared distance (a batch's order is arbitrary; RANSAC-flow's
    spatial registration is left out, docs/batchnorm.md). With both label tensors, images of a
    different label are only paired where no same-label pairing is left.

    Example:
        >>> a = torch.eye(3).view(3, 1, 1, 3)
        >>> registration(a, a[[2, 0, 1]])
        [1, 2, 0]
    """
    ref = reference.detach().flatten(1).cpu().double()
    cost = torch.cdist(ref, images.detach().flatten(1).cpu().double()).pow(2)
    if reference_labels is not None and labels is not None:
        differ = reference_labels.view(-1, 1).cpu() != labels.view(1, -1).cpu()
        cost = cost + differ.double() * (1.0 + float(cost.max()) * cost.shape[0])
    _, cols = linear_sum_assignment(np.asarray(cost.numpy(), dtype=np.float64))
    return [int(c) for c in cols]


def registered_mean(
    members: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor | None] | None = None,
    reference: int = 0,
) -> torch.Tensor:
    """The mean of several reconstructions of one batch, each first put in the order of
    ``members[reference]`` by :func:`registration` (with its labels, when given).

    Raises:
        ValueError: no members, or members of different shapes.
    """
    if not members:
        raise ValueError("registered_mean needs at least one member")
    ref = members[reference]
    if any(m.shape != ref.shape for m in members):
        raise ValueError(f"members of different shapes: {[tuple(m.shape) for m in members]}")
    tags = list(labels) if labels is not None else [None] * len(members)
    aligned = [m[registration(ref, m, tags[reference], tags[g])] for g, m in enumerate(members)]
    return torch.stack(aligned).mean(dim=0)

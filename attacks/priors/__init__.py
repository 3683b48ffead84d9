"""Priors of gradient inversion: what an attack knows of natural images or of the private batch
beyond the matched message, as penalties on the dummy batch.

- :mod:`attacks.priors.bn_stats`: the BatchNorm statistics of the private batch, read from the
  returned running buffers (and the sent model's running statistics);
- :mod:`attacks.priors.bn_prior`: DeepInversion's BatchNorm-statistics prior toward them, and the
  projection of the first layer's channel means;
- :mod:`attacks.priors.features`: the feature prior (the classifier input the last layer's
  gradient reveals);
- :mod:`attacks.priors.consensus`: registering and averaging several reconstructions of one
  batch (group consistency, ``restart_average``).

The penalties computed from the forwards an attack runs anyway follow :class:`Prior`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Prior(Protocol):
    """A penalty on the dummy batch read off the model's forwards: the attack runs its matching
    forwards inside :meth:`recording`, then adds :meth:`loss` to its objective. An inactive
    prior (weight 0) records nothing and its loss is ``0.0``."""

    def recording(self) -> AbstractContextManager[object]:
        """Record what the prior needs from the forwards run in the block."""
        ...

    def loss(self) -> torch.Tensor | float:
        """The weighted penalty of the last recorded forwards (``0.0`` when inactive)."""
        ...


def recording(priors: Sequence[Prior]) -> ExitStack:
    """One context in which every prior of ``priors`` records (entered in order)."""
    stack = ExitStack()
    for prior in priors:
        stack.enter_context(prior.recording())
    return stack


def with_priors(loss: torch.Tensor, priors: Sequence[Prior]) -> torch.Tensor:
    """``loss`` plus each prior's penalty, added one after another in order (the float sum of
    ``loss + p_1 + p_2 + ...``, left to right)."""
    for prior in priors:
        loss = loss + prior.loss()
    return loss

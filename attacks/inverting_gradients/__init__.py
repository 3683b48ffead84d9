"""Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020).

- :mod:`attacks.inverting_gradients.params`: its parameters and the ``batch_victims`` option;
- :mod:`attacks.inverting_gradients.attack`: the attack (registered as ``inverting_gradients``)
  and :func:`batching_obstacle`;
- :mod:`attacks.inverting_gradients.batched`: several victims in one ``vmap`` optimisation.
"""

from attacks.inverting_gradients.attack import InvertingGradients, batching_obstacle
from attacks.inverting_gradients.params import (
    BATCH_VICTIMS_DESCRIPTION,
    BatchVictims,
    InvertingGradientsParams,
    batch_victims,
)

__all__ = [
    "BATCH_VICTIMS_DESCRIPTION",
    "BatchVictims",
    "InvertingGradients",
    "InvertingGradientsParams",
    "batch_victims",
    "batching_obstacle",
]

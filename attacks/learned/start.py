"""``init: learned``: gradient matching that starts from a learned attack's reconstruction.

An inverter (:mod:`attacks.learned.trained`) trained on public data at the attacked round's
weights gives the start; the optimisation (Inverting Gradients, GradInversion) then refines it,
optionally pulled toward it (``learned_pull``). One inverter per round and attack instance.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

import torch

from attacks.learned.params import LearnedStartParams
from attacks.learned.trained import InverterCache
from attacks.public import AttackerResources
from fl.simulation.normalization import normalize
from fl.simulation.observation import Observation

_CACHES: WeakKeyDictionary[Any, InverterCache] = WeakKeyDictionary()


def learned_start(
    owner: Any,
    obs: Observation,
    resources: AttackerResources,
    params: LearnedStartParams,
    seed: int,
) -> torch.Tensor:
    """The learned reconstruction of ``obs``'s batch in the model's input space (normalised),
    from an inverter cached per ``owner`` (the attack instance) and round.

    Raises:
        ThreatModelError: no public data, or a model the encoding cannot read.
    """
    cache = _CACHES.setdefault(owner, InverterCache())
    trained, _ = cache.get(obs, resources, params, params.encoding, seed)
    images = trained.invert(obs).to(obs.device)
    return normalize(images, obs.mean, obs.std)


def pull_toward(
    x: torch.Tensor, anchor: torch.Tensor | None, weight: float
) -> torch.Tensor | float:
    """``weight`` times the mean squared distance of the dummy ``x`` to the learned start
    (0 without one)."""
    if anchor is None or weight <= 0:
        return 0.0
    return weight * (x - anchor).pow(2).mean()

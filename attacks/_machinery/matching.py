"""What gradient-matching attacks differentiate: the dummy batch's gradient (FedSGD) or its
unrolled local update (FedAvg)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import functional_call

from attacks._machinery.convolution import inversion_convolutions
from attacks._machinery.objectives import dummy_gradients, soft_cross_entropy
from attacks._machinery.setup import InversionSetup
from fl.simulation.observation import Observation

Matched = Callable[[torch.Tensor], list[torch.Tensor]]
"""Dummy batch -> the quantity matched to the observed message, per matched parameter."""


def matching(
    obs: Observation, setup: InversionSetup, targets: Callable[[], torch.Tensor]
) -> Matched:
    """The dummy gradient for a gradient message; for a weights message the update of the
    client's local SGD unrolled with its known learning rate, steps and batch size (Geiping et
    al. 2020, FedAvg variant)."""
    if obs.kind == "gradient":
        return lambda x: list(dummy_gradients(setup.model, setup.params, x, targets()))
    if obs.lr is None or obs.local_steps is None:
        raise ValueError("an unrolled FedAvg update needs the client's lr and local steps")
    lr, steps = obs.lr, obs.local_steps
    batch = obs.batch_size or setup.shape[0]
    return lambda x: unrolled_update(setup, x, targets(), lr, steps, batch)


def unrolled_update(
    setup: InversionSetup,
    x: torch.Tensor,
    targets: torch.Tensor,
    lr: float,
    steps: int,
    batch_size: int,
) -> list[torch.Tensor]:
    """The update ``W_0 - W_K`` of ``steps`` differentiable SGD steps with ``lr`` on the dummy
    batch, in mini-batches of ``batch_size`` taken in order (inversefed's FedAvg loss)."""
    names = setup.names
    current = dict(zip(names, setup.params, strict=True))
    n = x.shape[0]
    start = 0
    for _ in range(steps):
        idx = slice(start, min(start + batch_size, n))
        start = 0 if idx.stop >= n else idx.stop
        with inversion_convolutions(setup.model):  # bit-identical, leaner double backward
            logits = functional_call(setup.model, current, (x[idx],))
        loss = soft_cross_entropy(logits, targets[idx])
        extra = getattr(setup.model, "auxiliary_loss", None)
        if callable(extra):
            term = extra()
            if term is not None:
                loss = loss + term
        grads = torch.autograd.grad(loss, list(current.values()), create_graph=True)
        current = {k: w - lr * g for (k, w), g in zip(current.items(), grads, strict=True)}
    return [w0 - current[k] for k, w0 in zip(names, setup.params, strict=True)]

"""Gradient-inversion attacks on FedSGD messages: DLG and iDLG, and the unrolled FedAvg update
that gradient matching on weights messages differentiates through."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.func import functional_call

from attacks.base import Attack, AttackParams, Attempt, register_attack
from attacks.convolution import inversion_convolutions
from attacks.label_modes import LabelMode, plan_labels
from attacks.objectives import dummy_gradients, l2_distance, soft_cross_entropy
from attacks.optim import run_lbfgs
from attacks.setup import InversionSetup
from attacks.threat import Requirements
from fl.simulation.observation import Observation


class DLGParams(AttackParams):
    """DLG defaults from mit-han-lab/dlg: 300 L-BFGS steps, lr 1, 20 evaluations per step."""

    iterations: int = Field(300, ge=1)
    lr: float = Field(1.0, gt=0)
    max_iter: int = Field(20, ge=1, description="L-BFGS function evaluations per step.")
    labels: LabelMode = "auto"
    init: Literal["randn", "rand", "grey", "mean"] = "randn"
    tolerance: float | None = Field(None, ge=0, description="Stop when the loss falls below.")
    ignore_layers: list[str] = Field(
        default_factory=list,
        description="Parameter-name prefixes left out of the matching (defense-aware attack, "
        "e.g. ['bottleneck', 'classifier'] against PRECODE).",
    )


@register_attack("dlg")
class DLG(Attack[DLGParams]):
    """Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019).

    Dummy data x' ~ N(0, 1) and dummy logits y' ~ N(0, 1) are optimised jointly with L-BFGS to
    minimise sum_l ||grad_W l(F(x'), softmax(y')) - g_l||^2 (eq. 4 of the paper). With
    ``labels='known'`` (or 'auto' and labels granted) only x' is optimised.
    """

    Params = DLGParams
    requirements = Requirements(kinds=("gradient",))
    default_labels: Literal["infer", "soft"] = "soft"

    def attempt(self, obs: Observation, generator: torch.Generator, restart: int) -> Attempt:
        p = self.params
        setup = InversionSetup.from_observation(obs, ignore=p.ignore_layers)
        x = setup.dummy(generator, p.init)
        plan = plan_labels(p.labels, self.default_labels, obs, setup, generator)

        def objective() -> torch.Tensor:
            grads = dummy_gradients(setup.model, setup.params, x, plan.targets())
            return l2_distance(grads, setup.target)

        loss, steps, diverged = run_lbfgs(
            [x, *plan.variables],
            objective,
            iterations=p.iterations,
            lr=p.lr,
            max_iter=p.max_iter,
            tolerance=p.tolerance,
        )
        return Attempt(x.detach(), plan.final_labels(), loss, steps, diverged, plan.source)


class IDLGParams(DLGParams):
    """iDLG defaults from PatrickZH/Improved-Deep-Leakage-from-Gradients: as DLG, labels
    inferred, stop when the loss falls below 1e-6."""

    labels: LabelMode = "auto"
    tolerance: float | None = Field(1e-6, ge=0)


@register_attack("idlg")
class IDLG(DLG):
    """Improved DLG (Zhao, Mopuri, Bilen 2020).

    The label of a single image is read from the sign of the last layer's weight gradient
    (``argmin_i sum_j dL/dW[i, j]``), then DLG runs on the image alone. For a batch, the labels
    come from the count rule of :func:`attacks.labels.batch_labels` (an extension; the paper
    treats single images).
    """

    Params = IDLGParams
    default_labels = "infer"


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

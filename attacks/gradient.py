"""Gradient-inversion attacks on FedSGD messages: DLG and iDLG."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from attacks._machinery.objectives import dummy_gradients, l2_distance
from attacks._machinery.optim import run_lbfgs
from attacks._machinery.setup import INIT_DESCRIPTION, DummyInit, InversionSetup
from attacks.base import Attack, AttackParams, Attempt, register_attack
from attacks.labels.plans import LabelMode, labels_description, plan_labels
from fl.simulation.observation import Observation


class DLGParams(AttackParams):
    """DLG defaults from mit-han-lab/dlg: 300 L-BFGS steps, lr 1, 20 evaluations per step."""

    iterations: int = Field(300, ge=1, description="L-BFGS steps per restart.")
    lr: float = Field(1.0, gt=0, description="L-BFGS step size.")
    max_iter: int = Field(20, ge=1, description="L-BFGS function evaluations per step.")
    labels: LabelMode = Field("auto", description=labels_description("soft"))
    init: DummyInit = Field("randn", description=INIT_DESCRIPTION)
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

    labels: LabelMode = Field("auto", description=labels_description("infer"))
    tolerance: float | None = Field(
        1e-6, ge=0, description="Stop when the loss falls below (iDLG: 1e-6)."
    )


@register_attack("idlg")
class IDLG(DLG):
    """Improved DLG (Zhao, Mopuri, Bilen 2020).

    The label of a single image is read from the sign of the last layer's weight gradient
    (``argmin_i sum_j dL/dW[i, j]``), then DLG runs on the image alone. For a batch, the labels
    come from the count rule of :func:`attacks.labels.inference.batch_labels` (an extension; the
    paper treats single images).
    """

    Params = IDLGParams
    default_labels = "infer"

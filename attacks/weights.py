"""Weight-inversion attacks on FedAvg messages: DLM and DLM+ (Zhao, Luo, Ding, CPAL 2024)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field

from attacks._machinery.objectives import dummy_gradients, normalized_l2_distance, tensor_sum
from attacks._machinery.optim import run_adam, run_lbfgs
from attacks._machinery.setup import INIT_DESCRIPTION, DummyInit, InversionSetup
from attacks.base import Attack, AttackParams, Attempt, register_attack
from attacks.labels.plans import LabelMode, labels_description, plan_labels
from attacks.threat import Requirements
from fl.simulation.observation import MessageKind, Observation


class DLMParams(AttackParams):
    """DLM defaults from Zihao-Kevin/DLM (LeNet setting): L-BFGS lr 1 for 200 steps, scale k
    initialised at 200, soft labels unless granted."""

    iterations: int = Field(200, ge=1, description="Optimiser steps per restart.")
    lr: float = Field(1.0, gt=0, description="Step size of the optimiser.")
    optimizer: Literal["lbfgs", "adam"] = Field(
        "lbfgs", description="'lbfgs' (the paper's) or 'adam' (DLM on an MLP: lr 0.1)."
    )
    max_iter: int = Field(20, ge=1, description="L-BFGS evaluations per step.")
    scale_init: float = Field(200.0, gt=0, description="Initial k (stands for 1/lr).")
    labels: LabelMode = Field("auto", description=labels_description("soft"))
    init: DummyInit = Field("randn", description=INIT_DESCRIPTION)
    ignore_layers: list[str] = Field(
        default_factory=list,
        description="Parameter-name prefixes left out of the matching (defense-aware attack).",
    )


def _optimise(
    p: DLMParams, variables: list[torch.Tensor], objective: Callable[[], torch.Tensor]
) -> tuple[float, int, bool]:
    if p.optimizer == "lbfgs":
        return run_lbfgs(
            variables, objective, iterations=p.iterations, lr=p.lr, max_iter=p.max_iter
        )
    return run_adam(variables, objective, iterations=p.iterations, lr=p.lr)


@register_attack("dlm")
class DLM(Attack[DLMParams]):
    """Deep Leakage from Model: the server sees W_t and W_{t+1} only, the client's learning rate
    is unknown. A learnable scalar k (about 1/lr) lets the dummy gradient match the update:
    minimise sum_l ||grad_{W_l} l(F(x'), softmax(y')) - k * dW_l||^2 over x', y', k.
    """

    Params = DLMParams

    def requirements(self, kind: MessageKind | None = None) -> Requirements:
        """FedAvg weights; nothing granted (the learning rate and step count stay unknown)."""
        return Requirements(kinds=("weights",))

    def attempt(self, obs: Observation, generator: torch.Generator, restart: int) -> Attempt:
        p = self.params
        setup = InversionSetup.from_observation(obs, ignore=p.ignore_layers)
        x = setup.dummy(generator, p.init)
        plan = plan_labels(p.labels, "soft", obs, setup, generator)
        k = torch.tensor(p.scale_init, device=x.device, requires_grad=True)

        def objective() -> torch.Tensor:
            grads = dummy_gradients(setup.model, setup.params, x, plan.targets())
            return tensor_sum(
                ((g - k * t) ** 2).sum() for g, t in zip(grads, setup.target, strict=True)
            )

        loss, steps, diverged = _optimise(p, [x, *plan.variables, k], objective)
        return Attempt(
            x.detach(),
            plan.final_labels(),
            loss,
            steps,
            diverged,
            plan.source,
            extras={"scale": float(k.detach())},
        )


class DLMPlusParams(DLMParams):
    """DLM+ defaults: as DLM, without the scale."""


@register_attack("dlm_plus")
class DLMPlus(Attack[DLMPlusParams]):
    """DLM+: scale-free matching of the normalised dummy gradient to the normalised update,
    ``sum_l ||g'_l / n(g') - dW_l / n(dW)||^2`` with n the mean per-tensor L2 norm, so neither the
    learning rate nor the number of local steps needs to be known. Labels granted, soft
    (optimised jointly, the default), or inferred from the last layer's update."""

    Params = DLMPlusParams

    def requirements(self, kind: MessageKind | None = None) -> Requirements:
        """FedAvg weights; nothing granted (the learning rate and step count stay unknown)."""
        return Requirements(kinds=("weights",))

    def attempt(self, obs: Observation, generator: torch.Generator, restart: int) -> Attempt:
        p = self.params
        setup = InversionSetup.from_observation(obs, ignore=p.ignore_layers)
        x = setup.dummy(generator, p.init)
        plan = plan_labels(p.labels, "soft", obs, setup, generator)

        def objective() -> torch.Tensor:
            grads = dummy_gradients(setup.model, setup.params, x, plan.targets())
            return normalized_l2_distance(grads, setup.target)

        loss, steps, diverged = _optimise(p, [x, *plan.variables], objective)
        return Attempt(x.detach(), plan.final_labels(), loss, steps, diverged, plan.source)

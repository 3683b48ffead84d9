"""See through Gradients / GradInversion (Yin, Mallya, Vahdat, Alvarez, Kautz, Molchanov, CVPR
2021): gradient matching with a BatchNorm-statistics prior and group consistency.

Defaults follow the paper and breaching's ``config/attack/seethroughgradients.yaml``; where we
deviate (group registration by assignment, not RANSAC-flow) docs/batchnorm.md says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from attacks._machinery.matching import Matched, matching
from attacks._machinery.objectives import (
    cosine_distance,
    l2_distance,
    tensor_sum,
    total_variation,
)
from attacks._machinery.optim import run_langevin_adam
from attacks._machinery.setup import START_INIT_DESCRIPTION, InversionSetup, StartInit
from attacks.base import Attack, AttackParams, Attempt, register_attack
from attacks.labels.plans import LabelMode, labels_description, plan_labels
from attacks.learned.params import LearnedPull, LearnedStart
from attacks.learned.start import learned_start, pull_toward
from attacks.priors import Prior, recording, with_priors
from attacks.priors.bn_prior import bn_prior, mean_projection, revealed_statistics
from attacks.priors.consensus import registration
from attacks.threat import Requirements
from fl.simulation.observation import MessageKind, Observation


class SeeThroughGradientsParams(AttackParams):
    """breaching's GradInversion config: 20,000 iterations of unsigned Adam (lr 0.1, warm-up
    50, cosine decay, Langevin noise 0.01), L2 gradient matching x 1e-4, TV 1e-4, L2 norm
    1e-6, BatchNorm prior 0.1 with the first layer x 10, boxed images."""

    iterations: int = Field(20_000, ge=1, description="Adam iterations per restart.")
    lr: float = Field(0.1, gt=0, description="Adam step size (peak, after the warm-up).")
    objective: Literal["l2", "cosine"] = Field(
        "l2", description="Gradient distance: squared L2 as in the paper, or IG's cosine."
    )
    gradient_scale: float = Field(
        1e-4, gt=0, description="Weight of the gradient distance (breaching: 1e-4 for L2)."
    )
    tv: float = Field(1e-4, ge=0, description="Weight of the total-variation prior.")
    l2: float = Field(1e-6, ge=0, description="Weight of the image L2 norm ||x||^2 / 2 (mean).")
    bn_prior: float = Field(
        0.1, gt=0, description="Weight of the BatchNorm-statistics prior (requires knows_bn_stats)."
    )
    bn_first_multiplier: float = Field(
        10.0, ge=0, description="Multiplier of the first BatchNorm layer's term."
    )
    bn_distance: Literal["absolute", "relative"] = Field(
        "absolute",
        description="The BatchNorm prior's distance: 'absolute' (DeepInversion's norms of the "
        "differences) or 'relative' (each channel in units of the revealed statistics, so one "
        "weight fits every layer's and dataset's scale; an extension, docs/batchnorm.md).",
    )
    bn_project: bool = Field(
        False,
        description="After every step, shift each input channel so that the first BatchNorm "
        "layer's channel means are the revealed ones (our extension, docs/batchnorm.md).",
    )
    warmup: int = Field(50, ge=0, description="Linear learning-rate warm-up steps.")
    langevin: float = Field(0.01, ge=0, description="Langevin noise x lr added to the gradient.")
    signed: bool = Field(False, description="Adam on the gradient's sign (IG) instead.")
    group_size: int = Field(
        1,
        ge=1,
        description="Members optimised jointly with group consistency (paper sec. 3.4; each "
        "member costs one matching per iteration; 1: off, as in breaching).",
    )
    group: float = Field(0.01, ge=0, description="Weight of the pull toward the group consensus.")
    group_every: int = Field(100, ge=1, description="Iterations between consensus refreshes.")
    labels: LabelMode = Field("auto", description=labels_description("infer"))
    init: StartInit = Field("randn", description=START_INIT_DESCRIPTION)
    learned: LearnedStart
    learned_pull: LearnedPull = 0.0
    ignore_layers: list[str] = Field(
        default_factory=list, description="Parameter-name prefixes left out of the matching."
    )


@register_attack("see_through_gradients")
class SeeThroughGradients(Attack[SeeThroughGradientsParams]):
    """GradInversion (Yin et al., CVPR 2021).

    Minimises ``s * D(g(x'), g) + tv * TV(x') + l2 * ||x'||^2 + a * R_BN(x')`` with D the squared
    L2 (or cosine) gradient distance and R_BN DeepInversion's distance between the dummy batch's
    per-layer BatchNorm statistics and those the client's returned buffers reveal
    (:mod:`attacks.priors.bn_stats`). With ``group_size`` > 1 the members are optimised jointly and
    pulled toward their registered average (sec. 3.4); the best of the members and their
    consensus by the attack's own loss is returned. FedAvg: the local steps are unrolled as in
    Inverting Gradients' FedAvg variant and the statistics of every step are mixed as the
    buffers mix them.
    """

    Params = SeeThroughGradientsParams

    def requirements(self, kind: MessageKind | None = None) -> Requirements:
        """Gradients, or weights with the client's lr and local steps (its SGD is unrolled);
        always the BatchNorm statistics of the private batch."""
        needs = Requirements.unrolling(kind, bn_stats=True)
        if self.params.init == "learned":
            return needs.model_copy(update={"public_data": True, "batch_size": True})
        return needs

    def attempt(self, obs: Observation, generator: torch.Generator, restart: int) -> Attempt:
        p = self.params
        setup = InversionSetup.from_observation(obs, ignore=p.ignore_layers)
        start = None
        if p.init == "learned":
            start = learned_start(self, obs, self.resources, p.learned, p.seed)
        members = torch.stack(
            [setup.dummy(generator, p.init, start).detach() for _ in range(p.group_size)]
        )
        members.requires_grad_(True)
        plan = plan_labels(p.labels, "infer", obs, setup, generator)
        revealed = revealed_statistics(obs, True)
        prior = bn_prior(revealed, setup, p.bn_prior, p.bn_first_multiplier, p.bn_distance)
        member_loss = self._member_loss(setup, matching(obs, setup, plan.targets), prior)
        group = _Consensus(p.group_size)
        project = mean_projection(revealed, setup, members, p.bn_project)

        def objective() -> torch.Tensor:
            losses = [member_loss(members[g]) for g in range(p.group_size)]
            total = torch.stack(losses).sum() + p.group * group.pull(members)
            return total + pull_toward(members, start, p.learned_pull)

        def refresh(step: int) -> None:
            if p.group_size > 1 and p.group > 0 and step >= p.warmup and step % p.group_every == 0:
                group.update(members.detach())

        _, steps, diverged = run_langevin_adam(
            members,
            objective,
            iterations=p.iterations,
            lr=p.lr,
            generator=generator,
            warmup=p.warmup,
            noise=p.langevin,
            signed=p.signed,
            lower=setup.lower,
            upper=setup.upper,
            on_step=refresh,
            project=project,
        )
        best, loss = _choose(members.detach(), member_loss)
        return Attempt(best, plan.final_labels(), loss, steps, diverged, plan.source)

    def _member_loss(
        self, setup: InversionSetup, matched: Matched, prior: Prior
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """One member's loss: gradient distance, TV, image norm and BatchNorm prior."""
        p = self.params

        def loss(x: torch.Tensor) -> torch.Tensor:
            with recording([prior]):
                dummy = matched(x)
            if p.objective == "l2":
                value = p.gradient_scale * l2_distance(dummy, setup.target)
            else:
                value = p.gradient_scale * cosine_distance(dummy, setup.target)
            value = value + p.tv * total_variation(x) + p.l2 * 0.5 * x.pow(2).mean()
            return with_priors(value, [prior])

        return loss


class _Consensus:
    """Group consistency (GradInversion sec. 3.4): each member's images are put in the order
    of member 0's by a Hungarian assignment on MSE (a batch's order is arbitrary), averaged,
    and members are pulled toward that average by ``sum_g ||x_g - mean||_2``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.mean: torch.Tensor | None = None
        self.orders: list[list[int]] = []

    def update(self, members: torch.Tensor) -> None:
        """Register the members to member 0 and average them."""
        self.orders = [registration(members[0], members[g]) for g in range(self.size)]
        aligned = torch.stack([members[g][self.orders[g]] for g in range(self.size)])
        self.mean = aligned.mean(dim=0)

    def pull(self, members: torch.Tensor) -> torch.Tensor | float:
        """``sum_g ||x_g (registered) - mean||_2`` (0 before the first update)."""
        if self.mean is None:
            return 0.0
        return tensor_sum(
            torch.linalg.vector_norm(members[g][self.orders[g]] - self.mean)
            for g in range(self.size)
        )


def _choose(
    members: torch.Tensor, member_loss: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, float]:
    """The member (or, for a group, the registered average) with the lowest attack loss."""
    candidates = list(members)
    if members.shape[0] > 1:
        consensus = _Consensus(members.shape[0])
        consensus.update(members)
        assert consensus.mean is not None
        candidates.append(consensus.mean)
    with torch.enable_grad():
        losses = [float(member_loss(c.clone().requires_grad_(True)).detach()) for c in candidates]
    finite = [(v, i) for i, v in enumerate(losses) if np.isfinite(v)]
    value, index = min(finite) if finite else (float("nan"), 0)
    return candidates[index].detach(), value

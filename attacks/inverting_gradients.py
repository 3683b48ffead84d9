"""Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020): its parameters, its
attack, and when its victims can be reconstructed in one batched optimisation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator

from attacks.base import Attack, AttackParams, Attempt, register_attack
from attacks.batched import run_batched, victims_obstacle
from attacks.features import feature_prior
from attacks.label_modes import LabelMode, plan_labels
from attacks.matching import bn_prior, matching, mean_projection, revealed_statistics
from attacks.objectives import (
    cosine_distance,
    layer_weights,
    total_variation,
    weighted_sq_norm,
)
from attacks.optim import run_signed_adam
from attacks.reconstruction import Reconstruction
from attacks.setup import InversionSetup
from attacks.threat import AttackerCapabilities, Requirements
from fl.simulation.observation import Observation


class InvertingGradientsParams(AttackParams):
    """Defaults of inversefed's reconstruction config: 4,800 iterations, Adam lr 0.1 on signed
    gradients with step decay, TV 0.1, boxed images, N(0, 1) initialisation, one restart."""

    iterations: int = Field(4800, ge=1)
    lr: float = Field(0.1, gt=0)
    tv: float = Field(0.1, ge=0, description="Weight of the total-variation prior.")
    signed: bool = True
    decay: bool = True
    boxed: bool = True
    labels: LabelMode = "auto"
    init: Literal["randn", "rand", "grey", "mean"] = "randn"
    init_noise: float = Field(
        0.0,
        ge=0,
        description="Std of Gaussian noise (normalised pixel units) added to the initial dummy "
        "of every restart after the first (then boxed, if boxed), so that restarts from a "
        "fixed init ('mean', 'grey') differ; for restart_average (0: none).",
    )
    layer_weights: Literal["equal", "linear", "exp"] = "equal"
    layers: list[str] | None = Field(None, description="Only match these name prefixes.")
    ignore_layers: list[str] = Field(
        default_factory=list,
        description="Parameter-name prefixes left out of the matching (defense-aware attack).",
    )
    bn_prior: float = Field(
        0.0,
        ge=0,
        description="Weight of DeepInversion's BatchNorm-statistics term (Yin et al. 2021): "
        "the dummy batch's per-layer mean and variance matched to those the client's returned "
        "buffers reveal; > 0 requires knows_bn_stats (0: the plain attack).",
    )
    bn_first_multiplier: float = Field(
        10.0, ge=0, description="Multiplier of the first BatchNorm layer's term (GradInversion)."
    )
    bn_distance: Literal["absolute", "relative"] = Field(
        "absolute",
        description="The BatchNorm prior's distance: 'absolute' (DeepInversion's norms of the "
        "differences) or 'relative' (each channel in units of the revealed statistics, so one "
        "weight fits every layer's and dataset's scale; an extension, docs/batchnorm.md).",
    )
    feature_prior: float = Field(
        0.0,
        ge=0,
        description="Weight of the feature prior: the dummy's classifier input pulled toward the "
        "features the last layer's gradient reveals (dW_c / db_c; exact at batch 1, images "
        "with a label of their own at batch B; an extension, docs/batchnorm.md); 0: off.",
    )
    bn_project: bool = Field(
        False,
        description="After every step, shift each input channel so that the first BatchNorm "
        "layer's channel means are those the buffers reveal (an extension, docs/batchnorm.md); "
        "requires knows_bn_stats.",
    )

    @model_validator(mode="after")
    def _feature_prior_needs_fixed_labels(self) -> InvertingGradientsParams:
        if self.feature_prior > 0 and self.labels == "soft":
            raise ValueError(
                "feature_prior > 0 needs fixed labels: set labels to 'auto', 'known' or "
                "'infer', or feature_prior to 0"
            )
        return self


@register_attack("inverting_gradients")
class InvertingGradients(Attack[InvertingGradientsParams]):
    """Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020).

    Minimises ``1 - cos(g(x'), g) + tv * TV(x')`` with ONE cosine over all matched parameters
    (eq. 4), using Adam on the sign of the gradient, step decay by 0.1 at 3/8, 5/8 and 7/8 of
    the iterations, the image boxed to the valid range after every step, and restarts chosen by
    the attack's own final loss. Labels are granted or inferred (iDLG rule for one image, a count
    rule for several).

    FedAvg variant: for a weights message with known learning rate and local steps, the client's
    local SGD is unrolled differentiably (mini-batches of the known batch size, in order) and the
    simulated update ``W_t - W_K`` is matched to the observed one with the same cosine loss.
    """

    Params = InvertingGradientsParams
    requirements = Requirements(kinds=("gradient", "weights"))

    def needs_bn_stats(self) -> bool:
        return self.params.bn_prior > 0 or self.params.bn_project

    def requirements_for(self, obs: Observation) -> Requirements:
        bn = self.needs_bn_stats()
        if obs.kind == "weights":
            return Requirements(kinds=("weights",), lr=True, local_steps=True, bn_stats=bn)
        return Requirements(kinds=("gradient",), bn_stats=bn)

    def attempt(self, obs: Observation, generator: torch.Generator, restart: int) -> Attempt:
        p = self.params
        setup = InversionSetup.from_observation(obs, ignore=p.ignore_layers, include=p.layers)
        x = setup.dummy(generator, p.init)
        if restart > 0 and p.init_noise > 0:
            setup.perturb(x, generator, p.init_noise, p.boxed)
        plan = plan_labels(p.labels, "infer", obs, setup, generator)
        weights = layer_weights(p.layer_weights, len(setup.target), x.device)
        matched = matching(obs, setup, plan.targets)
        revealed = revealed_statistics(obs, self.needs_bn_stats())
        prior = bn_prior(revealed, setup, p.bn_prior, p.bn_first_multiplier, p.bn_distance)
        project = mean_projection(revealed, setup, x, p.bn_project)
        features = feature_prior(obs, setup.model, plan.fixed, p.feature_prior)
        target_sq_norm = weighted_sq_norm(setup.target, weights)

        def objective() -> torch.Tensor:
            with prior.recording(), features.recording():
                loss = cosine_distance(
                    matched(x), setup.target, weights, target_sq_norm=target_sq_norm
                )
            if p.tv > 0:
                loss = loss + p.tv * total_variation(x)
            return loss + prior.loss() + features.loss()

        loss, steps_run, diverged = run_signed_adam(
            x,
            objective,
            iterations=p.iterations,
            lr=p.lr,
            lower=setup.lower if p.boxed else None,
            upper=setup.upper if p.boxed else None,
            decay=p.decay,
            signed=p.signed,
            extra=plan.variables,
            project=project,
        )
        return Attempt(x.detach(), plan.final_labels(), loss, steps_run, diverged, plan.source)

    def run_many(
        self,
        observations: Sequence[Observation],
        capabilities: AttackerCapabilities | None = None,
        *,
        batched: bool = False,
    ) -> list[Reconstruction]:
        """As :meth:`Attack.run_many`; with ``batched``, victims that allow it (see
        :func:`batching_obstacle`) are reconstructed in one ``vmap`` optimisation
        (:mod:`attacks.batched`), each as its own :meth:`run` would, up to float rounding."""
        if not batched:
            return super().run_many(observations, capabilities)
        seen = [self.restricted(o, capabilities) for o in observations]
        if batching_obstacle(self, seen) is not None:
            return super().run_many(observations, capabilities)
        p = self.params
        setups = [
            InversionSetup.from_observation(o, ignore=p.ignore_layers, include=p.layers)
            for o in seen
        ]
        if any(s.names != setups[0].names for s in setups):
            return super().run_many(observations, capabilities)
        return run_batched(self.name, p, seen, setups)


def batching_obstacle(attack: Attack, observations: Sequence[Observation]) -> str | None:
    """Why these (already restricted) victims cannot be reconstructed by ``attack`` in one
    batched optimisation (``run_many(..., batched=True)``), or None when they can."""
    p = attack.params
    if type(attack).attempt is not InvertingGradients.attempt or not isinstance(
        p, InvertingGradientsParams
    ):
        return "not Inverting Gradients (or its attempt is overridden)"
    if len(observations) < 2:
        return "fewer than two victims"
    if p.restarts != 1:
        return "more than one restart"
    if p.labels == "soft":
        return "optimised soft labels"
    if p.feature_prior > 0:
        return "a feature prior (its targets are per victim)"
    if p.bn_prior > 0 or p.bn_project:
        return "a BatchNorm prior (its statistics are recorded per victim by hooks)"
    return victims_obstacle(observations)

"""The Inverting Gradients attack (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020), and
when its victims can be reconstructed in one batched optimisation (:mod:`.batched`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attacks._machinery.matching import matching
from attacks._machinery.objectives import (
    cosine_distance,
    layer_weights,
    total_variation,
    weighted_sq_norm,
)
from attacks._machinery.optim import run_signed_adam
from attacks._machinery.setup import InversionSetup
from attacks.base import Attack, Attempt, register_attack
from attacks.inverting_gradients.batched import run_batched, victims_obstacle
from attacks.inverting_gradients.params import InvertingGradientsParams
from attacks.labels.plans import plan_labels
from attacks.learned.start import learned_start, pull_toward
from attacks.priors import Prior, recording, with_priors
from attacks.priors.bn_prior import bn_prior, mean_projection, revealed_statistics
from attacks.priors.features import feature_prior
from attacks.public import AttackerResources
from attacks.reconstruction import Reconstruction
from attacks.threat import AttackerCapabilities, Requirements
from fl.simulation.observation import MessageKind, Observation


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

    def requirements(self, kind: MessageKind | None = None) -> Requirements:
        """Gradients, or weights with the client's lr and local steps (its SGD is unrolled);
        the BatchNorm statistics with ``bn_prior`` > 0 or ``bn_project``."""
        bn = self.params.bn_prior > 0 or self.params.bn_project
        needs = Requirements.unrolling(kind, bn_stats=bn)
        if self.params.init == "learned":  # the start is learned on public data
            return needs.model_copy(update={"public_data": True, "batch_size": True})
        return needs

    def attempt(self, obs: Observation, generator: torch.Generator, restart: int) -> Attempt:
        p = self.params
        setup = InversionSetup.from_observation(obs, ignore=p.ignore_layers, include=p.layers)
        start = None
        if p.init == "learned":
            start = learned_start(self, obs, self.resources, p.learned, p.seed)
        x = setup.dummy(generator, p.init, start)
        if restart > 0 and p.init_noise > 0:
            setup.perturb(x, generator, p.init_noise, p.boxed)
        plan = plan_labels(p.labels, "infer", obs, setup, generator)
        weights = layer_weights(p.layer_weights, len(setup.target), x.device)
        matched = matching(obs, setup, plan.targets)
        revealed = revealed_statistics(obs, self.requirements().bn_stats)
        priors: list[Prior] = [
            bn_prior(revealed, setup, p.bn_prior, p.bn_first_multiplier, p.bn_distance),
            feature_prior(obs, setup.model, plan.fixed, p.feature_prior),
        ]
        project = mean_projection(revealed, setup, x, p.bn_project)
        target_sq_norm = weighted_sq_norm(setup.target, weights)

        def objective() -> torch.Tensor:
            with recording(priors):
                loss = cosine_distance(
                    matched(x), setup.target, weights, target_sq_norm=target_sq_norm
                )
            if p.tv > 0:
                loss = loss + p.tv * total_variation(x)
            return with_priors(loss + pull_toward(x, start, p.learned_pull), priors)

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
        resources: AttackerResources | None = None,
    ) -> list[Reconstruction]:
        """As :meth:`Attack.run_many`; with ``batched``, victims that allow it (see
        :func:`batching_obstacle`) are reconstructed in one ``vmap`` optimisation
        (:mod:`attacks.inverting_gradients.batched`), each as its own :meth:`run` would, up to
        float rounding."""
        if not batched:
            return super().run_many(observations, capabilities, resources=resources)
        seen = [self.restricted(o, capabilities, resources) for o in observations]
        if batching_obstacle(self, seen) is not None:
            return super().run_many(observations, capabilities, resources=resources)
        p = self.params
        setups = [
            InversionSetup.from_observation(o, ignore=p.ignore_layers, include=p.layers)
            for o in seen
        ]
        if any(s.names != setups[0].names for s in setups):
            return super().run_many(observations, capabilities, resources=resources)
        return run_batched(self.name, p, seen, setups)


def batching_obstacle(attack: Attack[Any], observations: Sequence[Observation]) -> str | None:
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
    if p.init == "learned":
        return "a learned start (per victim)"
    if p.bn_prior > 0 or p.bn_project:
        return "a BatchNorm prior (its statistics are recorded per victim by hooks)"
    return victims_obstacle(observations)

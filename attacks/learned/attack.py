"""The learned attacks: ``learned_inversion`` (Wu, Chen, Guo, Weinberger 2023) and
``feature_inversion`` (a decoder of the classifier input the last layer reveals)."""

from __future__ import annotations

from typing import ClassVar

import torch

from attacks.base import Attack, Attempt, register_attack
from attacks.learned.params import Encoding, FeatureInversionParams, LearnedInversionParams
from attacks.learned.trained import InverterCache
from attacks.threat import Requirements
from fl.simulation.normalization import normalize
from fl.simulation.observation import MessageKind, Observation


class _Learned(Attack[LearnedInversionParams]):
    """An inverter trained on public data at the attacked round's weights, then applied to the
    victim's update (no labels, no BatchNorm statistics needed). One training per round,
    shared by its victims; its cost is in the first victim's seconds."""

    encoding: ClassVar[Encoding] = "sketch"

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.cache = InverterCache()

    def requirements(self, kind: MessageKind | None = None) -> Requirements:
        """Public data and the client's batch size; for FedAvg weights also the learning rate
        and local steps (the attacker simulates the client's local SGD)."""
        fedavg = kind == "weights"
        kinds: tuple[MessageKind, ...] = (kind,) if kind else ("gradient", "weights")
        return Requirements(
            kinds=kinds, public_data=True, batch_size=True, lr=fedavg, local_steps=fedavg
        )

    def attempt(self, obs: Observation, generator: torch.Generator, restart: int) -> Attempt:
        p = self.params
        trained, fresh = self.cache.get(obs, self.resources, p, self.encoding, p.seed)
        images = trained.invert(obs).to(obs.device)
        inputs = normalize(images, obs.mean, obs.std)
        training = trained.training
        extras = {
            "inverter_examples": float(trained.examples),
            "inverter_best_epoch": float(training.best_epoch),
            "inverter_seconds": trained.seconds if fresh else 0.0,
        }
        if training.validation_loss:
            extras["inverter_validation_mse"] = training.validation_loss[training.best_epoch]
        loss = extras.get("inverter_validation_mse", training.train_loss[-1])
        return Attempt(inputs, None, loss, training.best_epoch + 1, extras=extras)


@register_attack("learned_inversion")
class LearnedInversion(_Learned):
    """Learning to Invert (Wu, Chen, Guo, Weinberger, arXiv 2210.10880, 2023).

    The attacker simulates clients on its public images at the attacked round's global weights
    -- the client's algorithm, batch size, local steps and learning rate, and the trial's
    defense applied exactly as a client applies it (``adaptive``) -- and trains an MLP from a
    CountSketch of each update to its batch (an order-free set loss for batches). Deviations:
    the paper feeds the raw gradient of small models to the MLP; a fixed-size sketch of the
    layer-scaled update keeps the input size independent of the model. ``prior_only`` trains
    the same network on noise (it can only learn the average image).
    """

    Params = LearnedInversionParams


@register_attack("feature_inversion")
class FeatureInversion(_Learned):
    """A decoder of the classifier input the last layer's update reveals (after Wu et al. 2023).

    The classifier input is exact from the last layer at batch 1 (Geiping et al. 2020 sec. 4,
    Phong et al. 2018).
    Per class row, ``dW_c / db_c`` of the last Linear layer's update is the classifier input of
    a single image and a mix of the batch's otherwise; a decoder trained on simulated clients'
    updates (public images, the defense applied) maps it back to the batch. Needs a final
    ``nn.Linear`` with a bias (else :class:`attacks.threat.ThreatModelError`).
    """

    Params = FeatureInversionParams
    encoding: ClassVar[Encoding] = "classifier_input"

"""One trained inverter per attacked round: simulate, encode, standardise, train; then invert.

Shared by the learned attacks (:mod:`attacks.learned.attack`) and by ``init: learned`` of the
gradient-matching attacks. A :class:`InverterCache` keeps each round's inverter so that the
round's victims share one training (its cost falls on the first victim's seconds).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from attacks.learned.encoders import (
    ClassifierInputEncoder,
    Encoder,
    NoiseEncoder,
    SketchEncoder,
    Standardizer,
)
from attacks.learned.inverter import Training, train_inverter
from attacks.learned.params import Encoding, InverterParams
from attacks.learned.simulate import ClientSimulator
from attacks.public import AttackerResources
from attacks.threat import ThreatModelError
from fl.simulation.hooks import ClientHooks
from fl.simulation.observation import Observation

FIT_EXAMPLES = 32
"""Simulated updates an encoder's scales are fitted on (the first ones)."""
DEFAULT_SKETCH = 4096
"""Sketch size for parameter models without a ``sketch`` field."""


def observed_update(obs: Observation) -> dict[str, torch.Tensor]:
    """What the inverter reads of an observation: the gradient (FedSGD) or ``W_t - W_{t+1}``
    (FedAvg), as the simulated clients' updates are taken."""
    return dict(obs.message) if obs.kind == "gradient" else obs.weight_update()


def build_encoder(
    obs: Observation, encoding: Encoding, params: InverterParams, seed: int
) -> Encoder:
    """The encoder of ``encoding`` for this observation's message (the prior-only ablation:
    noise of the same size)."""
    names = obs.parameter_names()
    real: Encoder
    if encoding == "classifier_input":
        real = ClassifierInputEncoder(obs.model, names)
    else:
        shapes = {n: tuple(obs.message[n].shape) for n in names}
        real = SketchEncoder(shapes, int(getattr(params, "sketch", DEFAULT_SKETCH)), seed)
    if params.ablation == "prior_only":
        return NoiseEncoder(real.dim, torch.Generator().manual_seed(int(seed) + 1))
    return real


@dataclass
class TrainedInverter:
    """A round's inverter with its encoder and standardiser; ``seconds`` to simulate and train,
    ``examples`` simulated updates, ``hooks`` the attacker's own instance of the defense."""

    encoder: Encoder
    standardizer: Standardizer
    training: Training
    seconds: float
    examples: int
    hooks: ClientHooks

    @torch.no_grad()
    def invert(self, obs: Observation) -> torch.Tensor:
        """The batch (B, C, H, W) in [0, 1] this inverter reads from ``obs``'s update."""
        net = self.training.inverter
        code = self.standardizer(self.encoder(observed_update(obs))[None])
        device = next(net.parameters()).device
        images: torch.Tensor = net(code.to(device))[0].cpu()
        return images


def fit_inverter(
    obs: Observation,
    resources: AttackerResources,
    params: InverterParams,
    encoding: Encoding,
    seed: int,
) -> TrainedInverter:
    """Simulate ``params.examples`` client steps on public batches at ``obs``'s global weights
    (with the defense when ``params.adaptive``), encode them and train an inverter.

    Raises:
        ThreatModelError: no public data, or a model the encoding cannot read.
    """
    if resources.public is None:
        raise ThreatModelError("a learned attack needs public data (capabilities.public_data)")
    t0 = time.perf_counter()
    hooks = resources.hooks() if params.adaptive else ClientHooks()
    simulator = ClientSimulator(obs, hooks, resources.rounds)
    generator = torch.Generator().manual_seed(int(seed))
    encoder = build_encoder(obs, encoding, params, seed)
    steps = simulator.steps(
        resources.public, params.examples, generator, flip=params.augment == "flip"
    )
    first = [next(steps) for _ in range(min(FIT_EXAMPLES, params.examples))]
    encoder.fit([s.update for s in first])
    codes = [encoder(s.update) for s in first]
    images = [s.images for s in first]
    for step in steps:
        codes.append(encoder(step.update))
        images.append(step.images)
    standardizer = Standardizer(torch.stack(codes))
    device = obs.device
    training = train_inverter(
        standardizer(torch.stack(codes)).to(device),
        torch.stack(images).to(device),
        params,
        generator,
    )
    return TrainedInverter(
        encoder, standardizer, training, time.perf_counter() - t0, params.examples, hooks
    )


def _fingerprint(obs: Observation) -> str:
    """A digest of the global weights (victims of one round share them)."""
    digest = hashlib.sha1()
    for name in sorted(obs.global_state):
        digest.update(obs.global_state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class InverterCache:
    """Each (round, global weights, step facts, encoding, parameters) inverter, trained once."""

    trained: dict[tuple[object, ...], TrainedInverter] = field(default_factory=dict)

    def get(
        self,
        obs: Observation,
        resources: AttackerResources,
        params: InverterParams,
        encoding: Encoding,
        seed: int,
    ) -> tuple[TrainedInverter, bool]:
        """The inverter for ``obs`` and whether it was trained by this call."""
        key = (
            obs.round,
            obs.kind,
            obs.num_examples,
            obs.batch_size,
            obs.local_steps,
            obs.lr,
            _fingerprint(obs),
            encoding,
            params.model_dump_json(),
            resources.defense_name,
            id(resources.public),
            seed,
        )
        if key in self.trained:
            return self.trained[key], False
        self.trained.clear()  # one round at a time: earlier rounds' inverters are not reused
        self.trained[key] = fit_inverter(obs, resources, params, encoding, seed)
        return self.trained[key], True

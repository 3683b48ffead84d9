"""The attack interface, its registry, and the restart/divergence logic every attack shares."""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from attacks.convolution import ExactConvolutions, exact_convolutions
from attacks.reconstruction import Reconstruction
from attacks.threat import AttackerCapabilities, Requirements
from fl.simulation.normalization import denormalize
from fl.simulation.observation import Observation


class AttackConfigError(ValueError):
    """An attack was given an unknown parameter or a value out of range."""


class UnknownAttackError(ValueError):
    """No attack is registered under that name; the message lists the known ones."""


class AttackParams(BaseModel):
    """Parameters every attack accepts."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(300, ge=1, description="Optimiser iterations per restart.")
    restarts: int = Field(1, ge=1, description="Independent restarts; best by the attack loss.")
    seed: int = Field(0, description="Seed of the dummy initialisation.")
    exact_convolutions: ExactConvolutions = Field(
        "auto",
        description="The exact convolution double backward (attacks.convolution: bit-identical "
        "to PyTorch's, about 15 % faster per iteration on a CPU): 'auto' = on CPUs only (not "
        "yet verified on CUDA; benchmarks/gpu_check.py checks it), 'on' = also on CUDA, "
        "'off' = PyTorch's own double backward everywhere.",
    )


@dataclass
class Attempt:
    """The outcome of one restart, in the model's input space."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    loss: float
    iterations: int
    diverged: bool = False
    label_source: str = "none"
    extras: dict[str, float] = field(default_factory=dict)


class Attack(ABC):
    """Base class of every reconstruction attack.

    Subclasses declare ``name``, ``Params`` (a pydantic model of their documented defaults) and
    ``requirements`` (what they need from an observation), and implement :meth:`attempt` (one
    restart). :meth:`run` restricts the observation to the attacker's capabilities, checks the
    requirements, runs the restarts under a local RNG seeded from ``seed``, keeps the restart
    with the lowest attack loss (never looking at the ground truth), and returns images in
    [0, 1] on the CPU.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[AttackParams]] = AttackParams
    requirements: ClassVar[Requirements] = Requirements()

    def __init__(self, **params: object) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
            )
            known = ", ".join(self.Params.model_fields)
            raise AttackConfigError(
                f"attack {self.name!r}: {problems} (parameters: {known})"
            ) from None

    def requirements_for(self, obs: Observation) -> Requirements:
        """The requirements for this observation (some attacks need more for FedAvg)."""
        return self.requirements

    @abstractmethod
    def attempt(self, obs: Observation, generator: torch.Generator, restart: int) -> Attempt:
        """Run one restart and return its reconstruction in the model's input space."""

    def run(
        self, obs: Observation, capabilities: AttackerCapabilities | None = None
    ) -> Reconstruction:
        """Reconstruct the private batch of ``obs``; see the class docstring."""
        if capabilities is not None:
            obs = capabilities.restrict(obs)
        self.requirements_for(obs).check(obs, self.name)
        device = obs.device
        t0 = time.perf_counter()
        attempts: list[Attempt] = []
        devices = [device] if device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=devices),
            exact_convolutions(self.params.exact_convolutions),
        ):
            for restart in range(self.params.restarts):
                torch.manual_seed(self.params.seed * 1000 + restart)
                gen = torch.Generator(device=device)
                gen.manual_seed(self.params.seed * 1000 + restart)
                attempts.append(self.attempt(obs, gen, restart))
        seconds = time.perf_counter() - t0

        def rank(a: Attempt) -> tuple[int, float]:
            finite = math.isfinite(a.loss)
            return (int(a.diverged or not finite), a.loss if finite else math.inf)

        best = min(attempts, key=rank)
        images = denormalize(best.inputs.detach(), obs.mean, obs.std).clamp(0, 1).cpu()
        return Reconstruction(
            images=images,
            labels=None if best.labels is None else best.labels.detach().cpu(),
            attack=self.name,
            loss=best.loss,
            iterations=best.iterations,
            seconds=seconds,
            diverged=best.diverged,
            restart_losses=[a.loss for a in attempts],
            label_source=best.label_source,
            extras=best.extras,
        )


_REGISTRY: dict[str, type[Attack]] = {}
_A = TypeVar("_A", bound=type[Attack])


def register_attack(name: str) -> Callable[[_A], _A]:
    """Class decorator registering an attack under ``name`` (also for users' own attacks)."""

    def deco(cls: _A) -> _A:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"an attack named {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_attacks() -> list[str]:
    """Sorted names of the registered attacks."""
    return sorted(_REGISTRY)


def attack_class(name: str) -> type[Attack]:
    """The class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownAttackError(
            f"unknown attack {name!r}; known attacks: {', '.join(available_attacks())}"
        ) from None


def get_attack(name: str, **params: object) -> Attack:
    """Build the attack registered under ``name`` with ``params`` over its defaults."""
    return attack_class(name)(**params)

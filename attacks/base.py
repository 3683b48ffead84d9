"""The attack interface, its registry, and the restart/divergence logic every attack shares."""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Generic, TypeVar, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from attacks._machinery.convolution import ExactConvolutions, exact_convolutions
from attacks.priors.consensus import registered_mean
from attacks.public import AttackerResources
from attacks.reconstruction import Reconstruction
from attacks.scoring.metrics import flat_value
from attacks.threat import AttackerCapabilities, Requirements
from fl.registry import Registry
from fl.simulation.normalization import denormalize
from fl.simulation.observation import MessageKind, Observation


class AttackConfigError(ValueError):
    """An attack was given an unknown parameter or a value out of range."""


class UnknownAttackError(ValueError):
    """No attack is registered under that name; the message lists the known ones."""


class AttackParams(BaseModel):
    """Parameters every attack accepts (unknown names and NaN/infinity rejected)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    iterations: int = Field(300, ge=1, description="Optimiser iterations per restart.")
    restarts: int = Field(
        1, ge=1, description="Independent restarts; best by the attack loss (or restart_average)."
    )
    restart_average: bool = Field(
        False,
        description="Return the mean of the finite restarts instead of the best one, each "
        "batch first put in the best restart's order by a Hungarian assignment within labels "
        "(GradInversion's group consensus, Yin et al. 2021 sec. 3.4, without the joint pull); "
        "the reported loss stays the best restart's. Restarts must differ: a random init, or "
        "Inverting Gradients' init_noise (with one restart, or identical ones, it changes "
        "nothing).",
    )
    seed: int = Field(0, description="Seed of the dummy initialisation.")
    exact_convolutions: ExactConvolutions = Field(
        "auto",
        description="The exact convolution double backward (attacks._machinery.convolution: "
        "bit-identical to PyTorch's, about 15 % faster per iteration on a CPU): 'auto' = on "
        "CPUs only (not yet verified on CUDA; benchmarks/gpu_check.py checks it), 'on' = also "
        "on CUDA, 'off' = PyTorch's own double backward everywhere.",
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


P = TypeVar("P", bound=AttackParams)


@contextlib.contextmanager
def local_rng(device: torch.device) -> Iterator[None]:
    """Torch's global RNG (and ``device``'s, on CUDA) restored after the block: attacks seed it
    for their restarts without changing the caller's random state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def restart_generator(device: torch.device, seed: int, restart: int) -> torch.Generator:
    """Seed torch's global RNG for restart ``restart`` of an attack with ``seed`` and return
    that restart's own generator, both from ``seed * 1000 + restart`` (call inside
    :func:`local_rng`): what every attack draws its dummy data and labels from."""
    value = seed * 1000 + restart
    torch.manual_seed(value)
    generator = torch.Generator(device=device)
    generator.manual_seed(value)
    return generator


def build_reconstruction(
    name: str, obs: Observation, best: Attempt, seconds: float, restart_losses: list[float]
) -> Reconstruction:
    """The :class:`Reconstruction` of a chosen attempt: images denormalised to [0, 1] and
    clamped, images and labels on the CPU, and the observation's flat baseline value
    (:func:`attacks.scoring.metrics.flat_value`) for scoring's ``psnr_gain``."""
    images = denormalize(best.inputs.detach(), obs.mean, obs.std).clamp(0, 1).cpu()
    return Reconstruction(
        images=images,
        labels=None if best.labels is None else best.labels.detach().cpu(),
        attack=name,
        loss=best.loss,
        iterations=best.iterations,
        seconds=seconds,
        diverged=best.diverged,
        restart_losses=restart_losses,
        label_source=best.label_source,
        extras=best.extras,
        flat_value=flat_value(obs.mean, obs.std),
    )


def averaged_attempt(attempts: Sequence[Attempt], best: Attempt) -> Attempt:
    """``best`` with its images replaced by the registered mean
    (:func:`attacks.priors.consensus.registered_mean`) of every finite, not diverged attempt; the
    count averaged is in ``extras["restarts_averaged"]``."""
    kept = [a for a in attempts if not a.diverged and math.isfinite(a.loss)]
    if not any(a is best for a in kept):
        return best
    members = [best] + [a for a in kept if a is not best]
    mean = registered_mean([a.inputs.detach() for a in members], [a.labels for a in members])
    extras = {**best.extras, "restarts_averaged": float(len(members))}
    return replace(best, inputs=mean, extras=extras)


def _rank(attempt: Attempt) -> tuple[int, float]:
    """Restart order: finite and not diverged first, then by the attack's own loss."""
    finite = math.isfinite(attempt.loss)
    return (int(attempt.diverged or not finite), attempt.loss if finite else math.inf)


class Attack(ABC, Generic[P]):
    """Base class of every reconstruction attack, generic in its parameters model ``P``.

    Subclasses declare ``name`` and ``Params`` (a pydantic model of their documented defaults),
    override :meth:`requirements` (what they need from an observation) unless the default
    (FedSGD gradients, nothing granted) fits, and implement :meth:`attempt` (one restart).
    :meth:`run` restricts the observation to the attacker's capabilities (none granted: the
    least-privileged attacker, :class:`AttackerCapabilities`), checks the requirements, runs
    the restarts under a local RNG seeded from ``seed``, keeps the restart with the lowest
    attack loss (never looking at the ground truth), and returns images in [0, 1] on the CPU.
    :meth:`run_many` attacks several observations.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[AttackParams]] = AttackParams
    params: P
    resources: AttackerResources
    """What the attacker brings besides the observation (public images, the defense's
    algorithm): set by :meth:`run` for its attempts; empty outside it."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not callable(cls.requirements):  # the former class attribute: say what replaced it
            raise TypeError(
                f"{cls.__name__}.requirements must be a method, requirements(self, kind=None) "
                "-> Requirements (returning what the attack needs), not a class attribute"
            )

    def __init__(self, **params: Any) -> None:
        try:
            self.params = cast(P, self.Params(**params))
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
            )
            known = ", ".join(self.Params.model_fields)
            raise AttackConfigError(
                f"attack {self.name!r}: {problems} (parameters: {known})"
            ) from None
        self.resources = AttackerResources()

    def requirements(self, kind: MessageKind | None = None) -> Requirements:
        """What this attack, so configured, needs of an observation holding a ``kind`` message;
        ``None``: of any message (``kinds`` then lists those it works on, ``bn_stats`` whether
        it matches the private batch's BatchNorm statistics). The default: FedSGD gradients,
        nothing granted. Override it (the one hook) where an attack needs more, e.g. the
        learning rate and local steps of a FedAvg update."""
        return Requirements()

    @abstractmethod
    def attempt(self, obs: Observation, generator: torch.Generator, restart: int) -> Attempt:
        """Run one restart and return its reconstruction in the model's input space."""

    def restricted(
        self,
        obs: Observation,
        capabilities: AttackerCapabilities | None,
        resources: AttackerResources | None = None,
    ) -> Observation:
        """``obs`` as this attacker sees it (``None``: nothing granted), requirements checked
        (public data among them: held in ``resources``).

        Raises:
            ThreatModelError: the restricted observation lacks a fact the attack requires.
        """
        seen = (capabilities or AttackerCapabilities()).restrict(obs)
        public = resources is not None and resources.public is not None
        self.requirements(seen.kind).check(seen, self.name, public=public)
        return seen

    def run(
        self,
        obs: Observation,
        capabilities: AttackerCapabilities | None = None,
        resources: AttackerResources | None = None,
    ) -> Reconstruction:
        """Reconstruct the private batch of ``obs``; see the class docstring.

        Args:
            obs: what the server observed of one client step.
            capabilities: what the attacker is granted; None grants nothing beyond the defaults
                of :class:`AttackerCapabilities` (labels and BatchNorm statistics withheld).
            resources: public images and the defense's algorithm, for attacks that learn
                (:mod:`attacks.learned`); None: none.

        Raises:
            ThreatModelError: the observation, so restricted, lacks what the attack requires.

        Example:
            >>> rec = get_attack("idlg", iterations=300).run(obs)  # doctest: +SKIP
        """
        obs = self.restricted(obs, capabilities, resources)
        self.resources = resources or AttackerResources()
        t0 = time.perf_counter()
        with local_rng(obs.device), exact_convolutions(self.params.exact_convolutions):
            attempts = [
                self.attempt(obs, restart_generator(obs.device, self.params.seed, r), r)
                for r in range(self.params.restarts)
            ]
        best = min(attempts, key=_rank)
        if self.params.restart_average:
            best = averaged_attempt(attempts, best)
        losses = [a.loss for a in attempts]
        return build_reconstruction(self.name, obs, best, time.perf_counter() - t0, losses)

    def run_many(
        self,
        observations: Sequence[Observation],
        capabilities: AttackerCapabilities | None = None,
        *,
        batched: bool = False,
        resources: AttackerResources | None = None,
    ) -> list[Reconstruction]:
        """Reconstruct every observation's batch, as ``[self.run(o, capabilities, resources)
        for o in observations]``; attacks with a batched path (Inverting Gradients) take it
        where ``batched`` and possible, with the same results up to float rounding.

        Raises:
            ThreatModelError: an observation lacks what the attack requires.
        """
        return [self.run(o, capabilities, resources) for o in observations]


ATTACKS: Registry[type[Attack[Any]]] = Registry(
    "attack", UnknownAttackError, taken_message="an attack named {name!r} is already registered"
)
"""Attack name -> class: the built-ins (marked in :mod:`attacks`) and users' own."""
_A = TypeVar("_A", bound=type[Attack[Any]])


def register_attack(name: str, *, replace: bool = False) -> Callable[[_A], _A]:
    """Class decorator registering an attack under ``name`` (also for users' own attacks);
    another class under a taken name raises ``ValueError`` unless ``replace``."""

    def deco(cls: _A) -> _A:
        ATTACKS.check_free(name, cls, replace=replace)
        cls.name = name
        ATTACKS.register(name, cls, replace=replace)
        return cls

    return deco


def unregister_attack(name: str) -> None:
    """Remove a registered attack (for tests and plugins); an unknown name is ignored."""
    if name in ATTACKS:
        ATTACKS.unregister(name)


def available_attacks() -> list[str]:
    """Sorted names of the registered attacks."""
    return ATTACKS.names()


def attack_class(name: str) -> type[Attack[Any]]:
    """The class registered under ``name`` (:class:`UnknownAttackError` lists the known ones)."""
    return ATTACKS.get(name)


def get_attack(name: str, **params: object) -> Attack[Any]:
    """Build the attack registered under ``name`` with ``params`` over its defaults."""
    return attack_class(name)(**params)

"""The attacker's threat model: what it may know, and what each attack requires.

Modelled on LeakPro's explicit ``AttackerCapabilities``: before an attack runs, the observation is
restricted to what the attacker is granted, and the attack's declared :class:`Requirements` are
checked against what is left. A missing fact is a :class:`ThreatModelError` that names it and how
to grant it -- never a crash deep inside an optimisation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from attacks.priors.bn_stats import batchnorm_layers
from fl.simulation.observation import ALGORITHM_OF, MessageKind, Observation

PublicSplit = Literal["test", "val", "holdout", "train"]
"""Where public images come from: a split of a dataset, or the study's held-out train share."""


class ThreatModelError(ValueError):
    """An attack was asked to run on an observation that lacks what it requires."""


class PublicDataSpec(BaseModel):
    """Images of the clients' kind that the attacker holds (threat model "auxiliary data",
    LeakPro; Wu et al. 2023): never any client's. Resolved into tensors by
    :func:`attacks.public.load_public_data`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: PublicSplit = Field(
        "test",
        description="Where the images come from: 'test' or 'val' (a split of the dataset no "
        "client trains on), 'holdout' (the share of the study's train split that "
        "federation.partition.holdout keeps from every client), or 'train' (only of another "
        "dataset: the study's own train split is the clients').",
    )
    dataset: str | None = Field(
        None,
        description="A registered dataset of the same image shape (resized to the study's "
        "image_size); default: the study's own dataset.",
    )
    count: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="How many images the attacker holds, drawn (seeded by the study's seed) "
        "from the source; all of it when the source has fewer.",
    )

    def describe(self, study_dataset: str | None = None) -> str:
        """A short human description, e.g. ``"1000 images of pneumoniamnist's test split"``."""
        name = self.dataset or study_dataset or "the study's dataset"
        split = "held-out train share" if self.split == "holdout" else f"{self.split} split"
        return f"{self.count} images of {name}'s {split}"


class AttackerCapabilities(BaseModel):
    """What the honest-but-curious server knows beyond the architecture and global weights.

    The server always knows the model architecture, the global weights it sent and the message it
    received. Everything else is granted here: the private labels, the client's learning rate,
    its number of local steps, its batch size, and the BatchNorm statistics of the private batch.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    knows_labels: bool = Field(False, description="The private labels of the client's batch.")
    knows_lr: bool = Field(True, description="The client's local learning rate (FedAvg).")
    knows_local_steps: bool = Field(
        True, description="The client's number of local SGD steps (FedAvg)."
    )
    knows_batch_size: bool = Field(True, description="The client's local mini-batch size.")
    knows_bn_stats: bool = Field(
        False,
        description="The BatchNorm running buffers the client returns, which reveal the "
        "statistics of its private batch.",
    )
    public_data: PublicDataSpec | None = Field(
        None,
        description="Images of the clients' kind the attacker holds (none by default); "
        "learned attacks and init: learned train on them. Never any client's: overlap is "
        "refused.",
    )

    def restrict(self, obs: Observation) -> Observation:
        """A copy of ``obs`` without the facts this attacker is not granted."""
        changes: dict[str, object] = {}
        if not self.knows_labels:
            changes["labels"] = None
        if not self.knows_lr:
            changes["lr"] = None
        if not self.knows_local_steps:
            changes["local_steps"] = None
        if not self.knows_batch_size:
            changes["batch_size"] = None
        if not self.knows_bn_stats:
            changes["buffers"] = {}
        return obs.replace(**changes) if changes else obs


class Requirements(BaseModel):
    """What an attack needs from an observation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kinds: tuple[MessageKind, ...] = Field(
        ("gradient",),
        description="The messages the attack works on: 'gradient' (FedSGD), 'weights' (FedAvg).",
    )
    labels: bool = Field(False, description="Needs the private labels (knows_labels).")
    lr: bool = Field(False, description="Needs the client's learning rate (knows_lr).")
    local_steps: bool = Field(
        False, description="Needs the client's number of local steps (knows_local_steps)."
    )
    num_examples: bool = Field(True, description="Needs the number of examples of the batch.")
    bn_stats: bool = Field(
        False,
        description="Needs the BatchNorm statistics of the private batch (knows_bn_stats) and "
        "a model with BatchNorm layers.",
    )
    public_data: bool = Field(
        False, description="Needs public images of the clients' kind (public_data)."
    )
    batch_size: bool = Field(False, description="Needs the client's batch size (knows_batch_size).")

    @classmethod
    def unrolling(cls, kind: MessageKind | None, *, bn_stats: bool = False) -> Requirements:
        """What a gradient-matching attack that also unrolls a FedAvg client's local SGD needs:
        for a weights message the client's learning rate and local steps; for a gradient
        message nothing more; ``None`` (any message): the two kinds it works on."""
        if kind == "weights":
            return cls(kinds=("weights",), lr=True, local_steps=True, bn_stats=bn_stats)
        if kind == "gradient":
            return cls(kinds=("gradient",), bn_stats=bn_stats)
        return cls(kinds=("gradient", "weights"), bn_stats=bn_stats)

    def check(self, obs: Observation, attack: str, *, public: bool = False) -> None:
        """Raise :class:`ThreatModelError` if ``obs`` lacks something this attack requires
        (``public``: whether the attacker holds public data)."""
        if self.public_data and not public:
            raise ThreatModelError(
                f"attack {attack!r} trains on public images of the clients' kind, but the "
                "attacker holds none; grant them with capabilities: {public_data: {split: "
                "test, count: 1000}} (Python: AttackerCapabilities(public_data=PublicDataSpec("
                "...)) and AttackerResources(public=load_public_data(...)))"
            )
        if obs.kind not in self.kinds:
            raise ThreatModelError(
                f"attack {attack!r} works on {' or '.join(self.kinds)} messages, but the "
                f"observation holds a {obs.kind!r} message (algorithm "
                f"{ALGORITHM_OF[obs.kind]}); choose an attack for "
                f"{obs.kind} messages"
            )
        missing = []
        if self.labels and obs.labels is None:
            missing.append("labels (grant with AttackerCapabilities(knows_labels=True))")
        if self.lr and obs.lr is None:
            missing.append("the local learning rate (knows_lr=True)")
        if self.local_steps and obs.local_steps is None:
            missing.append("the number of local steps (knows_local_steps=True)")
        if self.bn_stats and not batchnorm_layers(obs.model):
            raise ThreatModelError(
                f"attack {attack!r} matches BatchNorm statistics, but the model has no "
                "BatchNorm layer with running statistics; use it without its BatchNorm prior"
            )
        if self.bn_stats and not any(k.endswith("running_mean") for k in obs.buffers):
            missing.append(
                "the BatchNorm statistics of the private batch (the returned running buffers; "
                "knows_bn_stats=True)"
            )
        if self.batch_size and obs.batch_size is None:
            missing.append("the client's batch size (knows_batch_size=True)")
        if self.num_examples and obs.num_examples < 1:
            missing.append("the number of examples")
        if missing:
            raise ThreatModelError(
                f"attack {attack!r} requires " + ", ".join(missing) + " but the observation "
                "does not include it"
            )

"""What an honest-but-curious server sees of a client step, and -- kept apart -- the truth.

Following breaching's split between the *case* and the *attack*, an :class:`Observation` holds only
what the server may know: the architecture with the global weights it sent, the message it got
back, and the public facts of the step. The private images and labels travel separately in a
:class:`GroundTruth`, which only the evaluator reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

MessageKind = Literal["gradient", "weights"]
"""What a client sends: its gradient (FedSGD) or its updated weights (FedAvg)."""

MESSAGE_KIND: dict[str, MessageKind] = {"fedsgd": "gradient", "fedavg": "weights"}
"""The message kind of each federated algorithm."""

ALGORITHM_OF: dict[MessageKind, str] = {kind: alg for alg, kind in MESSAGE_KIND.items()}
"""The federated algorithm that sends each message kind."""


@dataclass(frozen=True)
class Observation:
    """The server's view of one client step.

    Attributes:
        model: a private copy of the architecture with the global weights sent to the client
            loaded (in training mode, as the client ran it).
        global_state: the parameters and buffers the server sent (detached copies).
        kind: ``"gradient"`` (FedSGD) or ``"weights"`` (FedAvg).
        message: for ``"gradient"`` the gradient per named parameter; for ``"weights"`` the
            client's new parameters per name (after any defense on the outgoing update).
        buffers: the BatchNorm buffers the client returned (empty for models without any).
        num_examples: distinct private examples used in the step.
        batch_size: the client's batch size (None when hidden from the attacker).
        local_steps: local SGD steps taken (None when hidden).
        lr: the client's learning rate (None when hidden).
        image_shape: (C, H, W) of the model's inputs.
        num_classes: number of classes of the classifier.
        mean, std: the model's input normalisation per channel, for images in [0, 1].
        labels: the private labels, present only when the threat model grants them.
        round, client: where the step happened.
    """

    model: nn.Module
    global_state: dict[str, torch.Tensor]
    kind: MessageKind
    message: dict[str, torch.Tensor]
    num_examples: int
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    batch_size: int | None = None
    local_steps: int | None = None
    lr: float | None = None
    labels: torch.Tensor | None = None
    round: int = 0
    client: int = 0

    @property
    def device(self) -> torch.device:
        """The device the observation's tensors live on."""
        return next(iter(self.message.values())).device

    def parameter_names(self) -> list[str]:
        """Names of the model parameters the message covers, in model order."""
        return [n for n, _ in self.model.named_parameters() if n in self.message]

    def weight_update(self) -> dict[str, torch.Tensor]:
        """The update ``W_t - W_{t+1}`` per parameter for a weights message (DLM's Delta W)."""
        if self.kind != "weights":
            raise ValueError("weight_update() needs a 'weights' observation (FedAvg)")
        return {n: self.global_state[n] - w for n, w in self.message.items()}

    def replace(self, **changes: Any) -> Observation:
        """A copy with some fields changed (used by threat models to hide facts)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class GroundTruth:
    """The private data of one client step, for evaluation only; never given to an attack.

    Attributes:
        images: the client's ORIGINAL images in [0, 1], shape (N, C, H, W), in the order they
            were first used, on the CPU.
        labels: their labels, shape (N,).
        trained_images: what the client actually trained on, in [0, 1], when a defense
            transformed the batch (None otherwise). Attacks are always scored against ``images``.
        round, client: where the step happened.
    """

    images: torch.Tensor
    labels: torch.Tensor
    trained_images: torch.Tensor | None = None
    round: int = 0
    client: int = 0

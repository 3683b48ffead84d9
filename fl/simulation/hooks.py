"""The points where a defense may act on a federated run.

:class:`ClientHooks` does nothing by default; a defense subclasses it and overrides the hooks it
needs (Flower-style small strategy objects). The simulator calls them in this order for each
client step: :meth:`ClientHooks.transform_batch` on each private batch (images in [0, 1]),
:meth:`ClientHooks.compute_gradients` (or the standard backward pass) with
:meth:`ClientHooks.extra_loss` added, and :meth:`ClientHooks.process_update` on the outgoing
update. :meth:`ClientHooks.prepare_model` runs once on the global model before training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn


@dataclass
class ClientContext:
    """Facts of the client step a hook may use.

    ``generator`` is seeded from (seed, round, client) so hooks that draw noise are
    deterministic; ``step`` is the local step and ``batch_indices`` the positions (within the
    client's own data) of the current batch, so a hook can keep per-example state across rounds;
    ``extras`` carries ``client_size`` (the client's number of training examples, e.g. for a
    DP accountant's sampling rate) and is free for hooks to pass values between their own calls
    within one step.
    """

    round: int
    rounds: int
    client: int
    lr: float
    device: torch.device
    generator: torch.Generator
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: Literal["gradient", "weights"]
    step: int = 0
    batch_indices: torch.Tensor | None = None
    extras: dict[str, object] = field(default_factory=dict)


class ClientHooks:
    """Base class of everything that acts on a client's training; every hook is a no-op here."""

    name: ClassVar[str] = "none"
    concurrent_clients: ClassVar[bool] = True
    """Whether several clients may run these hooks at the same time (``parallel_clients``):
    true when the hooks draw randomness only from ``ctx.generator`` and share no mutable state
    between clients. The no-op base is safe; :class:`defenses.Defense` says no unless a defense
    declares otherwise."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Change the global model once before training (e.g. insert a bottleneck)."""
        return model

    def transform_batch(
        self, images: torch.Tensor, labels: torch.Tensor, model: nn.Module, ctx: ClientContext
    ) -> torch.Tensor:
        """Return the images (in [0, 1]) the client trains on instead of its private batch."""
        return images

    def extra_loss(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        logits: torch.Tensor,
        ctx: ClientContext,
    ) -> torch.Tensor | None:
        """An extra term added to the training loss of a local step, or None."""
        return None

    def compute_gradients(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        ctx: ClientContext,
    ) -> dict[str, torch.Tensor] | None:
        """Replace the gradient computation of a local step (e.g. DP-SGD); None = standard."""
        return None

    def process_update(
        self, update: dict[str, torch.Tensor], ctx: ClientContext
    ) -> dict[str, torch.Tensor]:
        """Transform the outgoing update before the server sees it.

        For FedSGD ``update`` is the gradient; for FedAvg it is the weight change
        ``W_new - W_global`` per parameter (the simulator adds it back to the global weights
        to form the message).
        """
        return update

    def epsilon(self, delta: float | None = None) -> float | None:
        """The privacy loss ε spent so far at ``delta`` (None: the defense's own δ), for
        defenses with an accountant; None otherwise."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The hooks' state carried from round to round (per-client generators, accountants,
        maps), for round-level checkpoints. Only tensors, numbers, strings, None, lists and
        dicts, so that it loads with ``torch.load(..., weights_only=True)``. Stateless hooks
        return ``{}``; stateful ones override this and :meth:`load_state_dict`."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on hooks built with the same parameters)."""
        if state:
            raise ValueError(
                f"{type(self).__name__} keeps no state but a checkpoint holds some for it "
                f"({sorted(state)}); it must override state_dict() and load_state_dict()"
            )

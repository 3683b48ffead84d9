"""One client's local step: the code path shared by the simulator and ``observe_client_step``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl.simulation.hooks import ClientContext, ClientHooks
from fl.simulation.normalization import normalize
from fl.simulation.observation import MESSAGE_KIND, MessageKind


@dataclass
class ClientResult:
    """What a client produced in one round.

    ``message`` is what is sent (after the defense's ``process_update``): the gradient per
    parameter for FedSGD, the new parameters for FedAvg. ``used`` lists the positions (into the
    client's images) of the examples it trained on, in order of first use; ``trained_images``
    holds the transformed images for those positions when a defense changed them.
    """

    kind: MessageKind
    message: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    num_examples: int
    local_steps: int
    loss: float
    used: list[int]
    trained_images: torch.Tensor | None


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters that require a gradient, by name, in model order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def model_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    hooks: ClientHooks,
    ctx: ClientContext,
) -> torch.Tensor:
    """Training loss of one local step: cross-entropy + the model's own extra term (e.g. the
    PRECODE KL) + the defense's extra term."""
    return loss_from_logits(model, inputs, labels, model(inputs), hooks, ctx)


def loss_from_logits(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    hooks: ClientHooks,
    ctx: ClientContext,
) -> torch.Tensor:
    """:func:`model_loss` for logits already computed (e.g. from features a defense needs)."""
    loss = F.cross_entropy(logits, labels)
    extra_model = getattr(model, "auxiliary_loss", None)
    if callable(extra_model):
        term = extra_model()
        if term is not None:
            loss = loss + term
    term = hooks.extra_loss(model, inputs, labels, logits, ctx)
    if term is not None:
        loss = loss + term
    return loss


def _standard_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    hooks: ClientHooks,
    ctx: ClientContext,
) -> tuple[dict[str, torch.Tensor], float]:
    params = trainable_parameters(model)
    loss = model_loss(model, inputs, labels, hooks, ctx)
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params.keys(), grads, strict=True)), float(loss.detach())


def _loss_for_log(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """The batch's cross-entropy for the client's loss log, by a forward that leaves the
    model's buffers as they were: the defense's own forward already updated the BatchNorm
    running statistics once, as the step's one forward does (a second update would change what
    the returned buffers tell the server)."""
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    with torch.no_grad():
        loss = float(F.cross_entropy(model(inputs), labels))
        for k, b in model.named_buffers():
            b.copy_(saved[k])
    return loss


def _batches(
    n: int, batch_size: int, steps: int, rng: np.random.Generator | None
) -> list[np.ndarray]:
    """Index batches for ``steps`` local steps over ``n`` examples (reshuffled each epoch when
    ``rng`` is given, in order otherwise; the last batch of an epoch may be smaller)."""
    out: list[np.ndarray] = []
    while len(out) < steps:
        order = rng.permutation(n) if rng is not None else np.arange(n)
        for start in range(0, n, batch_size):
            out.append(order[start : start + batch_size])
            if len(out) == steps:
                break
    return out


def steps_for(n: int, batch_size: int, local_epochs: int, local_steps: int | None) -> int:
    """Number of local SGD steps a FedAvg client takes."""
    if local_steps is not None:
        return local_steps
    return local_epochs * int(np.ceil(n / batch_size))


def outgoing_message(
    algorithm: str,
    result: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    hooks: ClientHooks,
    ctx: ClientContext,
) -> dict[str, torch.Tensor]:
    """What a client sends, after the defense's ``process_update``: for FedSGD ``result`` is the
    last batch's gradient and is sent as processed; for FedAvg it is the trained weights, the
    update ``W_new - W_global`` is processed and ``W_global + update`` is sent (``start`` holds
    ``W_global``)."""
    if algorithm == "fedsgd":
        update = hooks.process_update(result, ctx)
        return {k: update[k].detach() for k in start}
    with torch.no_grad():
        delta = {k: result[k].detach() - start[k] for k in start}
    delta = hooks.process_update(delta, ctx)
    return {k: (start[k] + delta[k]).detach() for k in start}


def _step_count(
    algorithm: str, n: int, batch_size: int, local_epochs: int, local_steps: int | None
) -> int:
    """Local steps of one client: one for FedSGD, :func:`steps_for` for FedAvg."""
    if algorithm == "fedsgd":
        return 1
    if algorithm == "fedavg":
        return steps_for(n, batch_size, local_epochs, local_steps)
    raise ValueError(f"unknown algorithm {algorithm!r}; expected 'fedsgd' or 'fedavg'")


@dataclass
class _UsedExamples:
    """The positions a client trained on, in order of first use, and the images a defense's
    ``transform_batch`` put in their place (the first time each was used)."""

    used: list[int] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    transformed: dict[int, torch.Tensor] = field(default_factory=dict)
    changed: bool = False

    def record(self, idx: np.ndarray, x01: torch.Tensor, x_used: torch.Tensor) -> None:
        """Note one batch: positions ``idx``, drawn as ``x01``, trained on as ``x_used``."""
        self.changed = self.changed or x_used is not x01
        for j, i in enumerate(idx.tolist()):
            if i not in self.seen:
                self.seen.add(i)
                self.used.append(i)
                if x_used is not x01:
                    self.transformed[i] = x_used[j].detach()

    def trained_images(self, images: torch.Tensor) -> torch.Tensor | None:
        """The images trained on, in order of first use, when a defense changed some batch
        (examples first used in an unchanged batch trained as-is); None otherwise."""
        if not self.changed:
            return None
        return torch.stack([self.transformed.get(i, images[i]) for i in self.used]).cpu()


def _step_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    hooks: ClientHooks,
    ctx: ClientContext,
) -> tuple[dict[str, torch.Tensor], float]:
    """One local step's gradient (the defense's ``compute_gradients``, or the loss's own) and
    the loss it logs."""
    custom = hooks.compute_gradients(model, inputs, labels, ctx)
    if custom is None:
        return _standard_gradients(model, inputs, labels, hooks, ctx)
    return custom, _loss_for_log(model, inputs, labels)


@torch.no_grad()
def _sgd_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: float) -> None:
    """``W <- W - lr * g`` in place, for every trainable parameter."""
    plist = list(params.values())
    torch._foreach_add_(plist, [grads[k] for k in params], alpha=-lr)


def run_client(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    algorithm: str,
    lr: float,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    hooks: ClientHooks,
    ctx: ClientContext,
    local_epochs: int = 1,
    local_steps: int | None = None,
    rng: np.random.Generator | None = None,
) -> ClientResult:
    """Run one client's local work on ``model`` (modified in place) and return its message.

    ``images`` are the client's private images in [0, 1] (N, C, H, W) on the model's device.
    FedSGD: the gradient of the first batch (of ``batch_size``, in ``rng`` order). FedAvg: plain
    SGD steps ``W <- W - lr * g`` over mini-batches (see :func:`steps_for`).
    """
    model.train()
    n = images.shape[0]
    if n == 0:
        raise ValueError(f"client {ctx.client} has no training examples")
    ctx.extras["client_size"] = n
    params = trainable_parameters(model)
    start = {k: p.detach().clone() for k, p in params.items()}
    steps = _step_count(algorithm, n, batch_size, local_epochs, local_steps)

    examples = _UsedExamples()
    losses: list[float] = []
    grads: dict[str, torch.Tensor] = {}
    for step, idx in enumerate(_batches(n, batch_size, steps, rng)):
        ctx.step = step
        index = torch.as_tensor(idx, device=images.device, dtype=torch.long)
        ctx.batch_indices = index
        x01, y = images[index], labels[index]
        x_used = hooks.transform_batch(x01, y, model, ctx)
        examples.record(idx, x01, x_used)
        grads, loss = _step_gradients(model, normalize(x_used, mean, std), y, hooks, ctx)
        losses.append(loss)
        if algorithm == "fedavg":
            _sgd_step(params, grads, lr)

    message = outgoing_message(
        algorithm, grads if algorithm == "fedsgd" else params, start, hooks, ctx
    )
    return ClientResult(
        kind=MESSAGE_KIND[algorithm],
        message=message,
        buffers={k: b.detach().clone() for k, b in model.named_buffers()},
        num_examples=len(examples.used),
        local_steps=steps,
        loss=float(np.mean(losses)),
        used=examples.used,
        trained_images=examples.trained_images(images),
    )

"""Sampled clients trained as one vectorised model (``federation.vectorize_clients``).

Clients that share an architecture differ only in their weights, buffers and data, so one local
step of all of them is one call of ``vmap(grad(loss))`` over weights stacked along a new leading
dimension (``torch.func.functional_call``): the convolutions of V clients become one grouped
convolution, which keeps a GPU busy where one client's batch of 32 small images does not.

The arithmetic is that of :func:`fl.simulation.client.run_client`, client by client: the same
batches (drawn from the same per-client generators), the same ``W <- W - lr * g`` steps, the same
BatchNorm statistics (each client's running buffers are its own slice of a stacked buffer, updated
in place under ``vmap``), the same outgoing message through the hooks' ``process_update``. Only
float rounding differs (a grouped convolution sums in another order). Local step ``s`` of every
client whose batch at that step has the same size runs in one call; clients whose batches differ
in size (the last batch of an epoch) run in separate groups, so no padding enters any statistic.

Where this cannot be exact it is not used (:func:`vectorization_obstacle`): hooks that change
the batch, the loss or the gradient computation, a model with its own stochastic loss term
(PRECODE's bottleneck) or with dropout.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fl.simulation.client import ClientResult, _batches, outgoing_message, steps_for
from fl.simulation.hooks import ClientContext, ClientHooks
from fl.simulation.normalization import normalize
from fl.simulation.observation import MESSAGE_KIND

_BATCH_HOOKS = ("transform_batch", "extra_loss", "compute_gradients")


def vectorization_obstacle(model: nn.Module, hooks: ClientHooks) -> str | None:
    """Why clients of ``model`` under ``hooks`` cannot be trained as one vectorised model, or
    None when they can (exactly, up to float rounding)."""
    for name in _BATCH_HOOKS:
        if getattr(type(hooks), name) is not getattr(ClientHooks, name):
            return f"the hooks {type(hooks).__name__!r} override {name}()"
    bottleneck = getattr(model, "bottleneck", None)
    if isinstance(bottleneck, nn.Module) and callable(getattr(bottleneck, "auxiliary_loss", None)):
        return "the model's bottleneck adds a stochastic loss term (auxiliary_loss)"
    if bottleneck is None and callable(getattr(model, "auxiliary_loss", None)):
        return "the model adds its own loss term (auxiliary_loss)"
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return "the model has dropout (each client would need its own random mask)"
    return None


@dataclass
class _StackedClients:
    """V clients' trainable weights and buffers, stacked along a new leading client dimension,
    and the parameters that do not train (shared by all clients, as the global model holds
    them)."""

    names: list[str]
    frozen: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]

    @classmethod
    def from_global(
        cls, model: nn.Module, global_state: dict[str, torch.Tensor], v: int
    ) -> _StackedClients:
        """Every one of ``v`` clients starting from ``global_state``."""
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        frozen = {
            n: global_state[n].detach() for n, p in model.named_parameters() if not p.requires_grad
        }
        params = {n: global_state[n].detach().unsqueeze(0).repeat_interleave(v, 0) for n in names}
        buffers = {
            n: global_state[n].detach().unsqueeze(0).repeat_interleave(v, 0).clone()
            for n, _ in model.named_buffers()
        }
        return cls(names, frozen, params, buffers)


_StepFn = Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]


def _vectorized_step(skeleton: nn.Module, frozen: dict[str, torch.Tensor]) -> _StepFn:
    """``vmap(grad(loss))`` over stacked weights and buffers: each client's gradient and
    cross-entropy for its batch (its buffers updated in place, as a training forward does)."""

    def loss_of(
        p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(skeleton, ({**p, **frozen}, b), (x,), strict=True)
        loss = F.cross_entropy(out, y)
        return loss, loss.detach()

    step_fn: _StepFn = vmap(grad(loss_of, has_aux=True))
    return step_fn


def _client_batches(
    client_images: Sequence[torch.Tensor],
    contexts: Sequence[ClientContext],
    rngs: Sequence[np.random.Generator | None],
    algorithm: str,
    batch_size: int,
    local_epochs: int,
    local_steps: int | None,
) -> tuple[list[int], list[list[np.ndarray]]]:
    """Each client's number of local steps and its index batches, drawn from its generator as
    :func:`~fl.simulation.client.run_client` draws them."""
    sizes = [int(x.shape[0]) for x in client_images]
    for k, n in enumerate(sizes):
        if n == 0:
            raise ValueError(f"client {contexts[k].client} has no training examples")
        contexts[k].extras["client_size"] = n
    steps = [
        1 if algorithm == "fedsgd" else steps_for(n, batch_size, local_epochs, local_steps)
        for n in sizes
    ]
    batches = [
        _batches(n, batch_size, s, rng) for n, s, rng in zip(sizes, steps, rngs, strict=True)
    ]
    return steps, batches


def _step_groups(s: int, steps: list[int], batches: list[list[np.ndarray]]) -> list[list[int]]:
    """The clients that take local step ``s``, grouped by the size of their batch at it."""
    groups: dict[int, list[int]] = defaultdict(list)
    for k in range(len(steps)):
        if s < steps[k]:
            groups[len(batches[k][s])].append(k)
    return list(groups.values())


def _train_group(
    state: _StackedClients,
    step_fn: _StepFn,
    members: list[int],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    algorithm: str,
    lr: float,
    last_grads: list[dict[str, torch.Tensor]],
) -> torch.Tensor:
    """One local step of the clients ``members`` (rows of ``state``) on their batches ``x``,
    ``y``: FedSGD keeps the gradient in ``last_grads``, FedAvg steps the weights. Returns the
    members' losses."""
    names, params, buffers = state.names, state.params, state.buffers
    rows = torch.as_tensor(members, device=params[names[0]].device)
    whole = len(members) == len(last_grads)
    p = params if whole else {n: t[rows] for n, t in params.items()}
    b = buffers if whole else {n: t[rows] for n, t in buffers.items()}
    grads, loss = step_fn(p, b, x, y)
    if algorithm == "fedsgd":
        for j, k in enumerate(members):
            last_grads[k] = {n: grads[n][j] for n in names}
    else:
        with torch.no_grad():
            if whole:
                torch._foreach_add_(
                    [params[n] for n in names], [grads[n] for n in names], alpha=-lr
                )
            else:
                for n in names:
                    params[n][rows] = p[n] - lr * grads[n]
    if not whole:
        for n in buffers:
            buffers[n][rows] = b[n]
    return loss


def _client_losses(step_losses: list[tuple[list[int], torch.Tensor]], v: int) -> list[list[float]]:
    """Each client's losses in step order, one device-to-host copy per group, not per client."""
    losses: list[list[float]] = [[] for _ in range(v)]
    for members, loss in step_losses:
        for k, value in zip(members, loss.tolist(), strict=True):
            losses[k].append(value)
    return losses


def run_clients_vectorized(
    model: nn.Module,
    global_state: dict[str, torch.Tensor],
    client_images: Sequence[torch.Tensor],
    client_labels: Sequence[torch.Tensor],
    *,
    algorithm: str,
    lr: float,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    hooks: ClientHooks,
    contexts: Sequence[ClientContext],
    rngs: Sequence[np.random.Generator | None],
    local_epochs: int = 1,
    local_steps: int | None = None,
) -> list[ClientResult]:
    """Run every client's local work from ``global_state``; one :class:`ClientResult` per client,
    in order, as :func:`~fl.simulation.client.run_client` would return them one by one.

    ``model`` gives the architecture (it is not modified); ``client_images[k]`` (N_k, C, H, W)
    in [0, 1] and ``client_labels[k]`` are client k's data on the model's device; ``contexts`` and
    ``rngs`` are the clients' step contexts and batch-order generators.
    """
    obstacle = vectorization_obstacle(model, hooks)
    if obstacle is not None:
        raise ValueError(f"clients cannot be vectorised: {obstacle}")
    if algorithm not in ("fedsgd", "fedavg"):
        raise ValueError(f"unknown algorithm {algorithm!r}; expected 'fedsgd' or 'fedavg'")
    v = len(client_images)
    steps, batches = _client_batches(
        client_images, contexts, rngs, algorithm, batch_size, local_epochs, local_steps
    )
    skeleton = copy.deepcopy(model).to("meta").train()
    state = _StackedClients.from_global(model, global_state, v)
    step_fn = _vectorized_step(skeleton, state.frozen)
    step_losses: list[tuple[list[int], torch.Tensor]] = []
    last_grads: list[dict[str, torch.Tensor]] = [{} for _ in range(v)]
    for s in range(max(steps)):
        for members in _step_groups(s, steps, batches):
            idx = [torch.as_tensor(batches[k][s], device=client_images[k].device) for k in members]
            x01 = torch.stack([client_images[k][i] for k, i in zip(members, idx, strict=True)])
            x = normalize(x01.flatten(0, 1), mean, std).view_as(x01)
            y = torch.stack([client_labels[k][i] for k, i in zip(members, idx, strict=True)])
            loss = _train_group(
                state, step_fn, members, x, y, algorithm=algorithm, lr=lr, last_grads=last_grads
            )
            step_losses.append((members, loss))
            for j, k in enumerate(members):
                contexts[k].step = s
                contexts[k].batch_indices = idx[j]

    return _client_results(
        state,
        global_state,
        batches,
        steps,
        _client_losses(step_losses, v),
        last_grads,
        algorithm=algorithm,
        hooks=hooks,
        contexts=contexts,
    )


def _client_results(
    state: _StackedClients,
    global_state: dict[str, torch.Tensor],
    batches: list[list[np.ndarray]],
    steps: list[int],
    losses: list[list[float]],
    last_grads: list[dict[str, torch.Tensor]],
    *,
    algorithm: str,
    hooks: ClientHooks,
    contexts: Sequence[ClientContext],
) -> list[ClientResult]:
    """Each client's :class:`ClientResult` once the local steps are done: its outgoing message
    (through the hooks' ``process_update``), buffers, positions used and mean loss."""
    names, params = state.names, state.params
    start = {n: global_state[n].detach() for n in names}
    results: list[ClientResult] = []
    for k in range(len(batches)):
        # positions in order of first use, as run_client records them
        used = list(dict.fromkeys(i for batch in batches[k] for i in batch.tolist()))
        result = last_grads[k] if algorithm == "fedsgd" else {n: params[n][k] for n in names}
        message = outgoing_message(algorithm, result, start, hooks, contexts[k])
        results.append(
            ClientResult(
                kind=MESSAGE_KIND[algorithm],
                message=message,
                buffers={n: t[k].clone() for n, t in state.buffers.items()},
                num_examples=len(used),
                local_steps=steps[k],
                loss=float(np.mean(losses[k])),
                used=used,
                trained_images=None,
            )
        )
    return results

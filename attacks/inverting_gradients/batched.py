"""Several victims of Inverting Gradients reconstructed in one batched optimisation.

A trial attacks many captured client steps (several clients, several rounds). Run one after
another, each Inverting Gradients attack (Geiping et al., NeurIPS 2020) is a long loop of small
double-backward passes; stacking V victims and running ONE loop over all of them keeps an
accelerator busy. With ``torch.func`` the per-victim objective of eq. 4,

    L_v(x_v) = 1 - cos(grad_W l(F_{W_v}(x_v), y_v), g_v) + tv * TV(x_v),

is evaluated for every victim at once (``vmap`` over ``grad`` of a ``functional_call`` with
victim ``v``'s weights ``W_v``), and the gradient of ``sum_v L_v`` w.r.t. the stacked dummy
images is victim ``v``'s own gradient in slice ``v``. Since the optimiser (Adam on the sign of
the gradient, step decay, box) is elementwise, each victim follows the trajectory of its own
``attack.run`` -- same initial dummy images, labels and steps -- up to float rounding.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from attacks._machinery.objectives import (
    cosine_distance,
    layer_weights,
    soft_cross_entropy,
    total_variation,
    weighted_sq_norm,
)
from attacks._machinery.optim import run_signed_adam_batched
from attacks._machinery.setup import InversionSetup
from attacks.base import Attempt, build_reconstruction, local_rng, restart_generator
from attacks.inverting_gradients.params import InvertingGradientsParams
from attacks.labels.plans import LabelPlan, plan_labels
from attacks.reconstruction import Reconstruction
from fl.models.base import SplitModel
from fl.simulation.observation import Observation

__all__ = ["run_batched", "victims_obstacle"]


def victims_obstacle(observations: Sequence[Observation]) -> str | None:
    """Why these victims cannot share one batched optimisation, or None: they must be FedSGD
    gradient observations of one architecture (weights may differ per victim: they are stacked
    and vmapped over), batch and image shape and message parameters, on one device, of a
    deterministic model without an extra training loss (no dropout, no PRECODE bottleneck)."""
    first = observations[0]
    for obs in observations:
        if obs.kind != "gradient":
            return "not a FedSGD gradient observation"
        if obs.device != first.device:
            return "victims on different devices"
        if (obs.num_examples, obs.image_shape) != (first.num_examples, first.image_shape):
            return "different batch or image shapes"
        if not _same_architecture(obs.model, first.model):
            return "different architectures"
        if set(obs.message) != set(first.message):
            return "different message parameters"
        if _has_randomness_or_auxiliary_loss(obs.model):
            return "stochastic model or extra training loss"
    return None


def _same_architecture(a: nn.Module, b: nn.Module) -> bool:
    """Same module tree (type and printed layout) and the same tensor names, shapes, dtypes."""

    def layout(m: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        tensors = [*m.named_parameters(), *m.named_buffers()]
        return [(n, tuple(t.shape), t.dtype) for n, t in tensors]

    return type(a) is type(b) and str(a) == str(b) and layout(a) == layout(b)


def _has_randomness_or_auxiliary_loss(model: nn.Module) -> bool:
    """Dropout, a non-identity bottleneck (e.g. PRECODE: sampling and a KL term read after the
    forward) or any other ``auxiliary_loss``: not expressible as a pure function for ``vmap``."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        return True
    if isinstance(model, SplitModel):
        return not isinstance(model.bottleneck, nn.Identity)
    return callable(getattr(model, "auxiliary_loss", None))


class _BatchStatsNorm(nn.Module):
    """Training-mode BatchNorm from plain tensor ops: normalise by the batch mean and biased
    variance over every dim but the channels, then scale and shift (``weight``/``bias`` keep
    their names so the victims' parameters swap in). Reads and updates no running statistics.

    Why not ``nn.BatchNorm`` itself: under ``vmap``, the derivative w.r.t. the input of
    ``grad`` through the fused ``native_batch_norm`` is wrong in training mode (about 1e-3
    relative on the Inverting-Gradients ConvNet even in float64, seen with PyTorch 2.15; the
    same expression without vmap, or this decomposition with it, matches finite differences),
    likely the batch-norm backward batching rule of pytorch/functorch#534."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.weight = bn.weight
        self.bias = bn.bias
        self.eps = bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) -> (B, C, ...), each channel normalised over the batch and space."""
        if x.numel() == x.shape[1]:
            raise ValueError(f"expected more than 1 value per channel in training, got {x.shape}")
        dims = [0, *range(2, x.ndim)]
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, correction=0, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        shape = [1, -1] + [1] * (x.ndim - 2)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y


def _with_batch_stats_norm(model: nn.Module) -> nn.Module:
    """``model`` (changed in place) with every BatchNorm replaced by :class:`_BatchStatsNorm`:
    what a separate run computes, since the observation model is in training mode."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, name, _BatchStatsNorm(child))
    return model


def _stacked(
    own: list[dict[str, torch.Tensor]], names: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, int | None]]:
    """The victims' copies of the tensors ``names`` (``own[v]``: victim ``v``'s by name) and
    their vmap ``in_dims``: a tensor equal for every victim (clients of one round) is shared
    as is (in_dim None), others are stacked along a new dim 0 (in_dim 0)."""
    tensors: dict[str, torch.Tensor] = {}
    dims: dict[str, int | None] = {}
    for n in names:
        copies = [o[n].detach() for o in own]
        if all(torch.equal(c, copies[0]) for c in copies[1:]):
            tensors[n], dims[n] = copies[0], None
        else:
            tensors[n], dims[n] = torch.stack(copies), 0
    return tensors, dims


def run_batched(
    name: str,
    p: InvertingGradientsParams,
    observations: list[Observation],
    setups: list[InversionSetup],
) -> list[Reconstruction]:
    """Inverting Gradients over all victims in one optimisation (the checks of
    :func:`victims_obstacle` passed). Each victim starts from the dummy images and labels of
    restart 0 of a separate run; BatchNorm uses each victim's own batch statistics as in
    training mode, without touching the running statistics; ``seconds`` of each
    reconstruction is its share (1/V) of the wall time."""
    device = observations[0].device
    t0 = time.perf_counter()
    with local_rng(device):
        starts = []
        for obs, setup in zip(observations, setups, strict=True):
            gen = restart_generator(device, p.seed, 0)
            starts.append(
                (setup.dummy(gen, p.init).detach(), plan_labels(p.labels, "infer", obs, setup, gen))
            )
    x = torch.stack([dummy for dummy, _ in starts]).requires_grad_(True)
    plans = [plan for _, plan in starts]
    objective = _batched_objective(p, observations, setups, x, plans)
    lower = torch.stack([s.lower for s in setups]) if p.boxed else None
    upper = torch.stack([s.upper for s in setups]) if p.boxed else None
    losses, steps, diverged = run_signed_adam_batched(
        x,
        objective,
        iterations=p.iterations,
        lr=p.lr,
        lower=lower,
        upper=upper,
        decay=p.decay,
        signed=p.signed,
    )
    share = (time.perf_counter() - t0) / len(observations)
    return [
        build_reconstruction(
            name,
            obs,
            Attempt(x[v], plan.final_labels(), losses[v], steps[v], diverged[v], plan.source),
            share,
            [losses[v]],
        )
        for v, (obs, plan) in enumerate(zip(observations, plans, strict=True))
    ]


def _batched_objective(
    p: InvertingGradientsParams,
    observations: list[Observation],
    setups: list[InversionSetup],
    x: torch.Tensor,
    plans: list[LabelPlan],
) -> Callable[[], torch.Tensor]:
    """The (V,) per-victim losses of eq. 4 at the stacked dummy images ``x``, as a closure."""
    names = setups[0].names
    labels = torch.stack([plan.targets() for plan in plans])
    targets = [torch.stack([s.target[i] for s in setups]) for i in range(len(names))]
    weights = layer_weights(p.layer_weights, len(names), x.device)
    target_sq_norms = torch.stack([weighted_sq_norm(s.target, weights) for s in setups])
    # The architecture, with BatchNorm written out (see _BatchStatsNorm); the victims' tensors
    # are swapped in by functional_call.
    template = _with_batch_stats_norm(copy.deepcopy(observations[0].model)).train()
    own = [dict([*o.model.named_parameters(), *o.model.named_buffers()]) for o in observations]
    params, param_dims = _stacked(own, [n for n, _ in template.named_parameters()])
    buffers, buffer_dims = _stacked(own, [n for n, _ in template.named_buffers()])
    matched = {n: params.pop(n) for n in names}
    matched_dims = {n: param_dims.pop(n) for n in names}

    def victim_loss(
        x_v: torch.Tensor,
        matched_v: dict[str, torch.Tensor],
        rest_v: dict[str, torch.Tensor],
        buffers_v: dict[str, torch.Tensor],
        target_v: list[torch.Tensor],
        target_sq_norm_v: torch.Tensor,
        labels_v: torch.Tensor,
    ) -> torch.Tensor:
        """One victim's eq. 4: the cosine distance between the dummy batch's gradient w.r.t.
        the matched parameters and the observed one, plus ``tv`` times its total variation."""

        def train_loss(matched_p: dict[str, torch.Tensor]) -> torch.Tensor:
            state = ({**rest_v, **matched_p}, buffers_v)
            return soft_cross_entropy(functional_call(template, state, (x_v,)), labels_v)

        dummy = grad(train_loss)(matched_v)
        loss = cosine_distance(
            [dummy[n] for n in names], target_v, weights, target_sq_norm=target_sq_norm_v
        )
        if p.tv > 0:
            loss = loss + p.tv * total_variation(x_v)
        return loss

    losses_of = vmap(victim_loss, in_dims=(0, matched_dims, param_dims, buffer_dims, 0, 0, 0))
    return lambda: losses_of(x, matched, params, buffers, targets, target_sq_norms, labels)

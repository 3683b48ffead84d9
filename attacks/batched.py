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
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from attacks.base import Attack
from attacks.gradient import InvertingGradients, InvertingGradientsParams, _layer_weights
from attacks.label_modes import LabelPlan, plan_labels
from attacks.objectives import (
    cosine_distance,
    soft_cross_entropy,
    total_variation,
    weighted_sq_norm,
)
from attacks.optim import run_signed_adam_batched
from attacks.reconstruction import Reconstruction
from attacks.setup import InversionSetup
from attacks.threat import AttackerCapabilities
from fl.models.base import SplitModel
from fl.simulation.normalization import denormalize
from fl.simulation.observation import Observation

__all__ = ["batching_obstacle", "run_inverting_gradients_batched"]


def run_inverting_gradients_batched(
    attack: InvertingGradients,
    observations: Sequence[Observation],
    capabilities: AttackerCapabilities | None = None,
) -> list[Reconstruction]:
    """Reconstruct every victim in ``observations`` as ``[attack.run(o, capabilities) for o in
    observations]`` would, but in one batched optimisation when possible.

    Batched case: FedSGD gradient observations (``kind == "gradient"``) of the same
    architecture (weights may differ per victim: they are stacked and vmapped over), the same
    batch and image shape and the same matched parameters, on one device, with
    ``restarts == 1``, fixed labels (granted or inferred, not ``labels="soft"``) and a
    deterministic model without an extra training loss (no dropout, no PRECODE bottleneck).
    Each victim gets its own generator seeded like the single restart of ``attack.run``, so its
    initial dummy images and labels are those of a separate run; BatchNorm uses each victim's
    own batch statistics as in training mode, without touching the running statistics.

    Anything else (one victim, FedAvg weights, several restarts, soft labels, mixed
    architectures, ...) falls back to separate ``attack.run`` calls; :func:`batching_obstacle`
    says why.

    Differences from separate runs: results agree up to float rounding (the batched kernels sum
    in another order); ``seconds`` of each reconstruction is its share (1/V) of the batched
    wall time; the observation models' BatchNorm running statistics are left unchanged (a
    separate run's forward passes update them, which never affects its training-mode result).
    """
    restricted = [capabilities.restrict(o) if capabilities is not None else o for o in observations]
    for obs in restricted:
        attack.requirements_for(obs).check(obs, attack.name)
    if batching_obstacle(attack, restricted) is not None:
        return [attack.run(o, capabilities) for o in observations]
    p = attack.params
    assert isinstance(p, InvertingGradientsParams)
    setups = [
        InversionSetup.from_observation(o, ignore=p.ignore_layers, include=p.layers)
        for o in restricted
    ]
    if any(s.names != setups[0].names for s in setups):
        return [attack.run(o, capabilities) for o in observations]
    return _run_batched(attack, p, restricted, setups)


def batching_obstacle(attack: Attack, observations: Sequence[Observation]) -> str | None:
    """Why these (already restricted) victims cannot be reconstructed in one batched
    optimisation by :func:`run_inverting_gradients_batched`, or None when they can."""
    p = attack.params
    if type(attack).attempt is not InvertingGradients.attempt or not isinstance(
        p, InvertingGradientsParams
    ):
        return "not Inverting Gradients (or its attempt is overridden)"
    if len(observations) < 2:
        return "fewer than two victims"
    if p.restarts != 1:
        return "more than one restart"
    if p.labels == "soft":
        return "optimised soft labels"
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
        if _has_randomness_or_extra_loss(obs.model):
            return "stochastic model or extra training loss"
    return None


def _same_architecture(a: nn.Module, b: nn.Module) -> bool:
    """Same module tree (type and printed layout) and the same tensor names, shapes, dtypes."""

    def layout(m: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        tensors = [*m.named_parameters(), *m.named_buffers()]
        return [(n, tuple(t.shape), t.dtype) for n, t in tensors]

    return type(a) is type(b) and str(a) == str(b) and layout(a) == layout(b)


def _has_randomness_or_extra_loss(model: nn.Module) -> bool:
    """Dropout, a non-identity bottleneck (e.g. PRECODE: sampling and a KL term read after the
    forward) or any other ``extra_loss``: not expressible as a pure function for ``vmap``."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        return True
    if isinstance(model, SplitModel):
        return not isinstance(model.bottleneck, nn.Identity)
    return callable(getattr(model, "extra_loss", None))


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


def _run_batched(
    attack: InvertingGradients,
    p: InvertingGradientsParams,
    observations: list[Observation],
    setups: list[InversionSetup],
) -> list[Reconstruction]:
    """The batched optimisation of :func:`run_inverting_gradients_batched` (checks done)."""
    device = observations[0].device
    count = len(observations)
    t0 = time.perf_counter()
    seed = p.seed * 1000  # attack.run's seed of restart 0
    xs: list[torch.Tensor] = []
    plans: list[LabelPlan] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for obs, setup in zip(observations, setups, strict=True):
            torch.manual_seed(seed)
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
            xs.append(setup.dummy(gen, p.init).detach())
            plans.append(plan_labels(p.labels, "infer", obs, setup, gen))
    x = torch.stack(xs).requires_grad_(True)
    labels = torch.stack([plan.targets() for plan in plans])
    names = setups[0].names
    targets = [torch.stack([s.target[i] for s in setups]) for i in range(len(names))]
    weights = _layer_weights(p.layer_weights, len(names), device)
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

    def objective() -> torch.Tensor:
        """The (V,) per-victim losses at the current stacked dummy images."""
        return losses_of(x, matched, params, buffers, targets, target_sq_norms, labels)

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
    share = (time.perf_counter() - t0) / count
    results = []
    for v, (obs, plan) in enumerate(zip(observations, plans, strict=True)):
        images = denormalize(x[v].detach(), obs.mean, obs.std).clamp(0, 1).cpu()
        results.append(
            Reconstruction(
                images=images,
                labels=plan.final_labels().detach().cpu(),
                attack=attack.name,
                loss=losses[v],
                iterations=steps[v],
                seconds=share,
                diverged=diverged[v],
                restart_losses=[losses[v]],
                label_source=plan.source,
            )
        )
    return results

"""Analytic recovery of the input through a fully connected first layer with bias (Phong et al.,
IEEE TIFS 2018, sec. 3; Geiping et al., NeurIPS 2020, sec. 3).

For ``y = W x + b`` as the model's first layer, ``dl/dW_i = (dl/db_i) x``: every row ``i`` with
``dl/db_i != 0`` gives ``x = (dl/dW_i) / (dl/db_i)``, exact at batch 1. At batch B,
``dl/dW_i = sum_n delta_ni x_n``: a ReLU row that only one image activates still gives that image,
rows active for several give mixtures. A FedAvg update of K plain-SGD steps is
``-lr sum_k`` of the steps' gradients, so its rows are ``sum_k,n delta_kni x_n`` over the
bias's ``sum_k,n delta_kni``: a row that one image alone activates, in every step, still gives
it exactly (our extension; the papers treat one gradient). The images are chosen by the
attacker's own consistency (:func:`choose_images`), never by the ground truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from attacks._machinery.setup import InversionSetup
from attacks.base import Attack, AttackParams, Attempt, local_rng, register_attack
from attacks.labels.plans import plan_labels
from attacks.public import AttackerResources
from attacks.threat import AttackerCapabilities, Requirements, ThreatModelError
from fl.simulation.observation import MessageKind, Observation

__all__ = ["Analytic", "AnalyticParams", "Candidates", "choose_images", "first_linear_layer"]


class AnalyticParams(AttackParams):
    """Parameters of the analytic attack. It is closed-form and deterministic: ``iterations``
    and ``exact_convolutions`` are unused, every restart returns the same result (keep
    ``restarts=1``), ``seed`` changes nothing. Labels are granted or inferred from the last
    layer (no soft labels: there is no optimisation to learn them)."""

    iterations: int = Field(1, ge=1, description="Unused: the attack is closed-form.")
    labels: Literal["auto", "known", "infer"] = Field(
        "auto",
        description="How the attack obtains the batch's labels: 'known' (granted: "
        "knows_labels), 'infer' (read off the last layer's update) or 'auto' (known when "
        "granted, else 'infer'); no 'soft': nothing is optimised.",
    )
    min_bias_grad: float = Field(
        1e-4,
        ge=0,
        lt=1,
        description="Rows whose |dl/db_i| is below this fraction of the largest |dl/db| are "
        "ignored: their ratio dW_i / db_i is dominated by rounding.",
    )
    agreement: float = Field(
        2e-3,
        gt=0,
        description="Two rows' ratios are the same image when their difference has an RMS below "
        "this, in [0, 1] pixel units (2e-3 is 54 dB PSNR).",
    )


@dataclass(frozen=True)
class FirstLayer:
    """The names of the first Linear layer's weight and bias in the model and the message."""

    weight: str
    bias: str


def _parametrised_leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules that own parameters directly, with their names."""
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            yield name, module


def _probe_first_layer(
    model: nn.Module, image_shape: tuple[int, int, int], device: torch.device
) -> tuple[str, nn.Module, torch.Tensor, torch.Tensor]:
    """Run one probe image through ``model`` (eval mode, no grad, caller's RNG untouched) and
    return the first parametrised module called, its name, its input and the probe."""
    calls: list[tuple[str, nn.Module, torch.Tensor]] = []

    def recorder(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if not calls and args:
                calls.append((name, module, args[0].detach()))

        return hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in _parametrised_leaves(model)]
    modes = {m: m.training for m in model.modules()}
    probe = torch.linspace(-1.0, 1.0, steps=int(torch.Size(image_shape).numel()), device=device)
    probe = probe.view(1, *image_shape)
    try:
        model.eval()
        with local_rng(device), torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    if not calls:
        raise ThreatModelError("attack 'analytic' needs a model with parameters")
    name, module, inputs = calls[0]
    return name, module, inputs, probe


def first_linear_layer(model: nn.Module, image_shape: tuple[int, int, int]) -> FirstLayer:
    """Check that the model's first parametrised layer is an ``nn.Linear`` with bias fed the
    flattened input image, and return its parameter names.

    Args:
        model: the server's copy of the architecture.
        image_shape: (C, H, W) of the model's inputs.

    Raises:
        ThreatModelError: the first layer is not a Linear with bias on the flattened image (the
            message names the layer and the attacks that apply instead).

    Example:
        >>> first_linear_layer(models.build("mlp", channels=1, classes=2, image_size=28),
        ...                    (1, 28, 28))  # doctest: +SKIP
        FirstLayer(weight='features.1.weight', bias='features.1.bias')
    """
    device = next(model.parameters()).device
    name, module, inputs, probe = _probe_first_layer(model, image_shape, device)
    instead = "use an optimisation attack instead (inverting_gradients, idlg, dlm_plus)"
    if not isinstance(module, nn.Linear):
        raise ThreatModelError(
            f"attack 'analytic' inverts a fully connected first layer (x = dW_i / db_i), but "
            f"this model's first parametrised layer {name!r} is a {type(module).__name__}; "
            f"{instead}"
        )
    if module.bias is None:
        raise ThreatModelError(
            f"attack 'analytic' needs the bias gradient of the first layer {name!r} "
            f"(x = dW_i / db_i), but that nn.Linear has no bias; {instead}"
        )
    if inputs.shape != (1, probe[0].numel()) or not torch.equal(inputs, probe.flatten(1)):
        raise ThreatModelError(
            f"attack 'analytic' needs the first Linear layer {name!r} to receive the flattened "
            f"input image, but something transforms the image before it; {instead}"
        )
    names = {id(p): n for n, p in model.named_parameters()}
    return FirstLayer(weight=names[id(module.weight)], bias=names[id(module.bias)])


@dataclass
class Candidates:
    """The usable rows of the first layer: their ratios ``dW_i / db_i`` in [0, 1] pixel units
    (denormalised, flattened), and their bias gradients (the rows' weights in a fit)."""

    pixels: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def from_gradients(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        min_bias_grad: float,
    ) -> Candidates:
        """Rows with ``|db_i| > min_bias_grad * max |db|`` (and non-zero), in float64;
        ``mean``/``std`` are the per-pixel normalisation, flattened like a row."""
        w, b = weight.detach().double().flatten(1), bias.detach().double()
        scale = float(b.abs().max()) if b.numel() else 0.0
        keep = (b.abs() > min_bias_grad * scale) & (b != 0)
        ratios = w[keep] / b[keep, None]
        return cls(pixels=ratios * std + mean, bias=b[keep])

    def fit(self, rows: torch.Tensor) -> torch.Tensor:
        """The least-squares image of ``rows`` (``dW_i ~= db_i x`` for all of them): the
        ratios averaged with weights ``db_i^2``."""
        w = self.bias[rows] ** 2
        return (w[:, None] * self.pixels[rows]).sum(0) / w.sum()


def _clusters(cand: Candidates, agreement: float) -> list[torch.Tensor]:
    """Leader clustering of the ratios: rows in order of decreasing |db_i| each start a cluster
    of the unassigned rows within ``agreement`` (RMS, pixel units) of it."""
    n, d = cand.pixels.shape
    dist = torch.cdist(cand.pixels, cand.pixels) / d**0.5
    free = torch.ones(n, dtype=torch.bool)
    out: list[torch.Tensor] = []
    for i in torch.argsort(cand.bias.abs(), descending=True).tolist():
        if not free[i]:
            continue
        members = torch.nonzero(free & (dist[i] <= agreement)).flatten()
        free[members] = False
        out.append(members)
    return out


def _box_violation(pixels: torch.Tensor) -> float:
    """Mean distance of the pixels outside [0, 1]: 0 for any real image."""
    return float((pixels.clamp_max(0).abs() + (pixels - 1).clamp_min(0)).mean())


def choose_images(
    cand: Candidates, batch: int, agreement: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Pick ``batch`` images among the rows' ratios by the attacker's own consistency.

    Rule: cluster the ratios (:func:`_clusters`); one-image rows of the same image agree to
    rounding, mixtures almost never do. Clusters repeated by several rows come first (most rows
    first), then single rows by how far they leave the valid pixel box (a mixture's affine
    combination usually does, a real image never), then by |db_i|. Each chosen cluster gives
    its least-squares image. Missing images (fewer clusters than ``batch``) are the fit of all
    rows, a blurred batch average. Returns (batch, d) pixels in [0, 1] units (unclamped) and
    diagnostics (cluster counts and the attack loss: mean box violation plus in-cluster spread).

    Raises:
        ValueError: ``batch`` < 1.

    Example:
        >>> images, info = choose_images(cand, batch=4, agreement=2e-3)  # doctest: +SKIP
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1; got {batch}")
    d = cand.pixels.shape[1]
    if cand.bias.numel() == 0:
        grey = torch.full((batch, d), 0.5, dtype=torch.float64)
        return grey, {"candidate_rows": 0.0, "clusters": 0.0, "repeated_clusters": 0.0, "loss": 1.0}
    clusters = _clusters(cand, agreement)
    fits = [cand.fit(c) for c in clusters]
    violation = [_box_violation(f) for f in fits]
    order = sorted(
        range(len(clusters)),
        key=lambda k: (-len(clusters[k]), violation[k]),
    )
    chosen = order[:batch]
    images = [fits[k] for k in chosen]
    spread = [float(((cand.pixels[clusters[k]] - fits[k]) ** 2).mean().sqrt()) for k in chosen]
    filler = cand.fit(torch.arange(cand.bias.numel()))
    images += [filler] * (batch - len(images))
    loss = sum(violation[k] + s for k, s in zip(chosen, spread, strict=True)) / len(chosen)
    info = {
        "candidate_rows": float(cand.bias.numel()),
        "clusters": float(len(clusters)),
        "repeated_clusters": float(sum(len(c) > 1 for c in clusters)),
        "loss": loss,
    }
    return torch.stack(images), info


@register_attack("analytic")
class Analytic(Attack[AnalyticParams]):
    """Closed-form recovery x = dW_i / db_i through a fully connected first layer with bias.

    Phong et al. (IEEE TIFS 2018); Geiping et al. (NeurIPS 2020, sec. 3).

    ``x = dW_i / db_i`` for the model's first ``nn.Linear`` (after an optional Flatten): exact at
    batch 1, no optimisation. At batch B the rows active for one image alone give those images;
    the B returned are chosen by :func:`choose_images` (rows that agree with each other first).
    Works on FedSGD gradients and on FedAvg weights after any number of plain-SGD local steps
    (the update's rows are sums of the steps' ``delta x`` and the ratio is scale-free, so
    neither the learning rate nor the step count is needed; mixtures grow with the images a
    client sees); refuses models whose first layer is not a Linear with bias.
    """

    Params = AnalyticParams

    def requirements(self, kind: MessageKind | None = None) -> Requirements:
        """Gradients or weights, nothing granted (the ratio dW_i / db_i is scale-free)."""
        return Requirements(kinds=("gradient", "weights"))

    def restricted(
        self,
        obs: Observation,
        capabilities: AttackerCapabilities | None,
        resources: AttackerResources | None = None,
    ) -> Observation:
        """``obs`` as this attacker sees it; also refuses what the closed form cannot invert.

        Raises:
            ThreatModelError: a first layer that is not a Linear with bias on the flattened
                image (or missing from the message), or a missing requirement.
        """
        seen = super().restricted(obs, capabilities, resources)
        layer = first_linear_layer(seen.model, seen.image_shape)
        missing = [n for n in (layer.weight, layer.bias) if n not in seen.message]
        if missing:
            raise ThreatModelError(
                f"attack 'analytic' needs the first layer's {missing} in the message, which "
                "lacks them (frozen or withheld layers); use an optimisation attack instead"
            )
        return seen

    def attempt(self, obs: Observation, generator: torch.Generator, restart: int) -> Attempt:
        p = self.params
        layer = first_linear_layer(obs.model, obs.image_shape)
        setup = InversionSetup.from_observation(obs)
        full = dict(obs.message) if obs.kind == "gradient" else obs.weight_update()
        c = obs.image_shape[0]
        per_pixel = obs.image_shape[1] * obs.image_shape[2]
        stats = [torch.tensor(v, dtype=torch.float64).expand(c) for v in (obs.mean, obs.std)]
        mean, std = (s.repeat_interleave(per_pixel).to(obs.device) for s in stats)
        cand = Candidates.from_gradients(
            full[layer.weight], full[layer.bias], mean, std, p.min_bias_grad
        )
        pixels, info = choose_images(cand, setup.shape[0], p.agreement)
        normalised = ((pixels.clamp(0, 1) - mean) / std).to(setup.lower.dtype)
        x = normalised.view(setup.shape).clamp(setup.lower, setup.upper)
        plan = plan_labels(p.labels, "infer", obs, setup, generator)
        loss = info.pop("loss")
        return Attempt(x, plan.final_labels(), loss, 0, False, plan.source, extras=info)

"""Shadow defense: noise aimed at what a gradient-inversion attack would recover best.

Jiang, Ma, Yang, "Shadow defense against gradient inversion attack in federated learning",
arXiv 2506.15711 (Medical Image Analysis 2025); reference code tekap404/ShadowDef
``defense/client/client.py`` (``update_noise``, ``add_noise``, ``train_round``).

Before each local step the client attacks its own batch with a *shadow* attacker, measures per
pixel how well the shadow reconstructs it, and adds image noise that is largest where the
reconstruction is best, smaller on the region the global model finds diagnostically salient
(Grad-CAM), and growing over the rounds. The client then trains on the noised batch; the update
is sent as usual. See :class:`ShadowDefense` for the steps and the deviations from the paper.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from attacks import AttackerCapabilities, get_attack
from attacks.scoring.metrics import match
from defenses.base import Defense, DefenseParams, ParamSpec, register_defense
from fl.simulation import ClientContext, normalize, observe_client_step

__all__ = [
    "SHADOW_MODELS",
    "InvertingGradientsShadow",
    "ShadowDefense",
    "ShadowMaps",
    "ShadowModel",
    "ShadowParams",
    "equalize_histogram",
    "saliency_mask",
    "saliency_weight",
    "vulnerability_map",
]


class ShadowModel(Protocol):
    """A shadow attacker: reconstructs the client's own batch from the client's own update.

    Called as ``shadow(model, images, labels, ctx)`` with the global model at the client's
    current weights (which it must not modify: work on a copy), the private batch in [0, 1]
    (B, C, H, W) and the step's context; returns the reconstruction in [0, 1], same shape, with
    row ``i`` the reconstruction of ``images[i]``. In the paper this is a per-dataset StyleGAN3
    fine-tuned to the client's gradient; :class:`InvertingGradientsShadow` is the default here.
    """

    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ctx: ClientContext
    ) -> torch.Tensor: ...


class InvertingGradientsShadow:
    """The default shadow: a short Inverting Gradients attack (Geiping et al., NeurIPS 2020) on
    the FedSGD gradient of the batch, with the labels known.

    The gradient is taken on a copy of the model by :func:`fl.simulation.observe_client_step`
    (so the client's parameters and BatchNorm buffers are untouched); the attack's seed is drawn
    from ``ctx.generator``. Inverting Gradients recovers a batch only up to a permutation of
    same-label images, so the reconstructions are paired with the originals by one Hungarian
    assignment on MSE (:func:`attacks.scoring.metrics.match`). Scoring against the truth is
    legitimate here: it is the client looking at its own data, not an attacker.
    """

    def __init__(self, iterations: int, tv: float) -> None:
        """``iterations``: attack iterations per batch; ``tv``: total-variation weight."""
        self.iterations = iterations
        self.tv = tv

    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ctx: ClientContext
    ) -> torch.Tensor:
        """Reconstruct ``images`` from their gradient on (a copy of) ``model``; see the class."""
        gen = ctx.generator
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device).item())
        obs, _ = observe_client_step(
            model,
            images.detach(),
            labels.detach(),
            algorithm="fedsgd",
            mean=ctx.mean,
            std=ctx.std,
            reveal_labels=True,
        )
        attack = get_attack(
            "inverting_gradients", iterations=self.iterations, tv=self.tv, seed=seed
        )
        rec = attack.run(obs, AttackerCapabilities(knows_labels=True)).images
        truth = images.detach().cpu()
        order = match(rec, truth, cost="mse")
        return rec[order].to(device=images.device, dtype=images.dtype)


class ShadowParams(DefenseParams):
    """Hyperparameters of the shadow defense; defaults from ShadowDef's configs and paper."""

    scale: float = Field(
        0.19, ge=0, description="Noise amplitude relative to max(x), before exp(round/rounds)."
    )
    temperature: float = Field(
        20.0, gt=0, description="Softmax temperature of the error and noise maps."
    )
    saliency_share: float = Field(
        0.3, ge=0, le=1, description="Share of pixels marked salient by Grad-CAM (c = 1)."
    )
    momentum: float = Field(
        0.9, ge=0, le=1, description="Momentum of the per-example noise map across rounds."
    )
    shadow: Literal["inverting_gradients"] = Field(
        "inverting_gradients", description="The shadow attacker (see SHADOW_MODELS)."
    )
    shadow_iterations: int = Field(50, ge=1, description="Iterations of the shadow attack.")
    shadow_tv: float = Field(1e-4, ge=0, description="TV weight of the shadow attack.")


SHADOW_MODELS: dict[str, Callable[[ShadowParams], ShadowModel]] = {
    "inverting_gradients": lambda p: InvertingGradientsShadow(p.shadow_iterations, p.shadow_tv),
}
"""Shadow attackers selectable by the ``shadow`` hyperparameter: name -> factory from the
params. Any other :class:`ShadowModel` can be passed as ``ShadowDefense(shadow_model=...)``."""


@dataclass
class ShadowMaps:
    """The intermediate maps of one batch, all (B, H, W) on the images' device.

    Attributes:
        error: the shadow's per-pixel reconstruction error ``mean_c |x_hat - x|``.
        fresh: the vulnerability map of this step, :func:`vulnerability_map` of ``error``.
        vulnerability: ``fresh`` after momentum with the example's previous map (``n``).
        saliency: the binary Grad-CAM mask ``c`` (1 on the top ``saliency_share`` pixels).
        alpha: the saliency weight of the round, :func:`saliency_weight`.
        noise_map: ``n * (1 - alpha * c)`` (see :class:`ShadowDefense`, step 3).
        noise: the added noise, ``noise_map`` rescaled per image (step 4).
    """

    error: torch.Tensor
    fresh: torch.Tensor
    vulnerability: torch.Tensor
    saliency: torch.Tensor
    alpha: float
    noise_map: torch.Tensor
    noise: torch.Tensor


def equalize_histogram(values: torch.Tensor) -> torch.Tensor:
    """Histogram-equalise each row of ``values`` (B, N) to [0, 1].

    Rank-based (no binning): each value maps to its empirical CDF, the fraction of the row's
    values ``<=`` it, then ``(cdf - cdf_min) / (1 - cdf_min)`` so that the row's minimum maps to
    0 and its maximum to 1 (classic equalisation of a continuous histogram). Equal values map to
    equal outputs and the map is non-decreasing; a constant row maps to zeros. ShadowDef instead
    equalises the whole batch's luminance on a 256-bin histogram.
    """
    if values.dim() != 2:
        raise ValueError(f"expected (B, N) values, got shape {tuple(values.shape)}")
    n = values.shape[1]
    ordered = values.sort(dim=1).values.contiguous()
    cdf = torch.searchsorted(ordered, values.contiguous(), right=True).to(values.dtype) / n
    low = cdf.min(dim=1, keepdim=True).values
    span = 1.0 - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (cdf - low) / safe, torch.zeros_like(cdf))


def vulnerability_map(error: torch.Tensor, temperature: float) -> torch.Tensor:
    """The paper's noise map from a per-pixel reconstruction error (B, H, W).

    Per image: ``r = softmax_pixels(error / T)``, ``n1 = 1 / r``, ``n2 = equalise(n1)``
    (:func:`equalize_histogram`), ``n = softmax_pixels(n2 / T)`` -- ShadowDef ``update_noise``.
    Every step is monotone, so ``n`` is non-increasing in the error: largest where the shadow
    reconstructs best. Computed in float64 so that close errors are not merged by rounding.
    """
    if error.dim() != 3:
        raise ValueError(f"expected a (B, H, W) error map, got shape {tuple(error.shape)}")
    flat = error.reshape(error.shape[0], -1).to(torch.float64)
    r = torch.softmax(flat / temperature, dim=1)
    n2 = equalize_histogram(1.0 / r)
    n = torch.softmax(n2 / temperature, dim=1)
    return n.reshape(error.shape).to(error.dtype)


def saliency_weight(round_: int, rounds: int) -> float:
    """The weight alpha of the saliency term: ``clip(round / rounds, 0.1, 0.5)`` (ShadowDef
    ``add_noise``, ``min_cam_alpha``/``max_cam_alpha``); ``round_`` is 0-based."""
    return min(0.5, max(0.1, round_ / max(rounds, 1)))


def _last_conv(model: nn.Module) -> nn.Conv2d | None:
    """The last ``nn.Conv2d`` of ``model.features`` (of the whole model if it has none)."""
    root = getattr(model, "features", None)
    root = root if isinstance(root, nn.Module) else model
    convs = [m for m in root.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def saliency_scores(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ctx: ClientContext
) -> torch.Tensor:
    """Per-pixel saliency (B, H, W) of the true labels for ``model``; higher = more salient.

    Grad-CAM (Selvaraju et al., ICCV 2017) at the last Conv2d of ``model.features``: the
    activation maps weighted by the spatial mean of their gradients of the label's logit,
    summed over maps and upsampled bilinearly to the image size. The map is returned before
    Grad-CAM's ReLU: the ReLU does not change the order of the positive pixels, and this keeps a
    defined order where the ReLU would zero everything. Models without a Conv2d (MLPs) fall
    back to input-gradient saliency ``mean_c |d logit_y / d x|`` (Simonyan et al. 2014).
    ShadowDef uses Grad-CAM++ at the last ResNet block for class 1; Grad-CAM++ is not
    implemented here. Runs on a copy of the model in eval mode (parameters, buffers and
    training flags of ``model`` are untouched).
    """
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    x = images.detach().clone().requires_grad_(True)
    conv = _last_conv(work)
    if conv is None:
        logits = work(normalize(x, ctx.mean, ctx.std))
        score = logits.gather(1, labels.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, x)
        return grad.abs().mean(dim=1).detach()
    captured: list[torch.Tensor] = []
    handle = conv.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = work(normalize(x, ctx.mean, ctx.std))
    finally:
        handle.remove()
    acts = captured[-1]
    score = logits.gather(1, labels.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(score, acts)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = (weights * acts).sum(dim=1, keepdim=True)
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return cam[:, 0].detach()


def saliency_mask(scores: torch.Tensor, share: float) -> torch.Tensor:
    """Binary mask (B, H, W): 1 on the ``round(share * H * W)`` highest-scoring pixels of each
    image (ties broken by ``torch.topk``), 0 elsewhere -- ShadowDef's ``perc_cam`` top-k."""
    b = scores.shape[0]
    flat = scores.reshape(b, -1)
    k = round(share * flat.shape[1])
    mask = torch.zeros_like(flat)
    if k > 0:
        top = flat.topk(k, dim=1).indices
        mask.scatter_(1, top, 1.0)
    return mask.reshape(scores.shape)


@register_defense("shadow")
class ShadowDefense(Defense[ShadowParams]):
    """Shadow defense (Jiang, Ma, Yang 2025, arXiv 2506.15711): shadow-targeted image noise.

    For every private batch, in :meth:`transform_batch` (images x in [0, 1]):

    1. **Shadow inversion.** A shadow attacker (:class:`ShadowModel`; default
       :class:`InvertingGradientsShadow`, ``shadow_iterations`` iterations, TV ``shadow_tv``,
       labels known) reconstructs the batch from its gradient on a copy of the current model;
       the per-pixel error is ``r = mean_c |x_hat - x|`` (B, H, W).
    2. **Vulnerability map** (:func:`vulnerability_map`): ``softmax(r/T)``, its inverse,
       histogram equalisation (rank-based, to [0, 1]), ``softmax(./T)`` with ``T =
       temperature``, so the map ``n`` is largest where the shadow reconstructs best. ``n`` is
       kept per (client, example position ``ctx.batch_indices``) with momentum:
       ``n_t = momentum * n_{t-1} + (1 - momentum) * n_new`` when a previous map exists (no
       momentum when ``ctx.batch_indices`` is None).
    3. **Saliency.** Grad-CAM of the model passed in (the client's current weights) for the true
       label at the last Conv2d of ``model.features`` (:func:`saliency_scores`; MLPs: input
       gradient); the top ``saliency_share`` pixels get ``c = 1`` (:func:`saliency_mask`).
       ``alpha = clip(round / rounds, 0.1, 0.5)`` and the noise map is ``n * (1 - alpha * c)``.
    4. **Scale.** ``noise = noise_map * |max(x) / max(noise_map)| * scale * exp(round /
       rounds)`` per image (max over all channels and pixels), added to every channel:
       ``x_def = x + noise``. Not clamped to [0, 1], like the reference (clamping would cut the
       mostly positive noise on bright pixels); the normalised model input accepts any value.

    The client trains on ``x_def``; attacks are still scored against the original images.

    Where and why this deviates from the paper and ShadowDef (the shadow, the saliency term,
    error and equalisation, Grad-CAM, momentum): ``docs/deviations.md``.
    """

    Params = ShadowParams
    search_space: ClassVar[dict[str, ParamSpec]] = {
        "scale": ParamSpec(type="float", low=0.05, high=0.5),
        "temperature": ParamSpec(type="float", low=1.0, high=50.0, log=True),
        "saliency_share": ParamSpec(type="float", low=0.1, high=0.5),
        "shadow_iterations": ParamSpec(type="int", low=10, high=200, log=True),
    }

    def __init__(self, *, shadow_model: ShadowModel | None = None, **params: Any) -> None:
        """Validate ``params``; ``shadow_model`` replaces the shadow named by ``shadow``."""
        super().__init__(**params)
        p = self.params
        self.shadow_model: ShadowModel = shadow_model or SHADOW_MODELS[p.shadow](p)
        self._maps: dict[tuple[int, int], torch.Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        """The momentum maps, as ``[client, position, map]`` rows."""
        return {"maps": [[c, pos, m.detach().cpu()] for (c, pos), m in self._maps.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the momentum maps of :meth:`state_dict` (moved to the data's device on use)."""
        self._maps = {(int(c), int(pos)): m for c, pos, m in state.get("maps", [])}

    def previous_map(self, client: int, position: int) -> torch.Tensor | None:
        """The momentum map (H, W) kept for ``client``'s example at ``position``, if any."""
        return self._maps.get((client, position))

    def perturbation(
        self, images: torch.Tensor, labels: torch.Tensor, model: nn.Module, ctx: ClientContext
    ) -> ShadowMaps:
        """Compute the noise for one batch (steps 1-4 of the class docstring) and advance the
        momentum state; :meth:`transform_batch` adds ``.noise`` to the images."""
        p = self.params
        if images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W); got {tuple(images.shape)}")
        x = images.detach()
        devices = [x.device] if x.device.type == "cuda" else []
        # The shadow and Grad-CAM may draw from the global RNG (e.g. a stochastic bottleneck);
        # fork it so that the client's own training sees the same random stream as without us.
        with torch.random.fork_rng(devices=devices):
            rec = self.shadow_model(model, x, labels, ctx)
            if rec.shape != x.shape:
                raise ValueError(
                    f"shadow model returned shape {tuple(rec.shape)} for images {tuple(x.shape)}"
                )
            error = (rec.detach().to(x) - x).abs().mean(dim=1)
            fresh = vulnerability_map(error, p.temperature)
            vulnerability = self._momentum(fresh, ctx)
            saliency = saliency_mask(saliency_scores(model, x, labels, ctx), p.saliency_share)
        alpha = saliency_weight(ctx.round, ctx.rounds)
        noise_map = vulnerability * (1.0 - alpha * saliency)
        b = x.shape[0]
        peak_x = x.reshape(b, -1).amax(dim=1)
        peak_map = noise_map.reshape(b, -1).abs().amax(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
        gain = (peak_x / peak_map).abs() * p.scale * math.exp(ctx.round / max(ctx.rounds, 1))
        noise = noise_map * gain.view(b, 1, 1)
        return ShadowMaps(error, fresh, vulnerability, saliency, alpha, noise_map, noise)

    def _momentum(self, fresh: torch.Tensor, ctx: ClientContext) -> torch.Tensor:
        """Blend ``fresh`` with each example's previous map and store the result."""
        if ctx.batch_indices is None:
            return fresh
        positions = [int(i) for i in ctx.batch_indices.tolist()]
        if len(positions) != fresh.shape[0]:
            raise ValueError(
                f"ctx.batch_indices has {len(positions)} entries for a batch of {fresh.shape[0]}"
            )
        p = self.params
        m = p.momentum
        out = []
        for row, pos in zip(fresh, positions, strict=True):
            key = (ctx.client, pos)
            prev = self._maps.get(key)
            blended = row if prev is None else m * prev.to(row) + (1.0 - m) * row
            self._maps[key] = blended.detach().clone()
            out.append(blended)
        return torch.stack(out)

    def transform_batch(
        self, images: torch.Tensor, labels: torch.Tensor, model: nn.Module, ctx: ClientContext
    ) -> torch.Tensor:
        """Return ``images + noise`` (noise broadcast over channels; not clamped)."""
        maps = self.perturbation(images, labels, model, ctx)
        return images + maps.noise.unsqueeze(1).to(images.dtype)

"""Learning to obscure data: clients train on synthetic look-alikes of their private images.

Wan, Xu, Liu, Ren, Fan, Tang, "Learning to Obscure Data for Privacy-Preserving Federated
Learning" (arXiv 2206.00769). The paper's abstract: each client generates synthetic samples that
are "totally distinct from the original samples" yet "maximally preserve their predictive
features", and trains on them, so a gradient-leakage attack can only reconstruct obscured data.

No public code exists; this module implements the design fixed for Obscura (see the
:class:`Obscure` docstring for the objective and its equation numbers here).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from defenses.base import Defense, DefenseParams, ParamSpec, register_defense
from fl.models.base import SplitModel
from fl.simulation.hooks import ClientContext
from fl.simulation.normalization import normalize

__all__ = ["Obscure", "ObscureGenerator", "ObscureParams", "ObscureTerms"]


class ObscureParams(DefenseParams):
    """Hyperparameters of the obscuring generator and its objective (Eq. 1 of :class:`Obscure`)."""

    feature_weight: float = Field(1.0, ge=0, description="λ_f: weight of feature preservation.")
    distinct_weight: float = Field(1.0, ge=0, description="λ_d: weight of the distinctness hinge.")
    margin: float = Field(
        0.05, gt=0, le=1, description="m: per-image pixel MSE to reach (0.05 ≈ 13 dB PSNR)."
    )
    width: int = Field(16, ge=1, description="Channels of the generator's first layer.")
    steps: int = Field(5, ge=1, description="Adam steps on the generator per client batch.")
    generator_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the generator.")
    enforce_margin: bool = Field(
        True,
        description="Scale each image's perturbation up to the margin when training has not "
        "reached it yet, so no released image is closer than the margin (also on a first batch).",
    )
    residual: bool = Field(
        True,
        description="G(x) = sigmoid(logit(x) + δ(x)): a learned perturbation of the image "
        "(keeps its structure) rather than an image drawn from scratch.",
    )


class ObscureGenerator(nn.Module):
    """A small convolutional encoder-decoder ``G: [0,1]^{C×H×W} -> [0,1]^{C×H×W}``.

    Conv(C, w, 3)-ReLU at full resolution, Conv(w, 2w, 3, stride 2)-ReLU, Conv(2w, 2w, 3)-ReLU and
    Conv(2w, w, 3)-ReLU at half resolution, nearest-neighbour upsampling back to exactly H×W (so
    any input size works), Conv(w, C, 3), sigmoid. No normalisation layer, so G(x_i) depends on
    x_i alone (not on the rest of its batch).

    ``residual=False``: ``G(x) = sigmoid(head(h))``, an image drawn from scratch (no skip
    connection). ``residual=True`` (the default): ``G(x) = sigmoid(logit(x) + head(h))``, a learned
    perturbation in logit space. From-scratch generators left the shared model unable to
    generalise to real images (accuracy at or below the majority class on PneumoniaMNIST in
    ``benchmarks/defenses.py``); the residual form keeps the image's structure while the
    distinctness hinge pulls it away. Its head is randomly initialised, so G is never the identity,
    but at the default ``generator_lr`` it stays close to it for many batches: the distance to
    the original is then guaranteed by :func:`project_to_margin` (``enforce_margin``), while the
    learned part keeps the predictive features.
    """

    def __init__(self, channels: int, width: int, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] (B, C, H, W) to synthetic images in (0, 1) of the same shape."""
        h = F.interpolate(self.encoder(x), size=x.shape[-2:], mode="nearest")
        if self.residual:
            return torch.sigmoid(torch.logit(x.clamp(1e-3, 1 - 1e-3)) + self.head(h))
        return torch.sigmoid(self.head(h))


@torch.no_grad()
def project_to_margin(out: torch.Tensor, x: torch.Tensor, margin: float) -> torch.Tensor:
    """Scale each image's perturbation ``out - x`` so that its pixel MSE is at least ``margin``
    (then clamp to [0, 1]); images already far enough are unchanged. An untrained generator
    (a client's first batch) would otherwise release near-copies of the private images."""
    delta = out - x
    mse = delta.pow(2).flatten(1).mean(dim=1).clamp_min(1e-12)
    scale = torch.sqrt(margin / mse).clamp_min(1.0).view(-1, *([1] * (x.ndim - 1)))
    return (x + delta * scale).clamp(0.0, 1.0)


class ObscureTerms:
    """The three terms of the generator objective for one batch (Eq. 1a-1c), as tensors."""

    def __init__(self, task: torch.Tensor, feature: torch.Tensor, distinct: torch.Tensor) -> None:
        self.task = task
        self.feature = feature
        self.distinct = distinct

    def total(self, params: ObscureParams) -> torch.Tensor:
        """``L_task + λ_f · L_feat + λ_d · L_dist`` (Eq. 1)."""
        return (
            self.task
            + params.feature_weight * self.feature
            + params.distinct_weight * self.distinct
        )


class _FrozenModel:
    """Context manager: the model in eval mode (BatchNorm uses and keeps its running stats,
    dropout is off); every submodule's train/eval flag is restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes: dict[nn.Module, bool] = {}

    def __enter__(self) -> nn.Module:
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for module, mode in self.modes.items():
            module.training = mode


def _generator_seed(client: int, draw: int) -> int:
    """A 63-bit seed from the client id and one draw of the client step's generator."""
    state = np.random.SeedSequence([0x0B5C, client, draw]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


@register_defense("obscure")
class Obscure(Defense[ObscureParams]):
    """Learning to obscure data (Wan et al., arXiv 2206.00769): train on generated images.

    The paper has no public code; this is Obscura's own implementation of the design its
    abstract describes. Each client ``k`` owns a generator ``G_k`` (:class:`ObscureGenerator`,
    created on the client's first batch, its initial weights seeded from the client id and one
    draw of that step's ``ctx.generator``, so it is deterministic for a run seed). On every
    private batch ``(x, y)`` (images in [0, 1]) :meth:`transform_batch` takes ``steps`` Adam
    steps (lr ``generator_lr``; the Adam state persists across the client's batches and rounds)
    on ``G_k``'s parameters only, minimising

        L(G) = L_task + λ_f · L_feat + λ_d · L_dist                                    (1)
        L_task = CE(F(norm(G(x)); W), y)                                              (1a)
        L_feat = MSE(φ(norm(G(x)); W), stop_grad(φ(norm(x); W)))                      (1b)
        L_dist = mean_i relu(m − MSE(G(x_i), x_i)) / m                                (1c)

    with ``F`` the client's current model, ``φ`` its :meth:`~fl.models.SplitModel.forward_features`
    (the classifier's input), ``norm`` the dataset normalisation, ``m`` = ``margin`` (a per-image
    pixel MSE, so 0.05 ≈ 13 dB PSNR). (1a) and (1b) keep the predictive features, (1c) pushes each
    synthetic image at least ``m`` away from its original; it is divided by ``m`` so that it runs
    from 1 (a copy) to 0 (far enough) whatever the margin, on the scale of the cross-entropy —
    unnormalised, it could never exceed ``m · λ_d`` and the generator drifted back to copying.
    The model is evaluated in eval mode (BatchNorm running statistics neither used from the
    batch nor updated), its parameters are
    never changed, and its train/eval flags are restored. The client then trains on
    ``G_k(x)`` (returned detached); the simulator records those as ``trained_images`` while
    attacks are scored against the originals.
    """

    Params = ObscureParams
    search_space: ClassVar[dict[str, ParamSpec]] = {
        "feature_weight": ParamSpec(type="float", low=0.01, high=10.0, log=True),
        "distinct_weight": ParamSpec(type="float", low=0.01, high=10.0, log=True),
        "margin": ParamSpec(type="float", low=0.005, high=0.2, log=True),
        "width": ParamSpec(type="categorical", choices=(8, 16, 32)),
        "steps": ParamSpec(type="int", low=1, high=20),
    }
    params: ObscureParams

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.generators: dict[int, ObscureGenerator] = {}
        self.optimizers: dict[int, torch.optim.Adam] = {}
        self.last_losses: dict[int, list[float]] = {}
        """Per client: the objective (1) before each Adam step of its latest batch, then after."""

    def state_dict(self) -> dict[str, Any]:
        """Each client's generator weights, its Adam state and its latest losses."""
        return {
            "clients": {
                int(c): {
                    "channels": int(gen.head.out_channels),
                    "generator": {k: v.detach().cpu() for k, v in gen.state_dict().items()},
                    "optimizer": self.optimizers[c].state_dict(),
                    "last_losses": [float(v) for v in self.last_losses.get(c, [])],
                }
                for c, gen in self.generators.items()
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the clients' generators and optimizers from :meth:`state_dict` (on the CPU;
        :meth:`generator_for` moves them to the data's device on first use)."""
        self.generators, self.optimizers, self.last_losses = {}, {}, {}
        for client, entry in state.get("clients", {}).items():
            gen = ObscureGenerator(
                int(entry["channels"]), self.params.width, residual=self.params.residual
            )
            gen.load_state_dict(entry["generator"])
            opt = torch.optim.Adam(gen.parameters(), lr=self.params.generator_lr)
            opt.load_state_dict(entry["optimizer"])
            self.generators[int(client)] = gen
            self.optimizers[int(client)] = opt
            self.last_losses[int(client)] = list(entry["last_losses"])

    def generator_for(self, images: torch.Tensor, ctx: ClientContext) -> ObscureGenerator:
        """The client's generator, created (deterministically seeded) on its first batch."""
        gen = self.generators.get(ctx.client)
        if gen is not None:
            if next(gen.parameters()).device != images.device:  # restored from a checkpoint
                gen.to(images.device)
                opt = self.optimizers[ctx.client]
                opt.load_state_dict(opt.state_dict())  # casts Adam's moments to the new device
            return gen
        draw = int(torch.randint(0, 2**62, (1,), generator=ctx.generator, device=ctx.device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_generator_seed(ctx.client, draw))
            gen = ObscureGenerator(
                int(images.shape[1]), self.params.width, residual=self.params.residual
            )
        gen = gen.to(device=images.device, dtype=images.dtype)
        self.generators[ctx.client] = gen
        self.optimizers[ctx.client] = torch.optim.Adam(
            gen.parameters(), lr=self.params.generator_lr
        )
        return gen

    def objective(
        self,
        generator: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        model: nn.Module,
        ctx: ClientContext,
    ) -> ObscureTerms:
        """The terms of Eq. (1) for ``generator`` on the batch; the model must be in eval mode.

        Raises:
            TypeError: if ``feature_weight > 0`` and the model has no ``forward_features``.
        """
        synthetic = generator(images)
        inputs = normalize(synthetic, ctx.mean, ctx.std)
        if self.params.feature_weight > 0:
            forward_features = getattr(model, "forward_features", None)
            if not callable(forward_features):
                raise TypeError(
                    f"obscure's feature term needs model.forward_features (a SplitModel); "
                    f"{type(model).__name__} has none: use feature_weight=0 or a SplitModel"
                )
            feats = forward_features(inputs)
            # A SplitModel's logits are classifier(forward_features(x)): reuse the features.
            logits = model.classifier(feats) if isinstance(model, SplitModel) else model(inputs)
            with torch.no_grad():
                target = forward_features(normalize(images, ctx.mean, ctx.std))
            feature = F.mse_loss(feats, target)
        else:
            logits = model(inputs)
            feature = torch.zeros((), device=images.device, dtype=images.dtype)
        task = F.cross_entropy(logits, labels)
        per_image = (synthetic - images).pow(2).flatten(1).mean(dim=1)
        distinct = (F.relu(self.params.margin - per_image) / self.params.margin).mean()
        return ObscureTerms(task, feature, distinct)

    def transform_batch(
        self, images: torch.Tensor, labels: torch.Tensor, model: nn.Module, ctx: ClientContext
    ) -> torch.Tensor:
        """Train the client's generator on the batch (Eq. 1, ``steps`` Adam steps on G only)
        and return the obscured images ``G(x)`` (detached, in [0, 1], same shape).

        Raises:
            FloatingPointError: if the objective becomes non-finite (the generator would be
                corrupted for the rest of the run).
        """
        if images.shape[0] == 0:
            return images
        gen = self.generator_for(images, ctx)
        opt = self.optimizers[ctx.client]
        params = list(gen.parameters())
        x = images.detach()
        losses: list[float] = []
        with _FrozenModel(model):
            for _ in range(self.params.steps):
                loss = self.objective(gen, x, labels, model, ctx).total(self.params)
                if not bool(torch.isfinite(loss)):
                    raise FloatingPointError(
                        f"obscure: non-finite generator objective {float(loss)} for client "
                        f"{ctx.client} (round {ctx.round}, step {ctx.step}); lower generator_lr"
                    )
                grads = torch.autograd.grad(loss, params)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
            with torch.no_grad():
                losses.append(float(self.objective(gen, x, labels, model, ctx).total(self.params)))
                out: torch.Tensor = gen(x)
        self.last_losses[ctx.client] = losses
        if self.params.enforce_margin:
            out = project_to_margin(out, x, self.params.margin)
        return out.detach()

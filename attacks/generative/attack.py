"""``gias``: Gradient Inversion with Generative Image Prior (Jeon, Kim, Lee, Oh, Ok, NeurIPS
2021; code ml-postech/gradient-inversion-generative-image-prior,
``inversefed/reconstruction_algorithms.py``).

Two phases against one cosine gradient-matching loss (Inverting Gradients' eq. 4, plus TV):
(1) latent search: Adam on the codes ``z`` of a generator trained on public images, from
``latent_restarts`` random starts, keeping the best; (2) parameter search: one copy of the
generator per image, fine-tuned by Adam from its best code, so that the reconstruction may
leave the generator's range where the gradient asks for it. Both phases decay the step by 0.1
at 3/8, 5/8 and 7/8 of their iterations, as the reference does.

Deviations: the generator is a DCGAN the attacker trains on its own public images
(:mod:`attacks.generative.generator`; the paper used pretrained ones); the reference's
restarts each fine-tune the same best code, here the code is fine-tuned once; the fine-tuning
keeps its lowest-loss iterate (the reference its last) and steps at lr 1e-4 (see
:class:`attacks.generative.params.GIASParams`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from attacks._machinery.matching import matching
from attacks._machinery.objectives import cosine_distance, total_variation, weighted_sq_norm
from attacks._machinery.setup import InversionSetup
from attacks.base import Attack, Attempt, register_attack
from attacks.generative.generator import Generator, GeneratorCache
from attacks.generative.params import GIASParams
from attacks.labels.plans import plan_labels
from attacks.public import PublicData
from attacks.threat import Requirements, ThreatModelError
from fl.simulation.normalization import normalize
from fl.simulation.observation import MessageKind, Observation

Loss = Callable[[torch.Tensor], torch.Tensor]
"""Images (B, C, H, W) in [0, 1] -> the gradient-matching loss."""


@register_attack("gias")
class GIAS(Attack[GIASParams]):
    """Gradient Inversion with Generative Image Prior (Jeon et al., NeurIPS 2021): latent search
    in a generator trained on public images, then per-image generator fine-tuning, both matching
    the update by cosine distance. Labels granted or inferred; FedAvg updates are unrolled as
    in Inverting Gradients. The generator is trained once per trial (its cost is in the first
    victim's seconds, ``generator_seconds``)."""

    Params = GIASParams

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.cache = GeneratorCache()

    def requirements(self, kind: MessageKind | None = None) -> Requirements:
        """Public images (the generator's training data); for a weights message the client's
        learning rate and local steps (its SGD is unrolled)."""
        return Requirements.unrolling(kind).model_copy(update={"public_data": True})

    def attempt(self, obs: Observation, generator: torch.Generator, restart: int) -> Attempt:
        p = self.params
        public = _public_images(self.resources.public if self.resources else None, obs)
        trained, fresh = self.cache.get(public, p.generator, p.seed, obs.device)
        setup = InversionSetup.from_observation(obs)
        plan = plan_labels(p.labels, "infer", obs, setup, generator)
        matched = matching(obs, setup, plan.targets)
        target_sq_norm = weighted_sq_norm(setup.target)

        def loss_of(images: torch.Tensor) -> torch.Tensor:
            x = normalize(images, obs.mean, obs.std)
            loss = cosine_distance(matched(x), setup.target, target_sq_norm=target_sq_norm)
            return loss + p.tv * total_variation(x) if p.tv > 0 else loss

        codes, latent_loss = search_latents(
            trained.generator, loss_of, setup.shape[0], p, generator, obs.device
        )
        images, loss, diverged = finetune(trained.generator, codes, latent_loss, loss_of, p)
        extras = {
            "latent_loss": latent_loss,
            "generator_seconds": trained.seconds if fresh else 0.0,
        }
        steps = p.iterations * p.latent_restarts + p.finetune_iterations
        return Attempt(
            normalize(images, obs.mean, obs.std),
            plan.final_labels(),
            loss,
            steps,
            diverged,
            plan.source,
            extras,
        )


def _public_images(public: PublicData | None, obs: Observation) -> torch.Tensor:
    """The public images the generator trains on, checked against the victims' shape.

    Raises:
        ThreatModelError: no public data, or images of another shape.
    """
    if public is None:
        raise ThreatModelError(
            "gias trains its generator on public data; grant capabilities.public_data"
        )
    if tuple(public.images.shape[1:]) != tuple(obs.image_shape):
        raise ThreatModelError(
            f"gias: the public images are {tuple(public.images.shape[1:])}, the clients' "
            f"{tuple(obs.image_shape)}; grant public data of the clients' shape"
        )
    return public.images


def _scheduler(
    optimiser: torch.optim.Optimizer, iterations: int, decay: bool
) -> Callable[[], None]:
    """Step decay by 0.1 at 3/8, 5/8 and 7/8 of ``iterations`` (inversefed's milestones)."""
    if not decay:
        return lambda: None
    milestones = [int(iterations // 2.667), int(iterations // 1.6), int(iterations // 1.142)]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=milestones, gamma=0.1)
    return schedule.step


def search_latents(
    gen: Generator,
    loss_of: Loss,
    batch: int,
    params: GIASParams,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, float]:
    """Phase 1: Adam on ``batch`` latent codes from each of ``latent_restarts`` N(0, 1) starts;
    the codes whose final loss is lowest (a restart that turns non-finite is dropped)."""
    best: tuple[torch.Tensor, float] | None = None
    for _ in range(params.latent_restarts):
        z = torch.randn(batch, gen.latent, generator=generator).to(device).requires_grad_(True)
        optimiser = torch.optim.Adam([z], lr=params.lr)
        step = _scheduler(optimiser, params.iterations, params.decay)
        for _ in range(params.iterations):
            loss = loss_of(gen(z))
            if not torch.isfinite(loss):
                break
            optimiser.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimiser.step()
            step()
        final = float(_loss_value(loss_of, gen(z).detach()))
        if best is None or (final == final and final < best[1]):
            best = (z.detach().clone(), final)
    assert best is not None  # latent_restarts >= 1
    return best


def _loss_value(loss_of: Loss, images: torch.Tensor) -> torch.Tensor:
    """The loss at ``images`` as a constant (computed with autograd on: the matching
    differentiates the model for the dummy gradient)."""
    with torch.enable_grad():
        return loss_of(images).detach()


def finetune(
    gen: Generator,
    codes: torch.Tensor,
    start_loss: float,
    loss_of: Loss,
    params: GIASParams,
) -> tuple[torch.Tensor, float, bool]:
    """Phase 2: one copy of ``gen`` per image, each fed its fixed code, fine-tuned together by
    Adam (BatchNorm in eval mode, so each image depends on its copy only), optionally pulled
    toward the latent search's images (``anchor``). Returns the images of the lowest matching
    loss seen (the start included; the reference returns the last), that loss, and whether a
    non-finite loss stopped it."""
    copies = [copy.deepcopy(gen).requires_grad_(True) for _ in range(codes.shape[0])]
    for net in copies:
        net.eval()

    def images() -> torch.Tensor:
        return torch.cat([net(code[None]) for net, code in zip(copies, codes, strict=True)])

    weights: Sequence[torch.nn.Parameter] = [w for net in copies for w in net.parameters()]
    optimiser = torch.optim.Adam(weights, lr=params.finetune_lr)
    step = _scheduler(optimiser, params.finetune_iterations, params.decay)
    start = images().detach()
    best, best_loss = start, start_loss  # the latent search's loss at these codes
    for _ in range(params.finetune_iterations):
        out = images()
        loss = loss_of(out)
        if not torch.isfinite(loss):
            return best, best_loss, True
        value = float(loss.detach())
        if value < best_loss:
            best, best_loss = out.detach(), value
        if params.anchor > 0:
            loss = loss + params.anchor * (out - start).pow(2).mean()
        optimiser.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimiser.step()
        step()
    final = images().detach()
    final_loss = float(_loss_value(loss_of, final))
    if final_loss < best_loss:
        best, best_loss = final, final_loss
    return best, best_loss, False

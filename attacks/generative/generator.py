"""GIAS's image prior: a DCGAN (Radford, Metz, Chintala, ICLR 2016) trained on public images.

Jeon et al. (2021) invert with a generator pretrained on the data's distribution (a DCGAN at
32 px, StyleGAN2 above). No pretrained medical generator is at hand offline, so the attacker
trains one on its own public images (``capabilities.public_data``). The networks work at the
power-of-two side at or above the images' (at least 8) and resize to the images' shape.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from attacks.generative.params import GeneratorParams


def working_side(height: int, width: int) -> int:
    """The power-of-two side (at least 8) the networks generate at for an ``height x width``
    image."""
    return max(8, 1 << math.ceil(math.log2(max(height, width))))


class Generator(nn.Module):
    """DCGAN generator ``z (N, latent) -> images (N, C, H, W)`` in [0, 1]: transposed
    convolutions from 4x4, BatchNorm and ReLU, a sigmoid last."""

    def __init__(self, latent: int, width: int, shape: tuple[int, int, int]) -> None:
        super().__init__()
        channels, height, wide = shape
        side = working_side(height, wide)
        ups = int(math.log2(side)) - 2  # 4 -> side
        ch = width * 2 ** (ups - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent, ch, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(True),
        ]
        for _ in range(ups - 1):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(True),
            ]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)
        self.latent = latent
        self.shape = shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(z[:, :, None, None])
        size = self.shape[1:]
        if tuple(out.shape[2:]) != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


class Discriminator(nn.Module):
    """DCGAN discriminator mirroring :class:`Generator`: strided convolutions down to 4x4,
    LeakyReLU(0.2), BatchNorm after the first, one logit."""

    def __init__(self, width: int, shape: tuple[int, int, int]) -> None:
        super().__init__()
        channels, height, wide = shape
        self.side = working_side(height, wide)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch, side = width, self.side // 2
        while side > 4:
            layers += [
                nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ch * 2),
                nn.LeakyReLU(0.2, True),
            ]
            ch, side = ch * 2, side // 2
        layers.append(nn.Conv2d(ch, 1, side, 1, 0))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.side or images.shape[-2] != self.side:
            images = F.interpolate(
                images, size=(self.side, self.side), mode="bilinear", align_corners=False
            )
        logits: torch.Tensor = self.net(images)
        return logits.flatten()


@dataclass
class TrainedGenerator:
    """A generator trained on public images (in eval mode), its losses per epoch and the
    seconds its training took."""

    generator: Generator
    generator_loss: list[float]
    discriminator_loss: list[float]
    seconds: float


def train_generator(
    images: torch.Tensor, params: GeneratorParams, seed: int, device: torch.device
) -> TrainedGenerator:
    """Train a DCGAN on ``images`` (N, C, H, W) in [0, 1]: the non-saturating GAN loss, Adam
    with betas (0.5, 0.999), DCGAN's N(0, 0.02) initialisation; seeded."""
    t0 = time.perf_counter()
    shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    rng = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        gen = Generator(params.latent, params.width, shape)
        disc = Discriminator(params.width, shape)
        for net in (gen, disc):
            net.apply(_dcgan_init)
    gen, disc = gen.to(device), disc.to(device)
    data = images.to(device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=params.learning_rate, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=params.learning_rate, betas=(0.5, 0.999))
    g_losses: list[float] = []
    d_losses: list[float] = []
    for _ in range(params.epochs):
        g_sum = d_sum = 0.0
        chunks = torch.split(torch.randperm(data.shape[0], generator=rng), params.minibatch)
        for chunk in chunks:
            real = data[chunk.to(device)]
            z = torch.randn(real.shape[0], params.latent, generator=rng).to(device)
            fake = gen(z)
            d_loss = _bce(disc(real), 1.0) + _bce(disc(fake.detach()), 0.0)
            opt_d.zero_grad(set_to_none=True)
            torch.autograd.backward(d_loss)
            opt_d.step()
            g_loss = _bce(disc(fake), 1.0)
            opt_g.zero_grad(set_to_none=True)
            torch.autograd.backward(g_loss)
            opt_g.step()
            g_sum += float(g_loss.detach())
            d_sum += float(d_loss.detach())
        g_losses.append(g_sum / len(chunks))
        d_losses.append(d_sum / len(chunks))
    gen.eval()
    gen.requires_grad_(False)
    return TrainedGenerator(gen, g_losses, d_losses, time.perf_counter() - t0)


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: convolutions N(0, 0.02), BatchNorm scales N(1, 0.02)."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _digest(images: torch.Tensor) -> str:
    return hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass
class GeneratorCache:
    """One generator per (public images, parameters, seed, device): it does not depend on the
    model's weights, so every round and victim of a trial shares it."""

    trained: dict[tuple[object, ...], TrainedGenerator] = field(default_factory=dict)

    def get(
        self, images: torch.Tensor, params: GeneratorParams, seed: int, device: torch.device
    ) -> tuple[TrainedGenerator, bool]:
        """The generator for these public images and whether this call trained it."""
        key = (_digest(images), params.model_dump_json(), seed, str(device))
        if key in self.trained:
            return self.trained[key], False
        self.trained.clear()
        self.trained[key] = train_generator(images, params, seed, device)
        return self.trained[key], True

"""Additive noise on the outgoing update: the defense evaluated in Deep Leakage from Gradients.

Zhu, Liu, Han, "Deep Leakage from Gradients", NeurIPS 2019, sec. 5 ("Noisy gradients"): Gaussian
and Laplacian noise of variance 1e-4..1e-1 added to the shared gradients. :func:`draw_noise` is
also used by :mod:`defenses.weight_dp`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from defenses.base import Defense, DefenseParams, ParamSpec, register_defense
from fl.simulation.hooks import ClientContext

__all__ = ["Distribution", "GradientNoise", "GradientNoiseParams", "draw_noise"]

Distribution = Literal["gaussian", "laplace"]
"""The noise distributions: N(0, scale^2) or Laplace(0, scale)."""


def draw_noise(
    like: torch.Tensor, scale: float, distribution: Distribution, generator: torch.Generator
) -> torch.Tensor:
    """I.i.d. zero-mean noise shaped like ``like`` (its dtype and device), drawn from
    ``generator``.

    ``gaussian``: ``scale * N(0, 1)``, i.e. N(0, scale^2). ``laplace``: Laplace(0, b = scale)
    (variance ``2 * scale^2``) by the inverse CDF ``-b * sign(u) * ln(1 - 2|u|)`` of one uniform
    ``u = U[0, 1) - 1/2`` per entry; ``1 - 2|u|`` is floored at the smallest positive normal
    number so that the single draw ``u = -1/2`` stays finite.
    """
    if scale < 0:
        raise ValueError(f"noise scale must be >= 0; got {scale}")
    if distribution == "gaussian":
        noise = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
        return noise * scale
    if distribution == "laplace":
        u = torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device) - 0.5
        tail = (1 - 2 * u.abs()).clamp_min(torch.finfo(like.dtype).tiny)
        return -scale * torch.sign(u) * torch.log(tail)
    raise ValueError(f"unknown noise distribution {distribution!r}; expected gaussian or laplace")


class GradientNoiseParams(DefenseParams):
    """Noise scale and distribution. The default std 1e-2 (Gaussian variance 1e-4) is the low end
    of the variances DLG sweeps (1e-4..1e-1); the search range covers that sweep and beyond."""

    scale: float = Field(1e-2, ge=0, description="Gaussian std or Laplace scale b.")
    distribution: Distribution = Field(
        "gaussian", description="gaussian (scale is the std) or laplace (scale is b)."
    )


@register_defense("gradient_noise")
class GradientNoise(Defense[GradientNoiseParams]):
    """Gaussian or Laplacian noise on every tensor of the outgoing update (DLG, Zhu et al.,
    NeurIPS 2019, sec. 5; the Soteria notebook's Laplace baseline uses b = 0.1).

    :meth:`process_update` returns ``u + n`` with ``n ~ N(0, scale^2)`` or Laplace(0, scale)
    i.i.d. per entry, drawn from ``ctx.generator`` (seeded per seed, round and client, so runs are
    reproducible and rounds get fresh noise). For FedSGD ``u`` is the gradient, as in the paper;
    for FedAvg it is the weight change ``W_new - W_global`` (the simulator sends
    ``W_global + u + n``), i.e. the noise is added to the transmitted weights once per round.
    No clipping and no privacy accounting: this is the heuristic baseline, not DP-SGD.
    """

    concurrent_clients: ClassVar[bool] = True  # stateless; noise from ctx.generator only

    Params = GradientNoiseParams
    search_space: ClassVar[dict[str, ParamSpec]] = {
        "scale": ParamSpec(type="float", low=1e-4, high=1.0, log=True),
        "distribution": ParamSpec(type="categorical", choices=("gaussian", "laplace")),
    }

    def process_update(
        self, update: dict[str, torch.Tensor], ctx: ClientContext
    ) -> dict[str, torch.Tensor]:
        """Add the noise to every tensor of ``update`` (tensors in the update's order)."""
        p = self.params
        return {
            name: value + draw_noise(value, p.scale, p.distribution, ctx.generator)
            for name, value in update.items()
        }

"""Row-norm clipping plus noise on the transmitted update: the DLM paper's defense.

Zhao, Luo, Ding, "Deep Leakage from Model in Federated Learning", CPAL 2024, sec. on defenses;
reference code Zihao-Kevin/DLM ``dlm_defense.py`` and ``defense.py: dp_defense`` (clipping
threshold 0.2, Laplace or Gaussian noise of strength 1e-5..1).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from defenses.base import Defense, DefenseParams, ParamSpec, register_defense
from defenses.noise import Distribution, draw_noise
from fl.simulation.hooks import ClientContext

__all__ = ["WeightDP", "WeightDPParams", "clip_rows"]


def clip_rows(value: torch.Tensor, clip: float) -> torch.Tensor:
    """``value`` with every row rescaled to L2 norm at most ``clip``.

    A tensor of two or more dimensions is viewed as ``(shape[0], -1)`` (one row per output unit
    of a Linear or conv weight); a bias or any 0/1-dimensional tensor is one row. A row of norm
    ``n > clip`` is multiplied by ``clip / n``; shorter rows are unchanged.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0; got {clip}")
    rows = value.reshape(value.shape[0], -1) if value.ndim >= 2 else value.reshape(1, -1)
    norms = rows.norm(dim=1, keepdim=True)
    factor = torch.clamp(norms / clip, min=1.0)
    return (rows / factor).reshape(value.shape)


class WeightDPParams(DefenseParams):
    """Defaults from the DLM code: clipping threshold 0.2, Laplace noise; scale 1e-3 is in the
    middle of its sweep (0, 1e-5, ..., 1)."""

    clip: float = Field(0.2, gt=0, description="Maximum L2 norm of each row of the update.")
    scale: float = Field(1e-3, ge=0, description="Gaussian std or Laplace scale b of the noise.")
    distribution: Distribution = Field(
        "laplace", description="laplace (scale is b) or gaussian (scale is the std)."
    )


@register_defense("weight_dp")
class WeightDP(Defense[WeightDPParams]):
    """Clip each row of the update to L2 norm ``clip``, then add noise (DLM, Zhao, Luo, Ding,
    CPAL 2024; Zihao-Kevin/DLM ``dlm_defense.py``).

    :meth:`process_update`: for every tensor of the update, each row (``(out, -1)`` view; a bias
    is one row) is clipped to norm ``clip`` and i.i.d. N(0, scale^2) or Laplace(0, scale) noise
    from ``ctx.generator`` is added to every entry.

    Deviations from the reference code, stated:

    * Where it acts. The DLM code perturbs the transmitted weights W_t and W_{t+1} separately
      (every ``state_dict`` entry). The server knows W_t, so what reaches it -- and what the
      DLM attack inverts -- is the difference; we clip and noise that difference, the outgoing
      update (the gradient for FedSGD, ``W_new - W_global`` for FedAvg). Buffers are not touched.
    * How it clips. The reference divides a whole tensor by ``max(1, max_row_norm / 0.2)``,
      adds noise, and multiplies the factor back, so in effect it adds noise scaled by that factor
      and leaves the weights unclipped; for conv weights its "rows" are ``norm(dim=1)`` slices.
      We clip every row separately, so that every row of what is sent has norm at most
      ``clip`` as the threshold intends, and do not undo it.
    """

    concurrent_clients: ClassVar[bool] = True  # stateless; noise from ctx.generator only

    Params = WeightDPParams
    search_space: ClassVar[dict[str, ParamSpec]] = {
        "clip": ParamSpec(type="float", low=0.01, high=5.0, log=True),
        "scale": ParamSpec(type="float", low=1e-5, high=1.0, log=True),
    }

    def process_update(
        self, update: dict[str, torch.Tensor], ctx: ClientContext
    ) -> dict[str, torch.Tensor]:
        """Clip the rows of every tensor of ``update``, then add the noise."""
        p = self.params
        out: dict[str, torch.Tensor] = {}
        for name, value in update.items():
            clipped = clip_rows(value, p.clip)
            out[name] = clipped + draw_noise(clipped, p.scale, p.distribution, ctx.generator)
        return out

"""What every inversion attack derives from an observation before optimising."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from attacks._machinery.objectives import select_parameters
from attacks.labels.inference import batch_labels, infer_labels, last_layer_of
from attacks.scoring.metrics import flat_value
from fl.simulation.observation import Observation

DummyInit = Literal["randn", "rand", "grey", "mean"]
"""How :meth:`InversionSetup.dummy` initialises a dummy batch."""

INIT_DESCRIPTION = (
    "The initial dummy batch: 'randn' N(0, 1) (DLG, Inverting Gradients), 'rand' uniform over "
    "the valid pixel box, 'grey' the mid-grey image, 'mean' the flat image at the dataset mean."
)
"""The description of the attacks' ``init`` parameter."""

StartInit = Literal["randn", "rand", "grey", "mean", "learned"]
"""The inits of attacks that can also start from a learned reconstruction."""

START_INIT_DESCRIPTION = (
    INIT_DESCRIPTION[:-1] + ", 'learned' the reconstruction of an inverter trained on public "
    "data (settings in 'learned'; needs capabilities.public_data)."
)
"""The description of ``init`` for attacks with a learned start."""


@dataclass
class InversionSetup:
    """The matched parameters, the observed target per parameter, and the input box.

    ``target`` is the gradient (FedSGD) or the weight update ``W_t - W_{t+1}`` (FedAvg), per
    matched parameter. ``lower``/``upper`` bound the model's input space so that images stay in
    [0, 1] after denormalisation (shape (1, C, 1, 1)). ``observation`` is kept for label
    inference (:func:`attacks.labels.inference.infer_labels` reads the model and the message's
    bias).
    """

    model: nn.Module
    names: list[str]
    params: list[torch.Tensor]
    target: list[torch.Tensor]
    shape: tuple[int, int, int, int]
    lower: torch.Tensor
    upper: torch.Tensor
    last_layer_update: torch.Tensor
    flat: tuple[float, ...] = (0.5,)
    observation: Observation | None = None

    @classmethod
    def from_observation(
        cls, obs: Observation, ignore: Sequence[str] = (), include: Sequence[str] | None = None
    ) -> InversionSetup:
        """Build the setup; ``ignore`` drops parameters by name prefix (defense-aware attacks),
        ``include`` keeps only those prefixes."""
        model = obs.model
        model.train()
        available = list(obs.message)
        if include:
            available = [n for n in available if any(n.startswith(p) for p in include)]
        names = select_parameters(model, available, ignore)
        named = dict(model.named_parameters())
        params: list[torch.Tensor] = [named[n] for n in names]
        for p in params:
            p.requires_grad_(True)
        full = dict(obs.message) if obs.kind == "gradient" else obs.weight_update()
        target = [full[n].detach() for n in names]
        last_name = _last_layer_weight_name(model)
        device = obs.device
        mean = torch.tensor(obs.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(obs.std, device=device).view(1, -1, 1, 1)
        c = obs.image_shape[0]
        if mean.shape[1] == 1 and c > 1:
            mean, std = mean.expand(1, c, 1, 1), std.expand(1, c, 1, 1)
        return cls(
            model=model,
            names=names,
            params=params,
            target=target,
            shape=(obs.num_examples, *obs.image_shape),
            lower=(0 - mean) / std,
            upper=(1 - mean) / std,
            last_layer_update=full[last_name].detach(),
            flat=flat_value(obs.mean, obs.std),
            observation=obs,
        )

    def dummy(
        self, generator: torch.Generator, init: str = "randn", start: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A dummy batch in the model's input space: N(0, 1) ("randn", DLG/IG), uniform over
        the valid box ("rand"), the mid-grey image ("grey": 0.5 in [0, 1]), or the flat image
        at the dataset mean ("mean", Hatamizadeh et al. 2023: the observation's normalisation
        mean, else 0.5; the trivial baseline of ``psnr_gain``), or ``start`` ("learned": a
        learned reconstruction in the model's input space, boxed)."""
        device = self.lower.device
        if init == "learned":
            if start is None:
                raise ValueError("init 'learned' needs the learned reconstruction as `start`")
            x = torch.maximum(torch.minimum(start.detach(), self.upper), self.lower).clone()
        elif init == "randn":
            x = torch.randn(self.shape, generator=generator, device=device)
        elif init == "rand":
            u = torch.rand(self.shape, generator=generator, device=device)
            x = self.lower + u * (self.upper - self.lower)
        elif init in ("grey", "mean"):
            value = torch.tensor(self.flat if init == "mean" else (0.5,), device=device)
            level = value.view(1, -1, 1, 1)
            x = (self.lower + level * (self.upper - self.lower)).expand(self.shape).clone()
        else:
            raise ValueError(f"unknown init {init!r}; use 'randn', 'rand', 'grey' or 'mean'")
        return x.requires_grad_(True)

    def perturb(
        self, x: torch.Tensor, generator: torch.Generator, std: float, boxed: bool = True
    ) -> None:
        """Add N(0, std²) noise to the dummy ``x`` in place and, when ``boxed``, clamp it to the
        valid box (restarts from a fixed init that differ: ``init_noise``)."""
        with torch.no_grad():
            x.add_(std * torch.randn(self.shape, generator=generator, device=x.device))
            if boxed:
                x.copy_(torch.maximum(torch.minimum(x, self.upper), self.lower))

    def inferred_labels(self) -> torch.Tensor:
        """Labels from the last layer's update:
        :func:`attacks.labels.inference.infer_labels` (``auto``: iDLG's exact rule for one image,
        iLRG guarded by the bias-corrected rule for a batch's gradient or one-step update) when the
        observation is kept, else the sign-and-magnitude rule
        :func:`attacks.labels.inference.batch_labels` on ``last_layer_update``."""
        if self.observation is not None:
            labels = infer_labels(self.observation)
        else:
            labels = batch_labels(self.last_layer_update, self.shape[0])
        return labels.to(self.lower.device)


def _last_layer_weight_name(model: nn.Module) -> str:
    last = last_layer_of(model)
    for name, p in model.named_parameters():
        if p is last.weight:
            return name
    raise ValueError("the last layer's weight is not a parameter of the model")

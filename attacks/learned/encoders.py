"""What a learned attack's inverter reads of an update: a fixed vector per update.

* :class:`SketchEncoder` -- a CountSketch (Charikar et al. 2002) of the whole update, each
  layer first scaled by its typical norm so that no layer drowns the others (Wu et al. 2023
  feed the update to an MLP; a sketch keeps its size fixed for any model).
* :class:`ClassifierInputEncoder` -- per class row ``c`` of the last Linear layer,
  ``dW_c / db_c``: exactly the classifier input of a single image (Geiping et al. 2020, sec.
  4), a mix of the batch's inputs otherwise; the bias row is appended.
* :class:`NoiseEncoder` -- Gaussian noise of the same size (the prior-only ablation).

Every encoder is fitted on the first simulated updates; :class:`Standardizer` then z-scores
each dimension over the training codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from attacks.labels.inference import last_layer_of
from attacks.threat import ThreatModelError

CLIP = 10.0
"""Standardised codes are clipped to [-CLIP, CLIP] (a row of ``dW_c / db_c`` with a tiny bias
entry would otherwise dominate)."""


class Encoder(Protocol):
    """Maps an update (per parameter name) to a fixed-size vector."""

    dim: int

    def fit(self, updates: Sequence[dict[str, torch.Tensor]]) -> None:
        """Set any scale from a few training updates."""

    def __call__(self, update: dict[str, torch.Tensor]) -> torch.Tensor:
        """The update's code, a float32 vector of ``dim`` on the CPU."""


class SketchEncoder:
    """A CountSketch of the layer-scaled update into ``dim`` buckets (seeded hashes and signs).

    Example:
        >>> enc = SketchEncoder({"w": (3, 4), "b": (3,)}, dim=8, seed=0)
        >>> enc.fit([{"w": torch.ones(3, 4), "b": torch.ones(3)}])
        >>> tuple(enc({"w": torch.ones(3, 4), "b": torch.ones(3)}).shape)
        (8,)
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], dim: int, seed: int) -> None:
        self.names = list(shapes)
        self.dim = dim
        total = sum(int(torch.Size(s).numel()) for s in shapes.values())
        generator = torch.Generator().manual_seed(int(seed))
        self.bucket = torch.randint(0, dim, (total,), generator=generator)
        self.sign = torch.randint(0, 2, (total,), generator=generator).float() * 2 - 1
        self.scale = {n: 1.0 for n in self.names}

    def fit(self, updates: Sequence[dict[str, torch.Tensor]]) -> None:
        for n in self.names:
            norms = torch.stack([u[n].detach().float().norm() for u in updates])
            self.scale[n] = float(norms.mean()) or 1.0

    def __call__(self, update: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = torch.cat(
            [update[n].detach().float().cpu().reshape(-1) / self.scale[n] for n in self.names]
        )
        return torch.zeros(self.dim).index_add_(0, self.bucket, flat * self.sign)


class ClassifierInputEncoder:
    """Per class, the last layer's weight row over its bias entry, and the bias row.

    Raises:
        ThreatModelError: the model has no last Linear layer with a bias in the message.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        try:
            layer = last_layer_of(model)
        except ValueError:
            layer = None
        named = {id(p): n for n, p in model.named_parameters()}
        if layer is None or layer.bias is None:
            raise ThreatModelError(
                "feature inversion reads the classifier input from the last Linear layer's "
                "weight and bias updates (dW_c / db_c), but the model has no final nn.Linear "
                "with a bias; use learned_inversion"
            )
        self.weight, self.bias = named[id(layer.weight)], named[id(layer.bias)]
        if self.weight not in names or self.bias not in names:
            raise ThreatModelError(
                "feature inversion needs the last layer's weight and bias in the message, but "
                "the message does not carry them"
            )
        classes, features = layer.weight.shape
        self.dim = classes * features + classes

    def fit(self, updates: Sequence[dict[str, torch.Tensor]]) -> None:
        return None

    def __call__(self, update: dict[str, torch.Tensor]) -> torch.Tensor:
        w = update[self.weight].detach().double().cpu()
        b = update[self.bias].detach().double().cpu()
        top = b.abs().max()
        usable = b.abs() > 1e-6 * top if top > 0 else torch.zeros_like(b, dtype=torch.bool)
        rows = torch.where(usable[:, None], w / torch.where(usable, b, 1.0)[:, None], 0.0)
        bias = b / top if top > 0 else b
        return torch.cat([rows.reshape(-1), bias]).float()


class NoiseEncoder:
    """Gaussian noise of ``dim`` entries, whatever the update (the prior-only ablation)."""

    def __init__(self, dim: int, generator: torch.Generator) -> None:
        self.dim = dim
        self.generator = generator

    def fit(self, updates: Sequence[dict[str, torch.Tensor]]) -> None:
        return None

    def __call__(self, update: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.randn(self.dim, generator=self.generator)


class Standardizer:
    """Per-dimension z-scores over the training codes, clipped to ``[-CLIP, CLIP]``."""

    def __init__(self, codes: torch.Tensor) -> None:
        self.mean = codes.mean(0)
        self.std = (
            codes.std(0).clamp_min(1e-8) if codes.shape[0] > 1 else torch.ones_like(self.mean)
        )

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        return ((codes - self.mean) / self.std).clamp(-CLIP, CLIP)

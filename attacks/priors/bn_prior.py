"""The BatchNorm-statistics prior of gradient inversion (DeepInversion's distance, Yin et al.,
CVPR 2020; GradInversion, CVPR 2021): the dummy batch's per-layer statistics pulled toward those
the client's returned buffers reveal (:mod:`attacks.priors.bn_stats`), and the projection of
the first layer's channel means onto them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from attacks._machinery.setup import InversionSetup
from attacks.priors.bn_stats import (
    BatchNormRecorder,
    BatchNormTarget,
    FirstLayerMeans,
    batchnorm_targets,
)
from fl.simulation.observation import Observation


class BatchNormPrior:
    """``weight`` x DeepInversion's BatchNorm-statistics distance of the dummy batch, recorded
    during the matching's forwards (:meth:`recording`), then :meth:`loss`. Weight 0 records
    nothing and costs nothing."""

    def __init__(
        self,
        recorder: BatchNormRecorder | None,
        weight: float,
        first: float,
        relative: bool = False,
    ) -> None:
        self.recorder = recorder
        self.weight = weight
        self.first = first
        self.relative = relative

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the BatchNorm inputs of the forwards run in the block."""
        if self.recorder is None:
            yield
            return
        with self.recorder.recording():
            yield

    def loss(self) -> torch.Tensor | float:
        """The weighted prior of the last recorded forwards (0.0 when off)."""
        if self.recorder is None:
            return 0.0
        return self.weight * self.recorder.loss(self.first, self.relative)


def revealed_statistics(obs: Observation, needed: bool) -> dict[str, BatchNormTarget]:
    """:func:`attacks.priors.bn_stats.batchnorm_targets` of ``obs`` when an attack ``needed`` them
    (derived once per attempt, for the prior and the projection alike), else ``{}``."""
    return batchnorm_targets(obs) if needed else {}


def bn_prior(
    targets: dict[str, BatchNormTarget],
    setup: InversionSetup,
    weight: float,
    first_multiplier: float,
    distance: str = "absolute",
) -> BatchNormPrior:
    """The BatchNorm prior toward ``targets`` (:func:`revealed_statistics`), or an inactive
    one when ``weight`` is 0. ``distance``: ``"absolute"`` (DeepInversion's) or
    ``"relative"`` (:meth:`BatchNormRecorder.loss`).

    Raises:
        ValueError: ``weight`` > 0 but there are no BatchNorm statistics.
    """
    if weight <= 0:
        return BatchNormPrior(None, 0.0, first_multiplier)
    if not targets:
        raise ValueError("bn_prior > 0 needs a model with BatchNorm layers")
    recorder = BatchNormRecorder(setup.model, targets)
    return BatchNormPrior(recorder, weight, first_multiplier, distance == "relative")


def mean_projection(
    targets: dict[str, BatchNormTarget], setup: InversionSetup, x: torch.Tensor, enabled: bool
) -> Callable[[torch.Tensor], None] | None:
    """:meth:`FirstLayerMeans.project` onto the first BatchNorm layer's revealed channel means
    when ``enabled`` (None otherwise).

    Raises:
        ValueError: enabled, but the model has no BatchNorm layer.
    """
    if not enabled:
        return None
    if not targets:
        raise ValueError("bn_project needs a model with BatchNorm layers")
    name = next(iter(targets))
    return FirstLayerMeans(setup.model, name, targets[name], x).project

"""What gradient-matching attacks differentiate: the dummy batch's gradient (FedSGD) or its
unrolled local update (FedAvg), and the optional BatchNorm-statistics prior beside it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from attacks.bn_stats import (
    BatchNormRecorder,
    BatchNormTarget,
    FirstLayerMeans,
    batchnorm_targets,
)
from attacks.gradient import unrolled_update
from attacks.objectives import dummy_gradients
from attacks.setup import InversionSetup
from fl.simulation.observation import Observation

Matched = Callable[[torch.Tensor], list[torch.Tensor]]
"""Dummy batch -> the quantity matched to the observed message, per matched parameter."""


def matching(
    obs: Observation, setup: InversionSetup, targets: Callable[[], torch.Tensor]
) -> Matched:
    """The dummy gradient for a gradient message; for a weights message the update of the
    client's local SGD unrolled with its known learning rate, steps and batch size (Geiping et
    al. 2020, FedAvg variant)."""
    if obs.kind == "gradient":
        return lambda x: list(dummy_gradients(setup.model, setup.params, x, targets()))
    if obs.lr is None or obs.local_steps is None:
        raise ValueError("an unrolled FedAvg update needs the client's lr and local steps")
    lr, steps = obs.lr, obs.local_steps
    batch = obs.batch_size or setup.shape[0]
    return lambda x: unrolled_update(setup, x, targets(), lr, steps, batch)


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
    """:func:`attacks.bn_stats.batchnorm_targets` of ``obs`` when an attack ``needed`` them
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

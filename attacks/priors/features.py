"""A feature prior for gradient inversion: the classifier's input recovered analytically from the
last layer's gradient (``dW_c / db_c``, Geiping et al. 2020, sec. 4; Phong et al. 2018) and the
dummy's features pulled toward it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from attacks.labels.inference import last_layer_of, last_layer_update
from fl.simulation.observation import Observation

FIXED_POINT_STEPS = 50
"""Alternations of :func:`group_feature_sums` (5-10 reach 1 % on the ConvNet here; 50 for
margin)."""


def group_feature_sums(
    weight_sum: torch.Tensor,
    layer: nn.Linear,
    labels: torch.Tensor,
    steps: int = FIXED_POINT_STEPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per label present, the sum ``S_c`` of its images' features, from ``weight_sum`` (C, F),
    the last layer's weight gradient summed over the batch (cross-entropy): ``weight_sum =
    sum_c n_c (p_c - e_c) (S_c / n_c)^T`` with ``p_c`` the posterior at the group's mean
    feature, solved by alternating least squares for ``S`` with the posteriors fixed and the
    posteriors at ``S`` (from uniform ones). Exact when each label is one image's; a group of
    several is taken at its mean's posterior. Returns ``(present labels (G,), S (G, F))``."""
    w = layer.weight.detach().cpu().double()
    b = layer.bias.detach().cpu().double() if layer.bias is not None else 0.0
    k = w.shape[0]
    present, counts = torch.unique(labels, return_counts=True)
    y = torch.nn.functional.one_hot(present, k).double()
    n = counts.double()[:, None]
    probs = torch.full_like(y, 1.0 / k)
    sums = torch.zeros(present.numel(), weight_sum.shape[1], dtype=torch.double)
    for _ in range(steps):
        sums = torch.linalg.lstsq((probs - y).T, weight_sum).solution
        probs = torch.softmax((sums / n) @ w.T + b, dim=1)
    return present, sums


def feature_targets(obs: Observation, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per label of the batch, the sum of its images' classifier inputs that the last layer's
    update reveals. Batch 1: the weight-gradient row of the label over that row's bias
    gradient, exact (Geiping et al. 2020, sec. 4). Batch B: :func:`group_feature_sums`, which
    needs the update's scale (a gradient, or a FedAvg update with known lr and steps), and
    fewer labels present than classes: the rows of ``p - e_c`` sum to zero, so C classes
    determine at most C - 1 groups. Returns ``(present labels (G,), sums (G, F))``, both
    empty when the sums are not determined.

    Raises:
        ValueError: the last layer has no bias, or a batch's update has an unknown scale.
    """
    last = last_layer_update(obs)
    if last.bias is None:
        raise ValueError("feature_prior needs a final nn.Linear with a bias")
    labels = labels.detach().cpu().long()
    if labels.numel() == 1:
        row = int(labels[0])
        return labels, (last.weight[row] / last.bias[row])[None].float()
    if not last.scaled:
        raise ValueError(
            "feature_prior at batch > 1 needs the update's scale: a gradient, or a FedAvg "
            "update with the client's lr and local_steps known"
        )
    present = torch.unique(labels)
    if present.numel() >= last.weight.shape[0]:
        return present[:0], last.weight[:0].float()
    present, sums = group_feature_sums(last.weight * labels.numel(), last.layer, labels)
    return present, sums.float()


class FeaturePrior:
    """``weight`` x the mean over the batch's labels of ``||sum_{i: y_i = c} phi(x_i) - S_c||^2
    / ||S_c||^2``: ``phi`` the input of the model's last linear layer, recorded during the
    first forward of the block run under :meth:`recording`, ``S_c`` from
    :func:`feature_targets`. Weight 0 records nothing."""

    def __init__(
        self,
        layer: nn.Linear | None,
        groups: torch.Tensor,
        targets: torch.Tensor,
        weight: float,
    ) -> None:
        self.layer = layer
        self.groups = groups
        self.targets = targets
        self.norms = targets.pow(2).sum(dim=1).clamp_min(1e-12)
        self.weight = weight
        self._seen: torch.Tensor | None = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the last layer's input of the first forward run in the block."""
        if self.layer is None:
            yield
            return
        self._seen = None

        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if self._seen is None:
                self._seen = args[0]

        handle = self.layer.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def loss(self) -> torch.Tensor | float:
        """The weighted prior of the last recorded forward (0.0 when off)."""
        if self.layer is None or self._seen is None:
            return 0.0
        sums = self.groups @ self._seen.flatten(1)
        per = (sums - self.targets).pow(2).sum(dim=1) / self.norms
        return self.weight * per.mean()


def feature_prior(
    obs: Observation, model: nn.Module, labels: torch.Tensor | None, weight: float
) -> FeaturePrior:
    """The feature prior of ``obs`` at ``weight`` for a batch with ``labels``, or an inactive
    one when ``weight`` is 0 or the batch's feature sums are not determined.

    Raises:
        ValueError: ``weight`` > 0 with optimised (unknown) labels, or as
            :func:`feature_targets`.
    """
    if weight <= 0:
        return FeaturePrior(None, torch.empty(0, 0), torch.empty(0, 0), 0.0)
    if labels is None:
        raise ValueError("feature_prior > 0 needs fixed labels (labels: known or infer)")
    present, sums = feature_targets(obs, labels)
    if present.numel() == 0:
        return FeaturePrior(None, torch.empty(0, 0), torch.empty(0, 0), 0.0)
    device = next(model.parameters()).device
    membership = (labels.detach().cpu().long()[None, :] == present[:, None]).float()
    return FeaturePrior(last_layer_of(model), membership.to(device), sums.to(device), weight)

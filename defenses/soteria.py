"""Soteria: perturb the representation's gradient in the last layer (Sun et al., CVPR 2021).

Sun, Li, Wang, Chen, Li, Wen, Li, "Soteria: Provable Defense against Privacy Leakage in
Federated Learning from Representation Perspective", CVPR 2021 (arXiv 2012.06043); reference code
jeremy313/Soteria (``GS_attack/reconstruct_image.py``, ``--defense=ours``, and
``DLG_attack/Defend_DLG.ipynb``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from defenses.base import Defense, DefenseParams, ParamSpec, register_defense
from fl.simulation.client import loss_from_logits, trainable_parameters
from fl.simulation.hooks import ClientContext

__all__ = ["Soteria", "SoteriaParams", "lowest_units", "unit_scores"]

_MAX_JACOBIAN_ELEMENTS = 1 << 23
"""Bound on the entries of one batched input-gradient block (units x batch x pixels), 32 MiB in
float32: the Jacobian is computed in chunks of units so that memory stays bounded."""


def unit_scores(features: torch.Tensor, inputs: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """Soteria's per-unit score ``mean_b ||d r_bf / d x_b||_2 / (|r_bf| + epsilon)``, shape (d,).

    ``features`` is the representation ``r`` (B, d) fed to the last layer, computed from
    ``inputs`` (B, ...) with its autograd graph (the graph is kept for the caller). A low score
    means a unit whose value is large relative to how much it moves with the input, i.e. one
    whose gradient row reveals the input most (the paper's ``||r|| / ||dr/dX||`` approximation,
    README "Remark"); Soteria prunes the units with the LOWEST scores.

    As in the reference (``feature.backward(e_f)`` for one unit ``f`` at a time over the whole
    batch) the input gradient of unit ``f`` is that of ``sum_b r_bf``, which for a model without
    cross-example coupling (no batch norm in training mode) is the per-example Jacobian row; the
    units are batched with ``is_grads_batched`` in chunks of at most
    :data:`_MAX_JACOBIAN_ELEMENTS` entries. The reference sums the ratios over the batch; the
    mean used here ranks the units identically.
    """
    if features.ndim != 2 or features.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"features must be (B, d) for inputs of batch {inputs.shape[0]}; "
            f"got {tuple(features.shape)}"
        )
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0; got {epsilon}")
    batch, dim = features.shape
    per_unit = max(1, batch * inputs[0].numel())
    chunk = max(1, _MAX_JACOBIAN_ELEMENTS // per_unit)
    norms = torch.empty(dim, batch, dtype=features.dtype, device=features.device)
    for start in range(0, dim, chunk):
        units = torch.arange(start, min(start + chunk, dim), device=features.device)
        seeds = torch.zeros(len(units), batch, dim, dtype=features.dtype, device=features.device)
        seeds[torch.arange(len(units), device=features.device), :, units] = 1.0
        (grads,) = torch.autograd.grad(
            features, inputs, grad_outputs=seeds, is_grads_batched=True, retain_graph=True
        )
        norms[units] = grads.reshape(len(units), batch, -1).norm(dim=2)
    ratio = norms.T / (features.detach().abs() + epsilon)
    return ratio.mean(dim=0)


def lowest_units(scores: torch.Tensor, percent: float) -> torch.Tensor:
    """Indices of the ``round(percent / 100 * d)`` units with the lowest ``scores`` (ties broken
    by index). The reference keeps units whose summed score is not below ``np.percentile(scores,
    percent)``; that selects the same units up to ties and one unit of rounding."""
    if not 0 <= percent <= 100:
        raise ValueError(f"percent must be in [0, 100]; got {percent}")
    count = round(percent / 100 * scores.numel())
    return torch.argsort(scores, stable=True)[:count]


class SoteriaParams(DefenseParams):
    """Soteria's pruning rate (percent of the representation's units whose last-layer gradient
    is zeroed; 60 is the rate of the reference's Inverting Gradients experiment,
    ``--pruning_rate=60`` in the README) and the offset of the score's denominator (0.1 in
    ``GS_attack/reconstruct_image.py``)."""

    percent: float = Field(60.0, ge=0, le=100, description="Percent of units pruned.")
    epsilon: float = Field(
        0.1, gt=0, description="Offset in the score ||dr/dx|| / (|r| + epsilon)."
    )


@register_defense("soteria")
class Soteria(Defense[SoteriaParams]):
    """Soteria (Sun et al., CVPR 2021): zero the last layer's gradient for the representation
    units that reveal the input most.

    In every local step (:meth:`compute_gradients`, so FedSGD and each FedAvg step alike), with
    ``r = model.forward_features(x)`` the classifier's input (B, d):

    1. score every unit ``f`` by ``mean_b ||d r_bf / d x_b|| / (|r_bf| + epsilon)``
       (:func:`unit_scores`; the reference's ratio, the inverse of the ``||r|| / ||dr/dX||``
       approximation its README states for the paper's ``||r (dr/dX)^-1||``);
    2. take the ``percent`` % of units with the lowest scores (:func:`lowest_units`) -- the
       reference's ``mask = where(score < percentile(score, p), 0, 1)``;
    3. compute the ordinary gradient of ``CE + model.auxiliary_loss() + self.extra_loss(...)`` from
       the same forward pass, and zero the columns ``f`` of the classifier weight's gradient
       (``dL/dW[:, f] = sum_b dL/dz_b * r_bf``: the column through which the representation
       leaks, the paper's key observation).

    Default ``percent=60``: the reference's Inverting Gradients experiment
    (``reconstruct_image.py --defense=ours --pruning_rate=60``); its DLG notebook uses the 1st
    percentile. ``x`` is the normalised model input, as in the reference.

    Deviations: the reference divides by ``r + 0.1`` (GS) or ``r`` (DLG notebook) for
    non-negative (ReLU / sigmoid) features; we divide by ``|r| + epsilon`` so that negative
    features are scored by magnitude (identical for non-negative ones), and require
    ``epsilon > 0`` (a dead unit would divide 0 by 0). Units are chosen by rank instead of by a
    percentile threshold (same units up to ties and rounding). The reference's ``sum`` over the
    batch is a mean here (same ranking). Only the classifier weight's gradient is masked, as in
    the reference (the bias gradient does not carry ``r``).
    """

    Params = SoteriaParams
    search_space: ClassVar[dict[str, ParamSpec]] = {
        "percent": ParamSpec(type="float", low=10.0, high=95.0),
    }

    def compute_gradients(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        ctx: ClientContext,
    ) -> dict[str, torch.Tensor]:
        """The training-loss gradient of every trainable parameter with the pruned columns of
        the classifier weight's gradient set to zero; the pruned unit indices are left in
        ``ctx.extras["soteria_pruned"]``."""
        p = self.params
        forward_features = getattr(model, "forward_features", None)
        last_layer = getattr(model, "last_layer", None)
        if not callable(forward_features) or not callable(last_layer):
            raise TypeError(
                "Soteria needs a SplitModel (forward_features() and last_layer()); "
                f"got {type(model).__name__}"
            )
        classifier = last_layer()
        params = trainable_parameters(model)
        weight_name = next((n for n, t in params.items() if t is classifier.weight), None)
        if weight_name is None:
            raise ValueError("the classifier weight is not a trainable parameter of the model")

        x = inputs.detach().requires_grad_(True)
        features = forward_features(x)
        if features.ndim != 2 or features.shape[1] != classifier.weight.shape[1]:
            raise ValueError(
                f"forward_features gave {tuple(features.shape)}; the classifier expects "
                f"(B, {classifier.weight.shape[1]})"
            )
        scores = unit_scores(features, x, p.epsilon)
        pruned = lowest_units(scores, p.percent)

        loss = loss_from_logits(model, x, labels, classifier(features), self, ctx)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        masked = grads[weight_name].clone()
        masked[:, pruned] = 0.0
        grads[weight_name] = masked
        ctx.extras["soteria_pruned"] = pruned.detach()
        return grads

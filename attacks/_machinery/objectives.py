"""Differentiable pieces shared by the inversion attacks: dummy gradients and distances."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from attacks._machinery.convolution import inversion_convolutions


def select_parameters(
    model: nn.Module, available: Sequence[str], ignore: Sequence[str] = ()
) -> list[str]:
    """Names of the parameters an attack matches: those in the message, in model order, minus
    any whose name starts with one of the ``ignore`` prefixes (the defense-aware option, e.g.
    ``["bottleneck", "classifier"]`` against PRECODE). Raises if nothing is left."""
    names = [
        n
        for n, _ in model.named_parameters()
        if n in set(available)
        and not any(n == p or n.startswith(p + ".") or n.startswith(p) for p in ignore)
    ]
    if not names:
        raise ValueError(
            f"no parameters left to match after ignoring {list(ignore)}; "
            f"parameters are {[n for n, _ in model.named_parameters()]}"
        )
    return names


def layer_weights(kind: str, n: int, device: torch.device) -> list[float] | None:
    """inversefed's per-tensor weights: equal, linearly decreasing, or softmax-decaying."""
    if kind == "equal":
        return None
    if kind == "linear":
        w = torch.arange(n, 0, -1, dtype=torch.float32) / n
    else:
        w = torch.softmax(torch.arange(n, 0, -1, dtype=torch.float32), dim=0)
        w = w / w[0]
    return [float(v) for v in w.to(device)]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with hard labels (B,) or soft targets (B, K): mean_b sum_c -t_c log p_c
    (DLG's loss for dummy soft labels)."""
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets)
    return torch.mean(torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1))


def training_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The client's training objective on dummy data: cross-entropy plus the model's own extra
    term when it has one (e.g. PRECODE's KL), since the attacker knows the training code."""
    loss = soft_cross_entropy(model(inputs), targets)
    extra = getattr(model, "auxiliary_loss", None)
    if callable(extra):
        term = extra()
        if term is not None:
            loss = loss + term
    return loss


def dummy_gradients(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    create_graph: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Gradient of the training loss on dummy data w.r.t. ``params``, differentiable in the
    dummy data (double backward) when ``create_graph``; then the convolutions run through
    :func:`attacks._machinery.convolution.inversion_convolutions` (bit-identical values, a double
    backward without the products nobody asked for)."""
    if not create_graph:
        return torch.autograd.grad(training_loss(model, inputs, targets), list(params))
    with inversion_convolutions(model):
        loss = training_loss(model, inputs, targets)
    return torch.autograd.grad(loss, list(params), create_graph=True)


def tensor_sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Python's ``sum`` of tensors, ``0 + t_0 + t_1 + ...`` (the reference codes' order and
    rounding), typed as the tensor it is for a non-empty ``terms``."""
    return cast(torch.Tensor, sum(terms))


def l2_distance(dummy: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """DLG's objective: sum over tensors of the squared L2 distance ||g' - g||^2."""
    return tensor_sum(((d - t) ** 2).sum() for d, t in zip(dummy, target, strict=True))


def cosine_distance(
    dummy: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    target_sq_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverting Gradients' objective (Geiping et al. 2020, eq. 4): ONE cosine similarity over
    all (optionally weighted) parameter tensors, ``1 - <g', g> / (||g'|| ||g||)``.

    Summed tensor by tensor in the order and with the operations of the reference code
    (``(g' * g).sum()``, ``g'.pow(2).sum()``), so that it is bit-identical to the textbook
    loop: signed Adam amplifies any rounding difference over thousands of iterations (a fused
    ``vdot`` variant moved the medical control trial's mean PSNR by 2.5 dB). ``target_sq_norm``
    (:func:`weighted_sq_norm` of ``target``, a constant of the attack, same operations) skips
    recomputing the target's norm every iteration without changing a bit.
    """
    w = weights if weights is not None else [1.0] * len(target)
    dot = tensor_sum(wi * (d * t).sum() for wi, d, t in zip(w, dummy, target, strict=True))
    dn = tensor_sum(wi * d.pow(2).sum() for wi, d in zip(w, dummy, strict=True))
    tn = target_sq_norm if target_sq_norm is not None else weighted_sq_norm(target, weights)
    return 1.0 - dot / (torch.sqrt(dn) * torch.sqrt(tn) + 1e-12)


def weighted_sq_norm(
    tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """``sum_l w_l ||t_l||^2``: the squared norm of the concatenated (weighted) tensors."""
    w = weights if weights is not None else [1.0] * len(tensors)
    return tensor_sum(wi * t.pow(2).sum() for wi, t in zip(w, tensors, strict=True))


def mean_tensor_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """DLM+'s scale: the mean over tensors of each tensor's L2 norm (one scalar)."""
    return torch.stack([t.norm() for t in tensors]).mean()


def normalized_l2_distance(
    dummy: Sequence[torch.Tensor], target: Sequence[torch.Tensor]
) -> torch.Tensor:
    """DLM+'s scale-free objective: sum_l ||g'_l / n(g') - dW_l / n(dW)||^2 with n the mean
    per-tensor L2 norm of each side, so the learning rate and step count cancel."""
    dn = mean_tensor_norm(dummy)
    tn = mean_tensor_norm(target).detach()
    return tensor_sum(((d / dn - t / tn) ** 2).sum() for d, t in zip(dummy, target, strict=True))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation as in Inverting Gradients' code:
    mean |x[h+1] - x[h]| + mean |x[w+1] - x[w]|."""
    dx = torch.mean(torch.abs(x[:, :, :, :-1] - x[:, :, :, 1:]))
    dy = torch.mean(torch.abs(x[:, :, :-1, :] - x[:, :, 1:, :]))
    return dx + dy

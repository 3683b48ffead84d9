"""The textbook Inverting Gradients loop, as the paper's reference code (inversefed) runs it.

The baseline of ``benchmarks/attacks.py --compare-reference`` and of the tests that check our attack
against it: per iteration a closure computes the dummy gradient with autograd
(``create_graph=True``), the cosine over all parameter tensors accumulated tensor by tensor
(``reconstruction_costs(..., cost_fn="sim")``: the target's norm recomputed every time), adds
``tv * TV(x)``, calls ``backward()``, replaces the image gradient by its sign; Adam steps, a
MultiStepLR decays the step by 0.1 at 3/8, 5/8 and 7/8 of the iterations, and the image is
clamped to the valid box. Written from the algorithm, not copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def textbook_inverting_gradients(
    model: nn.Module,
    target: list[torch.Tensor],
    labels: torch.Tensor,
    x0: torch.Tensor,
    *,
    iterations: int,
    lr: float,
    tv: float,
    lower: torch.Tensor,
    upper: torch.Tensor,
) -> tuple[torch.Tensor, float]:
    """Run the reference loop from ``x0``; return the final image (model input space) and the
    last loss."""
    x = x0.detach().clone().requires_grad_(True)
    params = list(model.parameters())
    opt = torch.optim.Adam([x], lr=lr)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        model.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        costs = 0.0
        dummy_norm = 0.0
        target_norm = 0.0
        for g, t in zip(grads, target, strict=True):
            costs = costs - (g * t).sum()
            dummy_norm = dummy_norm + g.pow(2).sum()
            target_norm = target_norm + t.pow(2).sum()
        rec = 1 + costs / dummy_norm.sqrt() / target_norm.sqrt()  # type: ignore[union-attr]
        dx = torch.mean(torch.abs(x[:, :, :, :-1] - x[:, :, :, 1:]))
        dy = torch.mean(torch.abs(x[:, :, :-1, :] - x[:, :, 1:, :]))
        rec = rec + tv * (dx + dy)
        rec.backward()
        assert x.grad is not None
        x.grad.sign_()
        return rec

    loss = torch.tensor(float("nan"))
    for _ in range(iterations):
        loss = opt.step(closure)  # type: ignore[assignment]
        sched.step()
        with torch.no_grad():
            x.data = torch.max(torch.min(x, upper), lower)
    return x.detach(), float(loss.detach())

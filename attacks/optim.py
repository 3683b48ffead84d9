"""Optimisation loops shared by the attacks, with clean stops on divergence."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def _finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all())


def run_lbfgs(
    variables: Sequence[torch.Tensor],
    objective: Callable[[], torch.Tensor],
    *,
    iterations: int,
    lr: float = 1.0,
    max_iter: int = 20,
    tolerance: float | None = None,
    history_size: int = 100,
) -> tuple[float, int, bool]:
    """DLG's optimiser: ``iterations`` L-BFGS steps (each up to ``max_iter`` evaluations).

    Stops early when the loss falls below ``tolerance`` (iDLG: 1e-6). On a NaN/inf loss or
    variable the variables are restored to the last finite state and the loop stops; returns
    (final loss, steps run, diverged).
    """
    opt = torch.optim.LBFGS(
        list(variables),
        lr=lr,
        max_iter=max_iter,
        history_size=history_size,
        line_search_fn=None,
    )

    def closure() -> torch.Tensor:
        loss = objective()
        grads = torch.autograd.grad(loss, list(variables))
        for v, g in zip(variables, grads, strict=True):
            v.grad = g
        return loss.detach()

    saved = [v.detach().clone() for v in variables]
    last = math.inf
    for step in range(iterations):
        loss = opt.step(closure)
        value = float(loss) if loss is not None else math.nan
        if not math.isfinite(value) or not all(_finite(v) for v in variables):
            with torch.no_grad():
                for v, s in zip(variables, saved, strict=True):
                    v.copy_(s)
            return last, step, True
        with torch.no_grad():
            for v, s in zip(variables, saved, strict=True):
                s.copy_(v)
        last = value
        if tolerance is not None and value < tolerance:
            return _final(objective, last), step + 1, False
    return _final(objective, last), iterations, False


def _final(objective: Callable[[], torch.Tensor], fallback: float) -> float:
    """The objective at the final variables (L-BFGS reports the loss before its last step)."""
    with torch.enable_grad():
        value = float(objective().detach())
    return value if math.isfinite(value) else fallback


def run_signed_adam(
    x: torch.Tensor,
    objective: Callable[[], torch.Tensor],
    *,
    iterations: int,
    lr: float,
    lower: torch.Tensor | None = None,
    upper: torch.Tensor | None = None,
    decay: bool = True,
    signed: bool = True,
    extra: Sequence[torch.Tensor] = (),
) -> tuple[float, int, bool]:
    """Inverting Gradients' optimiser: Adam on the sign of the gradient, step decay by 0.1 at
    3/8, 5/8 and 7/8 of the iterations, and the image boxed to ``[lower, upper]`` after each
    step. ``extra`` variables (e.g. a learnable scale) use plain gradients. Stops cleanly on
    divergence, restoring the last finite state; returns (final loss, steps run, diverged)."""
    opt = torch.optim.Adam([x, *extra], lr=lr)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    saved = [v.detach().clone() for v in (x, *extra)]
    last = math.inf
    for step in range(iterations):
        opt.zero_grad(set_to_none=False)
        loss = objective()
        value = float(loss.detach())
        if not math.isfinite(value):
            with torch.no_grad():
                for v, s in zip((x, *extra), saved, strict=True):
                    v.copy_(s)
            return last, step, True
        grads = torch.autograd.grad(loss, [x, *extra])
        x.grad = grads[0].sign() if signed else grads[0]
        for v, g in zip(extra, grads[1:], strict=True):
            v.grad = g
        opt.step()
        if decay:
            sched.step()
        with torch.no_grad():
            if lower is not None and upper is not None:
                torch.maximum(torch.minimum(x, upper, out=x), lower, out=x)
            for v, s in zip((x, *extra), saved, strict=True):
                s.copy_(v)
        last = value
    return _final(objective, last), iterations, False


def run_adam(
    variables: Sequence[torch.Tensor],
    objective: Callable[[], torch.Tensor],
    *,
    iterations: int,
    lr: float,
) -> tuple[float, int, bool]:
    """Plain Adam (DLM on an MLP uses Adam, lr 0.1). Same divergence handling as above."""
    opt = torch.optim.Adam(list(variables), lr=lr)
    saved = [v.detach().clone() for v in variables]
    last = math.inf
    for step in range(iterations):
        opt.zero_grad()
        loss = objective()
        value = float(loss.detach())
        if not math.isfinite(value):
            with torch.no_grad():
                for v, s in zip(variables, saved, strict=True):
                    v.copy_(s)
            return last, step, True
        grads = torch.autograd.grad(loss, list(variables))
        for v, g in zip(variables, grads, strict=True):
            v.grad = g
        opt.step()
        with torch.no_grad():
            for v, s in zip(variables, saved, strict=True):
                s.copy_(v)
        last = value
    return _final(objective, last), iterations, False

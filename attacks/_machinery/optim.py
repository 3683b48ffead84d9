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
        loss = opt.step(closure)  # type: ignore[no-untyped-call]  # torch's LBFGS.step: no hints
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


def _constrain(
    x: torch.Tensor,
    project: Callable[[torch.Tensor], None] | None,
    lower: torch.Tensor | None,
    upper: torch.Tensor | None,
) -> None:
    """After an optimiser step: the in-place ``project(x)`` when given, then the box."""
    if project is not None:
        project(x)
    if lower is not None and upper is not None:
        torch.maximum(torch.minimum(x, upper, out=x), lower, out=x)


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
    project: Callable[[torch.Tensor], None] | None = None,
) -> tuple[float, int, bool]:
    """Inverting Gradients' optimiser: Adam on the sign of the gradient, step decay by 0.1 at
    3/8, 5/8 and 7/8 of the iterations, and the image boxed to ``[lower, upper]`` after each
    step (after ``project(x)``, an in-place projection, when given). ``extra`` variables (e.g.
    a learnable scale) use plain gradients. Stops cleanly on divergence, restoring the last
    finite state; returns (final loss, steps run, diverged)."""
    losses, steps, diverged = _signed_adam(
        x,
        objective,
        iterations=iterations,
        lr=lr,
        lower=lower,
        upper=upper,
        decay=decay,
        signed=signed,
        extra=extra,
        batched=False,
        project=project,
    )
    return losses[0], steps[0], diverged[0]


def run_signed_adam_batched(
    x: torch.Tensor,
    objective: Callable[[], torch.Tensor],
    *,
    iterations: int,
    lr: float,
    lower: torch.Tensor | None = None,
    upper: torch.Tensor | None = None,
    decay: bool = True,
    signed: bool = True,
) -> tuple[list[float], list[int], list[bool]]:
    """:func:`run_signed_adam` for V independent problems stacked along dim 0 of ``x``.

    ``objective`` returns the (V,) per-victim losses, victim ``v``'s depending on ``x[v]``
    only; the gradient of their sum is then each victim's own gradient, and since the sign, Adam,
    the step decay and the box (``lower``/``upper`` broadcast against ``x``, e.g. (V, 1, C, 1, 1))
    all act elementwise, every ``x[v]`` follows the trajectory of its own
    :func:`run_signed_adam` run. A victim whose loss turns non-finite is restored to its last
    finite state and frozen there, as a separate run would stop; the others go on. Returns the
    per-victim (final losses, steps run, diverged)."""
    return _signed_adam(
        x,
        objective,
        iterations=iterations,
        lr=lr,
        lower=lower,
        upper=upper,
        decay=decay,
        signed=signed,
        extra=(),
        batched=True,
    )


def _signed_adam(
    x: torch.Tensor,
    objective: Callable[[], torch.Tensor],
    *,
    iterations: int,
    lr: float,
    lower: torch.Tensor | None,
    upper: torch.Tensor | None,
    decay: bool,
    signed: bool,
    extra: Sequence[torch.Tensor],
    batched: bool,
    project: Callable[[torch.Tensor], None] | None = None,
) -> tuple[list[float], list[int], list[bool]]:
    """The loop of :func:`run_signed_adam` (one problem: a scalar loss, ``x`` and ``extra``
    restored together) and :func:`run_signed_adam_batched` (``batched``: a (V,) loss, ``x[v]``
    restored and frozen per victim, no ``extra``)."""
    if batched and extra:
        raise ValueError("extra variables are not supported for batched victims")
    variables = [x, *extra]
    opt = torch.optim.Adam(variables, lr=lr)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    saved = [v.detach().clone() for v in variables]
    count = x.shape[0] if batched else 1
    last = [math.inf] * count
    steps = [iterations] * count
    diverged = [False] * count
    frozen: list[int] = []
    for step in range(iterations):
        opt.zero_grad(set_to_none=False)
        loss = objective()
        values = loss.detach().reshape(-1).tolist() if batched else [float(loss.detach())]
        bad = [v for v in range(count) if v not in frozen and not math.isfinite(values[v])]
        if bad:
            for v in bad:
                steps[v], diverged[v] = step, True
            frozen.extend(bad)
            if len(frozen) == count:
                with torch.no_grad():
                    for var, s in zip(variables, saved, strict=True):
                        var.copy_(s)
                return last, steps, diverged
            # the others go on; a frozen x[v] is put back to saved[v] after every step
        grads = torch.autograd.grad(loss.sum() if batched else loss, variables)
        x.grad = grads[0].sign() if signed else grads[0]
        for v in frozen:
            x.grad[v] = 0
        for var, g in zip(extra, grads[1:], strict=True):
            var.grad = g
        opt.step()
        if decay:
            sched.step()
        with torch.no_grad():
            _constrain(x, project, lower, upper)
            for v in frozen:
                x[v].copy_(saved[0][v])
            for var, s in zip(variables, saved, strict=True):
                s.copy_(var)
        for v in range(count):
            if v not in frozen:
                last[v] = values[v]
    if not batched:
        return [_final(objective, last[0])], steps, diverged
    with torch.enable_grad():
        final = objective().detach().reshape(-1).tolist()
    return (
        [last[v] if v in frozen or not math.isfinite(final[v]) else final[v] for v in range(count)],
        steps,
        diverged,
    )


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


def _warmup_cosine(iterations: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at
    ``iterations`` (breaching's ``cosine-decay`` with ``warmup``)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(iterations - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))

    return factor


def run_langevin_adam(
    x: torch.Tensor,
    objective: Callable[[], torch.Tensor],
    *,
    iterations: int,
    lr: float,
    generator: torch.Generator,
    warmup: int = 50,
    noise: float = 0.0,
    signed: bool = False,
    lower: torch.Tensor | None = None,
    upper: torch.Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
    project: Callable[[torch.Tensor], None] | None = None,
) -> tuple[float, int, bool]:
    """GradInversion's optimiser (Yin et al. 2021, as breaching runs it): Adam with a linear
    warm-up then cosine decay, Langevin noise ``noise * lr_t * N(0, 1)`` added to the gradient
    (drawn from ``generator``), optionally its sign, and the image boxed after every step.
    ``on_step(step)`` runs before each step (e.g. to refresh a group consensus), ``project(x)``
    after it, before the box. Stops cleanly
    on divergence, restoring the last finite ``x``; returns (final loss, steps run, diverged)."""
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(iterations, warmup))
    saved = x.detach().clone()
    last = math.inf
    for step in range(iterations):
        if on_step is not None:
            on_step(step)
        opt.zero_grad(set_to_none=False)
        loss = objective()
        value = float(loss.detach())
        if not math.isfinite(value):
            with torch.no_grad():
                x.copy_(saved)
            return last, step, True
        (grad,) = torch.autograd.grad(loss, [x])
        if noise > 0:
            step_size = opt.param_groups[0]["lr"]
            grad = grad + noise * step_size * torch.randn(
                x.shape, generator=generator, device=x.device, dtype=x.dtype
            )
        x.grad = grad.sign() if signed else grad
        opt.step()
        sched.step()
        with torch.no_grad():
            _constrain(x, project, lower, upper)
            saved.copy_(x)
        last = value
    return _final(objective, last), iterations, False

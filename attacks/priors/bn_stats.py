"""BatchNorm statistics of a private batch, read from the running buffers a client returns, and
the DeepInversion prior that matches a dummy batch's statistics to them (Yin et al., CVPR 2020
and CVPR 2021; the algebra and its limits are in docs/batchnorm.md).

A train-mode BatchNorm layer with momentum ``m`` updates ``r <- (1 - m) r + m s`` once per
forward, with ``s`` the batch mean, or the batch variance with Bessel's correction ``n/(n-1)``
(``n`` = images x pixels per channel). Over the K forwards of a client step the server so
learns ``r_K - prod_k(1 - m_k) r_0 = sum_k c_k s_k``: after one step (FedSGD, or FedAvg with
one local step) the batch's own statistics exactly, after several a known mixture of the
per-step statistics, which :class:`BatchNormRecorder` forms the same way for the dummy batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from fl.simulation.observation import Observation

BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
"""Layers whose running buffers reveal the statistics of the batch they normalised."""


@dataclass(frozen=True)
class BatchNormTarget:
    """What the returned buffers tell of one BatchNorm layer's inputs in the client step.

    Attributes:
        mean: ``sum_k w_k mean_k`` per channel, ``w`` = :attr:`weights`.
        var: ``sum_k w_k var_k * n_k / (n_k - 1)`` per channel (the running buffers' unbiased
            variance), ``n_k`` = values per channel in forward ``k``.
        weights: the mixing weights of the K forwards (sum 1); one forward: ``(1.0,)``.
        counts: ``n_k`` of each forward.
    """

    mean: torch.Tensor
    var: torch.Tensor
    weights: tuple[float, ...]
    counts: tuple[int, ...]

    @property
    def exact(self) -> bool:
        """Whether these are the statistics of one batch (one forward), not a mixture."""
        return len(self.weights) == 1

    @property
    def batch_var(self) -> torch.Tensor:
        """The biased variance of the batch (one forward only), as BatchNorm normalised with.

        Raises:
            ValueError: the target mixes several forwards.
        """
        if not self.exact:
            raise ValueError("batch_var is only defined for one forward; use var (a mixture)")
        n = self.counts[0]
        return self.var * (n - 1) / n


def step_batch_sizes(num_examples: int, batch_size: int, steps: int) -> list[int]:
    """Sizes of the mini-batches of ``steps`` local steps over ``num_examples`` taken in order
    (the last of an epoch may be smaller), as the client and the unrolled attacks take them."""
    sizes: list[int] = []
    start = 0
    for _ in range(steps):
        stop = min(start + batch_size, num_examples)
        sizes.append(stop - start)
        start = 0 if stop >= num_examples else stop
    return sizes


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers of ``model`` that track running statistics, in forward order."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, BATCHNORM_TYPES) and getattr(m, "track_running_stats", False)
    ]


def _values_per_image(model: nn.Module, obs: Observation) -> dict[str, int]:
    """Values per channel per image at each BatchNorm input (pixels), by one eval-mode forward
    of a zero image (eval mode leaves the buffers untouched)."""
    shapes: dict[str, int] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda _m, args, name=n: shapes.__setitem__(name, args[0][0, 0].numel())
        )
        for n, m in batchnorm_layers(model)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *obs.image_shape), device=obs.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def _forward_sizes(obs: Observation) -> list[int]:
    """Batch size of each train-mode forward the client ran: one for a gradient message, one
    per local step for a weights message."""
    if obs.kind == "gradient":
        return [obs.num_examples]
    if obs.local_steps is None:
        raise ValueError(
            "BatchNorm statistics of a FedAvg update need the number of local steps "
            "(AttackerCapabilities(knows_local_steps=True))"
        )
    batch = obs.batch_size or obs.num_examples
    return step_batch_sizes(obs.num_examples, batch, obs.local_steps)


def _momenta(module: nn.Module, tracked: float, forwards: int) -> list[float]:
    """The update factor of each forward: the layer's momentum, or for ``momentum=None``
    PyTorch's cumulative average ``1 / (batches tracked + 1)``."""
    m = getattr(module, "momentum", None)
    if m is not None:
        return [float(m)] * forwards
    return [1.0 / (tracked + k + 1) for k in range(forwards)]


def batchnorm_targets(obs: Observation) -> dict[str, BatchNormTarget]:
    """The statistics of the private batch at every BatchNorm layer, from the buffers the
    client returned (``obs.buffers``) and those the server sent (``obs.global_state``).

    Args:
        obs: a client step whose ``buffers`` are granted (``knows_bn_stats=True``).

    Returns:
        One :class:`BatchNormTarget` per BatchNorm layer name (empty without BatchNorm).

    Raises:
        ValueError: the buffers are missing, or a FedAvg step hides its number of local steps.

    Example:
        >>> targets = batchnorm_targets(obs)  # doctest: +SKIP
        >>> targets["features.norm0"].mean  # doctest: +SKIP
    """
    layers = batchnorm_layers(obs.model)
    if not layers:
        return {}
    missing = [n for n, _ in layers if f"{n}.running_mean" not in obs.buffers]
    if missing:
        raise ValueError(
            f"the observation carries no returned BatchNorm buffers for {missing[:3]}; grant "
            "them with AttackerCapabilities(knows_bn_stats=True)"
        )
    sizes = _forward_sizes(obs)
    pixels = _values_per_image(obs.model, obs)
    out: dict[str, BatchNormTarget] = {}
    for name, module in layers:
        tracked_name = f"{name}.num_batches_tracked"
        tracked = float(obs.global_state.get(tracked_name, torch.tensor(0)))
        momenta = _momenta(module, tracked, len(sizes))
        keep, coeffs = 1.0, [0.0] * len(sizes)
        for k in reversed(range(len(sizes))):
            coeffs[k] = momenta[k] * keep
            keep *= 1.0 - momenta[k]
        total = sum(coeffs)
        stats = []
        for buffer in ("running_mean", "running_var"):
            new = obs.buffers[f"{name}.{buffer}"].to(obs.device)
            old = obs.global_state[f"{name}.{buffer}"].to(obs.device)
            mixed = (new.double() - keep * old.double()) / total
            stats.append(mixed.to(new.dtype))
        out[name] = BatchNormTarget(
            mean=stats[0],
            var=stats[1],
            weights=tuple(c / total for c in coeffs),
            counts=tuple(b * pixels[name] for b in sizes),
        )
    return out


def has_running_statistics(obs: Observation) -> bool:
    """Whether the sent model has BatchNorm layers that have all tracked at least one batch
    (what :func:`running_targets` needs; no forward)."""
    layers = batchnorm_layers(obs.model)
    tracked = [float(obs.global_state.get(f"{n}.num_batches_tracked", 0)) for n, _ in layers]
    return bool(layers) and min(tracked) > 0


def running_targets(obs: Observation) -> dict[str, BatchNormTarget]:
    """The running statistics of the model the server sent (``obs.global_state``), as one-forward
    targets: what the federation's past batches looked like, known to every server without the
    client's returned buffers (DeepInversion's setting, Yin et al., CVPR 2020). Empty for a
    model without BatchNorm or whose layers never tracked a batch (fresh buffers say nothing).

    Example:
        >>> targets = running_targets(obs)  # doctest: +SKIP
    """
    if not has_running_statistics(obs):
        return {}
    layers = batchnorm_layers(obs.model)
    pixels = _values_per_image(obs.model, obs)
    size = max(int(obs.batch_size or obs.num_examples), 2)
    return {
        name: BatchNormTarget(
            mean=obs.global_state[f"{name}.running_mean"].to(obs.device),
            var=obs.global_state[f"{name}.running_var"].to(obs.device),
            weights=(1.0,),
            counts=(size * pixels[name],),
        )
        for name, _ in layers
    }


class BatchNormRecorder:
    """Records, while active, the mean and unbiased variance of every BatchNorm layer's input
    at each forward, and scores them against :func:`batchnorm_targets` with DeepInversion's
    feature distance (Yin et al., CVPR 2020, eq. 7; GradInversion, CVPR 2021, eq. 6)."""

    def __init__(self, model: nn.Module, targets: dict[str, BatchNormTarget]) -> None:
        self.model = model
        self.targets = targets
        self.names = [n for n, _ in batchnorm_layers(model) if n in targets]
        self.seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in self.names}

    @contextlib.contextmanager
    def recording(self) -> Iterator[BatchNormRecorder]:
        """Clear the record and hook the layers for the block."""
        for n in self.names:
            self.seen[n] = []
        modules = dict(self.model.named_modules())
        handles = [
            modules[n].register_forward_pre_hook(
                lambda _m, args, name=n: self.seen[name].append(_channel_stats(args[0]))
            )
            for n in self.names
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def loss(self, first_multiplier: float = 10.0, relative: bool = False) -> torch.Tensor:
        """``sum_l c_l (||mean_l(x') - mean_l|| + ||var_l(x') - var_l||)``, ``c`` =
        ``first_multiplier`` for the first layer and 1 after, each side mixed over the
        recorded forwards with the target's weights. ``relative``: each channel's difference
        in units of the target (mean over the target's std, variance over its variance), as a
        root mean square over channels, so the term does not depend on a layer's scale.

        Raises:
            ValueError: a layer saw a different number of forwards than its target mixes.
        """
        total: torch.Tensor | float = 0.0
        for i, name in enumerate(self.names):
            target, seen = self.targets[name], self.seen[name]
            if len(seen) != len(target.weights):
                raise ValueError(
                    f"BatchNorm layer {name!r}: {len(seen)} forwards recorded, the client ran "
                    f"{len(target.weights)}"
                )
            mean = cast(
                torch.Tensor, sum(w * m for w, (m, _) in zip(target.weights, seen, strict=True))
            )
            var = cast(
                torch.Tensor, sum(w * v for w, (_, v) in zip(target.weights, seen, strict=True))
            )
            distance = _relative_distance if relative else _distance
            term = distance(mean, var, target)
            total = total + (first_multiplier if i == 0 else 1.0) * term
        return total if isinstance(total, torch.Tensor) else torch.zeros(())


def _distance(mean: torch.Tensor, var: torch.Tensor, target: BatchNormTarget) -> torch.Tensor:
    """DeepInversion's distance: the 2-norms of the mean and variance differences."""
    mean_term: torch.Tensor = torch.linalg.vector_norm(mean - target.mean)
    var_term: torch.Tensor = torch.linalg.vector_norm(var - target.var)
    return mean_term + var_term


def _relative_distance(
    mean: torch.Tensor, var: torch.Tensor, target: BatchNormTarget
) -> torch.Tensor:
    """The differences in the target's units: RMS over channels of ``(mean - m) / sqrt(v)``
    plus that of ``var / v - 1``."""
    scale = target.var.clamp_min(1e-8)
    shift = ((mean - target.mean) ** 2 / scale).mean().sqrt()
    spread = ((var / scale - 1.0) ** 2).mean().sqrt()
    return shift + spread


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of a BatchNorm input (N, C, ...), as the running
    buffers accumulate them."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(dim=1), flat.var(dim=1, unbiased=True)


class _ReachedError(Exception):
    """Raised by a hook to end a forward once the first BatchNorm input is known."""


class FirstLayerMeans:
    """Projection of a dummy batch onto the channel means the first BatchNorm layer saw.

    The first BatchNorm input of a ConvNet or ResNet is an affine function of the image (a
    convolution), so shifting input channel ``c`` by ``d_c`` shifts that layer's channel means
    by exactly ``J d`` with a constant Jacobian ``J`` (out channels x in channels). After each
    optimiser step :meth:`project` adds the least-squares shift that makes the batch's means
    those the buffers reveal: the per-channel brightness that a train-mode BatchNorm hides from
    the gradient. For a mixture of several local steps the target is the mixture's mean (an
    approximation: the steps' weights differ slightly). An extension of GradInversion's prior
    (docs/batchnorm.md).
    """

    def __init__(self, model: nn.Module, name: str, target: BatchNormTarget, x: torch.Tensor):
        self.model = model
        self.module = dict(model.named_modules())[name]
        self.target = target.mean.detach()
        self.jacobian = torch.linalg.pinv(self._jacobian(x.reshape(-1, *x.shape[-3:])[:1]))

    def _means(self, x: torch.Tensor) -> torch.Tensor:
        """Channel means of the first BatchNorm input for batch ``x`` (a truncated forward)."""
        seen: list[torch.Tensor] = []

        def stop(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen.append(_channel_stats(args[0])[0])
            raise _ReachedError

        handle = self.module.register_forward_pre_hook(stop)
        try:
            self.model(x)
        except _ReachedError:
            pass
        finally:
            handle.remove()
        if not seen:
            raise ValueError("the first BatchNorm layer was not reached by the forward")
        return seen[0]

    def _jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """d(first-layer means) / d(per-channel shift), measured once (the map is affine)."""
        base = torch.zeros(x.shape[1], device=x.device, dtype=x.dtype)

        def means(shift: torch.Tensor) -> torch.Tensor:
            return self._means(x.detach() + shift.view(1, -1, 1, 1))

        jacobian = torch.autograd.functional.jacobian(  # type: ignore[no-untyped-call]  # no hints
            means, base
        )
        return cast(torch.Tensor, jacobian)  # one tensor in, one Jacobian tensor out

    @torch.no_grad()
    def project(self, x: torch.Tensor) -> None:
        """Shift ``x`` (B, C, H, W), or every member of (G, B, C, H, W), in place so that its
        first-layer channel means are the target's."""
        members = x if x.ndim == 5 else x.unsqueeze(0)
        for member in members:
            shift = self.jacobian @ (self.target - self._means(member))
            member.add_(shift.view(1, -1, 1, 1))

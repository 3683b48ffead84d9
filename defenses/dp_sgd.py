"""DP-SGD: per-example clipping plus Gaussian noise, with Rényi-DP accounting per client.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, "Deep Learning with Differential
Privacy", CCS 2016, Algorithm 1. For a lot (batch) ``L`` of size ``B`` each example's gradient
``g(x_i)`` is clipped to L2 norm ``C`` (all parameters together), the clipped gradients are
summed, Gaussian noise ``N(0, σ²C²I)`` is added and the sum is divided by ``B``:

    ḡ(x_i) = g(x_i) / max(1, ‖g(x_i)‖₂ / C)                    (Alg. 1, "clip gradient")
    g̃ = (1/B) (Σ_i ḡ(x_i) + N(0, σ²C²I))                       (Alg. 1, "add noise")

The privacy loss is tracked with Opacus's Rényi-DP accountant (Mironov 2017; Mironov, Talwar,
Zhang 2019, the sampled Gaussian mechanism), one accountant per client since each client's data
is protected by its own noisy steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, SupportsInt, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call, grad, vmap

from defenses.base import Defense, DefenseParams, ParamSpec, register_defense
from fl.simulation.hooks import ClientContext

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant

__all__ = ["DPSGD", "DPSGDParams", "check_dp_compatible", "clip_and_noise", "per_example_gradients"]

_CLIP_EPS = 1e-6
"""Added to the per-example norm before dividing (as Opacus does) so a zero gradient is safe."""


class DPSGDParams(DefenseParams):
    """DP-SGD hyperparameters: noise multiplier σ, clipping norm C and the accounting δ."""

    noise_multiplier: float = Field(
        1.0, gt=0, description="σ: noise std is σ·C on the summed clipped gradient."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="C: per-example L2 clipping norm.")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ at which epsilon() reports ε by default.")


def check_dp_compatible(model: nn.Module) -> None:
    """Raise ValueError if ``model`` cannot be trained with per-example DP-SGD.

    BatchNorm mixes the examples of a batch, so a per-example gradient (and hence per-example
    clipping, Abadi et al. 2016 Alg. 1) is undefined. A model auxiliary loss (e.g. PRECODE's KL
    term via ``auxiliary_loss()`` on a submodule) is a batch-level term whose per-example split is
    undefined too, so it is not supported with DP-SGD.
    """
    has_bn = getattr(model, "has_batchnorm", None)
    if callable(has_bn):
        uses_bn = bool(has_bn())
    else:
        uses_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if uses_bn:
        raise ValueError(
            "dp_sgd needs per-example gradients, which BatchNorm makes undefined (it mixes the "
            "examples of a batch); build the model with norm='group' (e.g. "
            "models.build('convnet', ..., norm='group')) or use a model without BatchNorm "
            "(e.g. 'lenet' or 'mlp')"
        )
    for name, module in model.named_modules():
        if module is model:
            continue
        if callable(getattr(module, "auxiliary_loss", None)):
            raise ValueError(
                f"dp_sgd does not support models with an auxiliary loss (module {name!r} defines "
                "auxiliary_loss(), e.g. a PRECODE bottleneck): a batch-level extra loss has no "
                "per-example gradient to clip; remove the bottleneck or use another defense"
            )


def per_example_gradients(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-example gradients of the cross-entropy loss, one row per example.

    Computes ``g(x_i) = ∇_W ℓ(F(x_i; W), y_i)`` (the per-example gradient of Abadi et al. 2016,
    Alg. 1) for every trainable parameter with ``torch.func`` (``vmap`` of ``grad`` of a
    ``functional_call`` on a batch of one). Frozen parameters and buffers are passed through
    unchanged. Returns name -> tensor of shape ``(B, *param.shape)``.
    """
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed: dict[str, torch.Tensor] = {
        n: p.detach() for n, p in model.named_parameters() if not p.requires_grad
    }
    fixed.update({n: b.detach() for n, b in model.named_buffers()})

    def loss_one(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (params, fixed), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")
    grads: dict[str, torch.Tensor] = per_example(trainable, inputs, labels)
    return grads


def clip_and_noise(
    per_example: dict[str, torch.Tensor],
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Clip each example's full gradient to L2 norm ``C``, sum, add N(0, (σC)²), divide by B.

    Abadi et al. 2016, Alg. 1: ``ḡ(x_i) = g(x_i) / max(1, ‖g(x_i)‖₂ / C)`` and
    ``g̃ = (Σ_i ḡ(x_i) + N(0, σ²C²I)) / B``. The norm is taken over all parameters together;
    the noise is drawn from ``generator`` (on the gradients' device).
    """
    first = next(iter(per_example.values()))
    batch = first.shape[0]
    sq = torch.zeros(batch, dtype=first.dtype, device=first.device)
    for g in per_example.values():
        sq = sq + g.reshape(batch, -1).pow(2).sum(dim=1)
    factor = (max_grad_norm / (sq.sqrt() + _CLIP_EPS)).clamp(max=1.0)
    std = noise_multiplier * max_grad_norm
    out: dict[str, torch.Tensor] = {}
    for name, g in per_example.items():
        summed = torch.einsum("b,b...->...", factor, g)
        noise = torch.randn(
            summed.shape, generator=generator, device=generator.device, dtype=summed.dtype
        ).to(summed.device)
        out[name] = (summed + std * noise) / batch
    return out


@register_defense("dp_sgd")
class DPSGD(Defense[DPSGDParams]):
    """DP-SGD (Abadi et al., CCS 2016, Alg. 1) as a client-side gradient replacement.

    Every local step's gradient is replaced by the clipped, noised mean of per-example gradients
    (:func:`per_example_gradients`, :func:`clip_and_noise`). Each client has its own Opacus
    :class:`~opacus.accountants.RDPAccountant`, stepped once per local step with the sampling rate
    ``q = B / n`` (``B`` the step's batch size, ``n`` = ``ctx.extras["client_size"]``, the
    client's number of training examples, which the simulator sets); when ``client_size`` is
    absent ``q = 1`` is assumed (no amplification by subsampling: conservative). The simulator
    draws shuffled fixed-size batches rather than Poisson samples, so, as in most DP-SGD
    implementations, the RDP bound of the sampled Gaussian mechanism with ``q = B / n`` is an
    approximation for that sampling scheme.

    Restrictions (checked in :meth:`prepare_model`): no BatchNorm (use ``norm="group"``), no
    model auxiliary loss (``auxiliary_loss()``, e.g. PRECODE). The defense's own ``extra_loss``
    hook is not used: the loss is plain cross-entropy.
    """

    Params = DPSGDParams
    search_space: ClassVar[dict[str, ParamSpec]] = {
        "noise_multiplier": ParamSpec(type="float", low=0.1, high=3.0, log=True),
        "max_grad_norm": ParamSpec(type="float", low=0.1, high=10.0, log=True),
    }
    params: DPSGDParams

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.accountants: dict[int, RDPAccountant] = {}

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Check the model suits per-example DP (see :func:`check_dp_compatible`); unchanged."""
        check_dp_compatible(model)
        return model

    def sample_rate(self, batch: int, ctx: ClientContext) -> float:
        """The accountant's sampling rate ``q = B / n`` of this step (1 if ``n`` is unknown)."""
        size = ctx.extras.get("client_size")
        if size is None:
            return 1.0
        n = int(cast(SupportsInt, size))  # the simulator sets it to an int
        if n < 1:
            raise ValueError(f"ctx.extras['client_size'] must be >= 1, got {size!r}")
        return min(1.0, batch / n)

    def compute_gradients(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        ctx: ClientContext,
    ) -> dict[str, torch.Tensor]:
        """The DP-SGD gradient of one local step (Abadi et al. 2016, Alg. 1); steps the
        client's accountant."""
        check_dp_compatible(model)
        p = self.params
        per_example = per_example_gradients(model, inputs, labels)
        grads = clip_and_noise(per_example, p.max_grad_norm, p.noise_multiplier, ctx.generator)
        accountant = self.accountants.get(ctx.client)
        if accountant is None:
            # Imported here: importing opacus costs about a second, paid only when DP-SGD runs.
            from opacus.accountants import RDPAccountant

            accountant = self.accountants[ctx.client] = RDPAccountant()
        accountant.step(
            noise_multiplier=p.noise_multiplier,
            sample_rate=self.sample_rate(int(inputs.shape[0]), ctx),
        )
        return grads

    def state_dict(self) -> dict[str, Any]:
        """Each client's accountant history: ``[noise_multiplier, sample_rate, steps]`` rows."""
        return {
            "accountants": {
                int(c): [[float(n), float(q), int(k)] for n, q, k in acc.history]
                for c, acc in self.accountants.items()
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the accountants from :meth:`state_dict`'s histories."""
        from opacus.accountants import RDPAccountant

        self.accountants = {}
        for client, history in state.get("accountants", {}).items():
            acc = RDPAccountant()
            acc.history = [(float(n), float(q), int(k)) for n, q, k in history]
            self.accountants[int(client)] = acc

    def epsilon(self, delta: float | None = None) -> float | None:
        """The worst-case ε over clients at ``delta`` (default: the ``delta`` hyperparameter).

        Each client's data is protected by its own accountant (RDP of the sampled Gaussian
        mechanism, converted to (ε, δ)-DP); the run's guarantee is the largest client ε.
        None before any DP step was taken.
        """
        d = self.params.delta if delta is None else float(delta)
        if not 0 < d < 1:
            raise ValueError(f"delta must be in (0, 1), got {d}")
        if not self.accountants:
            return None
        return max(float(acc.get_epsilon(delta=d)) for acc in self.accountants.values())

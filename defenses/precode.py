"""PRECODE: a variational bottleneck before the output layer (Scheliga, Mäder, Seeland, WACV 2022).

Reference code: dAI-SY-Group/PRECODE ``src/VariationalBottleneck.py`` (itself after
1Konny/VIB-pytorch). The bottleneck replaces the identity between a :class:`fl.models.SplitModel`'s
features and its classifier; its KL term (in bits) is added to the training loss through
:meth:`fl.models.SplitModel.auxiliary_loss`, which the client's training loss already picks up.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from defenses.base import Defense, DefenseParams, ParamSpec, register_defense

__all__ = ["PRECODE_AWARE_IGNORE", "Precode", "PrecodeParams", "VariationalBottleneck"]

PRECODE_AWARE_IGNORE: tuple[str, ...] = ("bottleneck", "classifier")
"""Parameter-name prefixes a PRECODE-aware attack leaves out of gradient matching.

The authors' follow-ups (Scheliga et al., arXiv 2208.04767 and 2309.04515) show that the
stochastic bottleneck only hides the input from the gradients of the layers *at and after* the
bottleneck; matching the gradients of the layers before it still inverts the input. Pass it as
``get_attack("inverting_gradients", ignore_layers=list(PRECODE_AWARE_IGNORE))``.
"""


class VariationalBottleneck(nn.Module):
    """PRECODE's variational bottleneck ``(B, d) -> (B, d)`` with a K-dimensional latent.

    Forward (the reference's ``VariationalBottleneck.forward``; the paper's variational module)::

        [mu, s] = encoder(x)            # Linear(d, 2K), mu = out[:, :K], s = out[:, K:]
        sigma   = softplus(s)
        z       = mu + sigma * eps,  eps ~ N(0, I)   # sampled in training AND evaluation
        out     = decoder(z)            # Linear(K, d)

    ``eps`` comes from :func:`torch.randn_like`, i.e. torch's global RNG, exactly as the reference
    samples in every mode (the model's outputs are therefore random even in ``eval()``); callers
    that need reproducibility seed torch's global RNG, as they do to build the model.

    The KL divergence of the last forward pass to the prior N(0, I), in bits (the reference's
    ``loss()``), is kept so that :meth:`auxiliary_loss` can return ``beta`` times it::

        KL = mean_b sum_k -1/2 (1 + 2 log sigma_bk - mu_bk^2 - sigma_bk^2) / ln 2

    Only the last value is kept, and it is dropped when the module is copied or pickled (it may
    hold an autograd graph, which :func:`copy.deepcopy` refuses to copy).
    """

    def __init__(self, feature_dim: int, bottleneck: int = 256, beta: float = 1e-3) -> None:
        """Build the encoder ``Linear(feature_dim, 2 * bottleneck)`` and the decoder
        ``Linear(bottleneck, feature_dim)`` (PyTorch's default initialisation, from torch's
        global RNG); ``beta`` weights the KL term returned by :meth:`auxiliary_loss`."""
        super().__init__()
        if feature_dim < 1 or bottleneck < 1:
            raise ValueError(
                f"feature_dim and bottleneck must be >= 1; got {feature_dim} and {bottleneck}"
            )
        if beta < 0:
            raise ValueError(f"beta must be >= 0; got {beta}")
        self.feature_dim = int(feature_dim)
        self.k = int(bottleneck)
        self.beta = float(beta)
        self.encoder = nn.Linear(self.feature_dim, 2 * self.k)
        self.decoder = nn.Linear(self.k, self.feature_dim)
        self._kl: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and standard deviation ``(mu, sigma)``, each (B, K)."""
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(
                f"VariationalBottleneck expects (B, {self.feature_dim}) features; "
                f"got {tuple(x.shape)}"
            )
        stats = self.encoder(x)
        return stats[:, : self.k], F.softplus(stats[:, self.k :])

    @staticmethod
    def kl_bits(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """KL(N(mu, diag sigma^2) || N(0, I)) in bits, summed over the latent and averaged over
        the batch: ``mean_b sum_k -1/2 (1 + 2 log sigma - mu^2 - sigma^2) / ln 2`` (closed-form
        Gaussian KL, divided by ln 2 as in the reference's ``loss()``)."""
        per_unit = -0.5 * (1 + 2 * sigma.log() - mu.pow(2) - sigma.pow(2))
        return per_unit.sum(dim=1).mean() / math.log(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sample ``z = mu + sigma * eps`` and decode it; records the KL of this pass."""
        mu, sigma = self.encode(x)
        self._kl = self.kl_bits(mu, sigma)
        z = mu + sigma * torch.randn_like(sigma)
        decoded: torch.Tensor = self.decoder(z)
        return decoded

    def kl(self) -> torch.Tensor | None:
        """The KL (bits) of the last forward pass, or None before the first one."""
        return self._kl

    def auxiliary_loss(self) -> torch.Tensor:
        """``beta * KL`` of the last forward pass: PRECODE's regulariser (the term the reference
        adds to the cross-entropy, ``ce(model(x), y) + model.loss()``). Raises if no forward
        pass has run since construction or copy."""
        if self._kl is None:
            raise RuntimeError(
                "VariationalBottleneck.auxiliary_loss() called before any forward pass; "
                "run the model on a batch first"
            )
        return self.beta * self._kl

    def __getstate__(self) -> dict[str, Any]:
        """Module state for copy/pickle, without the last KL (it may carry an autograd graph)."""
        # torch leaves nn.Module.__getstate__ unannotated
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]
        state["_kl"] = None
        return state

    def extra_repr(self) -> str:
        """Show the sizes and beta in ``print(model)``."""
        return f"feature_dim={self.feature_dim}, bottleneck={self.k}, beta={self.beta}"


class PrecodeParams(DefenseParams):
    """PRECODE's hyperparameters; defaults are the reference's ``K=256, beta=1e-3``."""

    bottleneck: int = Field(256, ge=1, description="Latent size K of the bottleneck.")
    beta: float = Field(1e-3, ge=0, description="Weight of the KL term (bits) in the loss.")


@register_defense("precode")
class Precode(Defense[PrecodeParams]):
    """PRECODE -- PRivacy EnhanCing mODulE (Scheliga, Mäder, Seeland, WACV 2022).

    :meth:`prepare_model` inserts a :class:`VariationalBottleneck` (K = ``bottleneck``, weight
    ``beta``) between the model's features and its classifier, i.e. right before the output
    layer as in the reference's ``VBMLP``; the client then trains on ``CE + beta * KL`` (the
    reference's training loss) through ``model.auxiliary_loss()``. The server's model has the same
    bottleneck (it is part of the architecture), so a gradient attack sees it too, and the
    attacker also knows the KL term.

    Deviations: none in the module or loss. The reference wraps convolutional inputs with a 1x1
    reducer; here the bottleneck always acts on the flat ``(B, feature_dim)`` classifier input,
    which is what every :class:`fl.models.SplitModel` provides. The bottleneck's layers are
    initialised from torch's global RNG (the caller seeds it, as for the model); its sampling
    also uses that RNG (``torch.randn_like``, as the reference), not ``ctx.generator``, because
    a module's forward has no client context.

    The adaptive attack of the authors' follow-ups ignores the gradients of the bottleneck and
    the classifier (:data:`PRECODE_AWARE_IGNORE`).
    """

    Params = PrecodeParams
    search_space: ClassVar[dict[str, ParamSpec]] = {
        "bottleneck": ParamSpec(type="int", low=16, high=512, log=True),
        "beta": ParamSpec(type="float", low=1e-5, high=1e-1, log=True),
    }

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Set ``model.bottleneck`` to a fresh :class:`VariationalBottleneck` of the model's
        ``feature_dim`` (on the model's device and dtype) and return the model.

        Raises TypeError for a model without the SplitModel attributes and ValueError if the
        model already has a non-identity bottleneck (it would be silently replaced).
        """
        feature_dim = getattr(model, "feature_dim", None)
        current = getattr(model, "bottleneck", None)
        if not isinstance(feature_dim, int) or current is None:
            raise TypeError(
                "PRECODE needs a SplitModel (attributes 'feature_dim' and 'bottleneck'); "
                f"got {type(model).__name__}"
            )
        if not isinstance(current, nn.Identity):
            raise ValueError(
                f"the model already has a bottleneck ({type(current).__name__}); "
                "PRECODE inserts its own and will not replace another"
            )
        p = self.params
        vb = VariationalBottleneck(feature_dim, p.bottleneck, p.beta)
        probe = next(model.parameters(), None)
        if probe is not None:
            vb = vb.to(device=probe.device, dtype=probe.dtype)
        model.bottleneck = vb
        return model

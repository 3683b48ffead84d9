"""The model contract shared by the simulator, the attacks and the defenses.

Every model in :mod:`fl.models` is a :class:`SplitModel`: a feature extractor, an (initially
empty) bottleneck and a final linear classifier, with
``forward(x) = classifier(bottleneck(features(x)))``.

The split is load-bearing:

* defenses such as PRECODE (Scheliga et al., WACV 2022) replace :attr:`SplitModel.bottleneck`
  with a variational module mapping ``(B, feature_dim) -> (B, feature_dim)`` and contribute a
  regulariser through :meth:`SplitModel.auxiliary_loss`;
* label-inference attacks (iDLG, Zhao et al. 2020; LLG, Wainakh et al. 2022) read the gradient of
  :meth:`SplitModel.last_layer`'s weight, and Soteria (Sun et al., CVPR 2021) perturbs the
  representation returned by :meth:`SplitModel.forward_features`.

This module also holds small helpers shared by the model builders (option-value checks and the
dummy-forward feature-size probe).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = [
    "SplitModel",
    "check_choice",
    "check_positive_int",
    "infer_feature_dim",
    "uniform_init_",
]


class SplitModel(nn.Module):
    """A classifier split into ``features -> bottleneck -> classifier``.

    Attributes:
        features: maps an image batch ``(B, C, H, W)`` to flat features ``(B, feature_dim)``.
        bottleneck: maps ``(B, feature_dim) -> (B, feature_dim)``; :class:`torch.nn.Identity` by
            default. Defenses (e.g. PRECODE) assign their own module here; if that module has an
            ``auxiliary_loss()`` method its value is exposed by :meth:`auxiliary_loss`.
        classifier: the final ``nn.Linear(feature_dim, num_classes)``.
        feature_dim: width of the representation fed to the classifier.
        num_classes: number of output logits.
        in_channels: number of input image channels the model was built for.
        image_size: side length (pixels) of the square input images the model was built for.
    """

    features: nn.Module
    bottleneck: nn.Module
    classifier: nn.Linear
    feature_dim: int
    num_classes: int
    in_channels: int
    image_size: int

    def __init__(
        self,
        features: nn.Module,
        classifier: nn.Linear,
        *,
        in_channels: int,
        image_size: int,
        bottleneck: nn.Module | None = None,
    ) -> None:
        """Assemble a split model.

        Args:
            features: feature extractor producing ``(B, classifier.in_features)``.
            classifier: final linear layer; its shape defines ``feature_dim`` and ``num_classes``.
            in_channels: input channels the model expects (recorded for callers).
            image_size: input side length the model expects (recorded for callers).
            bottleneck: optional module between features and classifier (identity if None).
        """
        super().__init__()
        if not isinstance(classifier, nn.Linear):
            raise TypeError(f"classifier must be an nn.Linear, got {type(classifier).__name__}")
        self.features = features
        self.bottleneck = nn.Identity() if bottleneck is None else bottleneck
        self.classifier = classifier
        self.feature_dim = int(classifier.in_features)
        self.num_classes = int(classifier.out_features)
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the classifier's input ``bottleneck(features(x))`` of shape (B, feature_dim).

        This is the representation label-inference attacks and Soteria operate on.
        """
        features: torch.Tensor = self.bottleneck(self.features(x))
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``classifier(bottleneck(features(x)))`` of shape (B, num_classes)."""
        logits: torch.Tensor = self.classifier(self.forward_features(x))
        return logits

    def last_layer(self) -> nn.Linear:
        """Return the final linear layer (whose weight gradient label inference reads)."""
        return self.classifier

    def auxiliary_loss(self) -> torch.Tensor | None:
        """Return the bottleneck's auxiliary loss term, or None if it has none.

        The bottleneck contributes one by defining a callable ``auxiliary_loss()`` (PRECODE's KL
        divergence of the last forward pass, for instance). Training code adds it to the task
        loss when it is not None.
        """
        hook = getattr(self.bottleneck, "auxiliary_loss", None)
        if callable(hook):
            term: torch.Tensor | None = hook()
            return term
        return None

    def has_batchnorm(self) -> bool:
        """Return True if any submodule is a batch-norm layer (of any dimensionality).

        Batch statistics leak information across a client's batch and change the behaviour of
        several attacks and of DP-SGD, so callers branch on this.
        """
        # _BatchNorm is the common base of BatchNorm{1,2,3}d, their lazy variants and SyncBatchNorm.
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())

    def extra_repr(self) -> str:
        """Summarise the split's shape parameters in ``print(model)``."""
        return (
            f"in_channels={self.in_channels}, image_size={self.image_size}, "
            f"feature_dim={self.feature_dim}, num_classes={self.num_classes}"
        )


def infer_feature_dim(features: nn.Module, channels: int, image_size: int) -> int:
    """Return the flat output width of ``features`` for one ``(channels, image_size²)`` image.

    Runs a single zero-input forward pass in eval mode and without gradients, so it neither
    touches batch-norm running statistics nor consumes random numbers; the module's training
    flags are restored afterwards. Used instead of closed-form size formulas so any input size
    the layers accept works.

    Raises:
        ValueError: if the input is too small for the layers (the message names the size).
    """
    modes = {m: m.training for m in features.modules()}
    probe = next(iter(features.parameters()), None)
    device = probe.device if probe is not None else torch.device("cpu")
    dtype = probe.dtype if probe is not None else torch.get_default_dtype()
    features.eval()
    try:
        with torch.no_grad():
            out = features(
                torch.zeros(1, channels, image_size, image_size, device=device, dtype=dtype)
            )
    except RuntimeError as exc:
        raise ValueError(
            f"image_size={image_size} is too small for this model's feature extractor: {exc}"
        ) from exc
    finally:
        for module, mode in modes.items():
            module.training = mode
    if out.dim() != 2 or out.shape[0] != 1 or out.shape[1] == 0:
        raise ValueError(
            f"feature extractor must return (B, feature_dim) with feature_dim > 0, "
            f"got shape {tuple(out.shape)} for image_size={image_size}"
        )
    return int(out.shape[1])


def uniform_init_(module: nn.Module, low: float = -0.5, high: float = 0.5) -> None:
    """Set every ``weight`` and ``bias`` tensor in ``module`` to U(low, high), in place.

    This is the initialisation of DLG (Zhu et al., NeurIPS 2019, ``weights_init`` in
    mit-han-lab/dlg ``models/vision.py``), also used by the DLM MLP; it makes gradients large
    and inversion easy, which is why attack-calibration models use it.
    """
    with torch.no_grad():
        for sub in module.modules():
            for name in ("weight", "bias"):
                tensor = getattr(sub, name, None)
                if isinstance(tensor, torch.Tensor):
                    tensor.uniform_(low, high)


def check_choice(option: str, value: object, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise raise a ValueError listing them."""
    allowed = list(choices)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"option {option!r} must be one of {', '.join(map(repr, allowed))}; got {value!r}"
        )
    return value


def check_positive_int(option: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1 (bools rejected); otherwise raise a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"option {option!r} must be a positive integer; got {value!r}")
    return value

"""Sigmoid LeNet of Deep Leakage from Gradients (DLG).

Zhu, Liu & Han, "Deep Leakage from Gradients", NeurIPS 2019; reference implementation
``LeNet`` in mit-han-lab/dlg ``models/vision.py``. It is the standard attack-calibration model
of the gradient-inversion literature: three 5x5 sigmoid convolutions and one linear layer,
twice differentiable everywhere, with weights drawn from U(-0.5, 0.5).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from fl.models.base import SplitModel, check_choice, infer_feature_dim, uniform_init_

__all__ = ["LENET_INITS", "build_lenet"]

LENET_INITS: tuple[str, ...] = ("uniform", "default")
"""Accepted values of the ``init`` option."""

_WIDTH = 12
"""Channels of every convolution, as in DLG."""


def build_lenet(
    channels: int,
    classes: int,
    image_size: int,
    *,
    init: Literal["uniform", "default"] = "uniform",
) -> SplitModel:
    """Build DLG's LeNet for ``channels``-channel images of side ``image_size``.

    Architecture (as in DLG): Conv(C, 12, 5, stride 2, pad 2)-Sigmoid, Conv(12, 12, 5, stride 2,
    pad 2)-Sigmoid, Conv(12, 12, 5, stride 1, pad 2)-Sigmoid, flatten, Linear(-> classes). The
    feature width is measured with a dummy forward: 12·(s/4)² for side s divisible by 4 (768 at
    32 px, 192 at 16 px) and 12·⌈⌈s/2⌉/2⌉² otherwise (588 at 28 px).

    Args:
        channels: input channels.
        classes: output classes.
        image_size: input side length in pixels.
        init: ``"uniform"`` (default) sets every weight and bias, classifier included, to
            U(-0.5, 0.5) exactly like DLG's ``weights_init``. It is the default because this
            model exists to calibrate gradient-inversion attacks against the published numbers.
            ``"default"`` keeps PyTorch's layer initialisation.
    """
    check_choice("init", init, LENET_INITS)
    features = nn.Sequential(
        nn.Conv2d(channels, _WIDTH, kernel_size=5, padding=5 // 2, stride=2),
        nn.Sigmoid(),
        nn.Conv2d(_WIDTH, _WIDTH, kernel_size=5, padding=5 // 2, stride=2),
        nn.Sigmoid(),
        nn.Conv2d(_WIDTH, _WIDTH, kernel_size=5, padding=5 // 2, stride=1),
        nn.Sigmoid(),
        nn.Flatten(),
    )
    feature_dim = infer_feature_dim(features, channels, image_size)
    model = SplitModel(
        features,
        nn.Linear(feature_dim, classes),
        in_channels=channels,
        image_size=image_size,
    )
    if init == "uniform":
        uniform_init_(model)
    return model

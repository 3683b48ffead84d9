"""ResNet-18 adapted to small federated-learning images.

He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016; built from
``torchvision.models.resnet18(weights=None)``. The CIFAR-style stem (a 3x3 stride-1 first
convolution and no max-pool) follows the small-image ResNets used in the gradient-inversion
literature (e.g. Geiping et al., NeurIPS 2020, ``inversefed/nn/models.py``). GroupNorm instead of
BatchNorm (Wu & He, ECCV 2018) is offered for DP-SGD and for studying batch-norm leakage.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import torchvision
from torch import nn

from fl.models.base import SplitModel, check_choice, check_positive_int

__all__ = ["RESNET_NORMS", "build_resnet18"]

_STEM_WIDTH = 64
"""Output channels of ResNet-18's first convolution (every stage width is a multiple)."""

RESNET_NORMS: dict[str, Callable[[int], Callable[[int], nn.Module]]] = {
    "batch": lambda _groups: nn.BatchNorm2d,
    "group": lambda groups: functools.partial(nn.GroupNorm, groups),
}
"""Registry of the ``norm`` option: groups -> torchvision ``norm_layer`` (channels -> module)."""


def build_resnet18(
    channels: int,
    classes: int,
    image_size: int,
    *,
    small_stem: bool = True,
    norm: Literal["batch", "group"] = "batch",
    groups: int = 32,
) -> SplitModel:
    """Build ResNet-18 with ``channels`` input channels and ``classes`` outputs.

    Split: ``features`` is everything up to and including the global average pool, followed by a
    flatten (feature_dim 512); ``classifier`` is torchvision's ``fc``. The adaptive average pool
    makes any ``image_size`` work (16 to 64 px with the small stem; the ImageNet stem downsamples
    32x, so small images reach the pool at 1x1).

    Args:
        channels: input channels (the first convolution is rebuilt for them).
        classes: output classes.
        image_size: input side length in pixels (recorded; the network is size-agnostic).
        small_stem: True (default) replaces the ImageNet stem (7x7 stride-2 conv + max-pool) by
            a 3x3 stride-1 conv and no max-pool, for 16-64 px images; False keeps the ImageNet
            stem (with ``channels`` inputs).
        norm: ``"batch"`` (torchvision default) or ``"group"`` (GroupNorm via torchvision's
            ``norm_layer`` argument, so the model has no BatchNorm at all).
        groups: GroupNorm groups when ``norm="group"``; must divide 64.
    """
    if not isinstance(small_stem, bool):
        raise ValueError(f"option 'small_stem' must be a bool; got {small_stem!r}")
    check_choice("norm", norm, RESNET_NORMS)
    groups = check_positive_int("groups", groups)
    if norm == "group" and _STEM_WIDTH % groups:
        raise ValueError(f"option 'groups' ({groups}) must divide {_STEM_WIDTH} for norm='group'")
    net = torchvision.models.resnet18(
        weights=None, num_classes=classes, norm_layer=RESNET_NORMS[norm](groups)
    )
    if small_stem:
        net.conv1 = nn.Conv2d(channels, _STEM_WIDTH, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    else:
        net.conv1 = nn.Conv2d(channels, _STEM_WIDTH, kernel_size=7, stride=2, padding=3, bias=False)
    # Same initialisation torchvision gives its own convolutions.
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")

    # Keep torchvision's submodule names so state-dict keys stay recognisable.
    features = nn.Sequential(
        OrderedDict(
            [
                ("conv1", net.conv1),
                ("bn1", net.bn1),
                ("relu", net.relu),
                ("maxpool", net.maxpool),
                ("layer1", net.layer1),
                ("layer2", net.layer2),
                ("layer3", net.layer3),
                ("layer4", net.layer4),
                ("avgpool", net.avgpool),
                ("flatten", nn.Flatten()),
            ]
        )
    )
    return SplitModel(features, net.fc, in_channels=channels, image_size=image_size)

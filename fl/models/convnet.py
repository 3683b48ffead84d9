"""ConvNet of Inverting Gradients.

Geiping, Bauermeister, Dröge & Moeller, "Inverting Gradients — How easy is it to break privacy
in federated learning?", NeurIPS 2020; reference implementation ``ConvNet`` in
JonasGeiping/invertinggradients ``inversefed/nn/models.py`` (``ConvNet64`` there is width 64,
about 2.9 M parameters at 32 px with 10 classes).

Layer placement, checked against the reference file: eight 3x3 (padding 1) convolutions, each
followed by a norm layer and ReLU, with channel widths

    conv0 C->w, conv1 w->2w, conv2 2w->2w, conv3 2w->4w, conv4..conv7 4w->4w,

and **two** max-pools of kernel (and stride) 3: ``pool0`` after conv5 and ``pool1`` after
conv7, then flatten and ``Linear(36·w, classes)`` (3x3 spatial at 32 px). The reference's
``OrderedDict`` lists ``conv6/bn6/relu6`` twice; the duplicate keys collapse to one block, so
the effective network has exactly these eight convolutions and two pools, which is what we build.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

from torch import nn

from fl.models.base import SplitModel, check_choice, check_positive_int, infer_feature_dim

__all__ = ["CONVNET_NORMS", "build_convnet"]

_POOL = 3
"""Kernel size and stride of both max-pools (as in the reference)."""

_POOL_AFTER = frozenset({5, 7})
"""Indices of the convolution blocks followed by a max-pool (as in the reference)."""

_WIDTH_MULTIPLIERS: tuple[tuple[int, int], ...] = (
    (0, 1),  # conv0: C  -> w   (0 marks the input channels)
    (1, 2),  # conv1: w  -> 2w
    (2, 2),  # conv2: 2w -> 2w
    (2, 4),  # conv3: 2w -> 4w
    (4, 4),  # conv4
    (4, 4),  # conv5, then pool0
    (4, 4),  # conv6
    (4, 4),  # conv7, then pool1
)
"""(input, output) channel multipliers of width for each convolution."""

NormFactory = Callable[[int, int], nn.Module]
"""(num_channels, groups) -> normalisation module."""

CONVNET_NORMS: dict[str, NormFactory] = {
    "batch": lambda ch, _groups: nn.BatchNorm2d(ch),
    "group": lambda ch, groups: nn.GroupNorm(groups, ch),
    "none": lambda _ch, _groups: nn.Identity(),
}
"""Registry of the ``norm`` option's values."""


def _pools_collapse(image_size: int) -> bool:
    """Return True if two floor-mode 3x3/stride-3 pools would shrink ``image_size`` to 0."""
    size = image_size
    for _ in _POOL_AFTER:
        size //= _POOL
    return size == 0


def build_convnet(
    channels: int,
    classes: int,
    image_size: int,
    *,
    width: int = 32,
    norm: Literal["batch", "group", "none"] = "batch",
    groups: int = 32,
) -> SplitModel:
    """Build the Inverting-Gradients ConvNet (see the module docstring for the layout).

    The feature width is measured with a dummy forward: 36·w at 32 px, 9·w at 28 px and 4·w at
    16 px. Fallback (not in the reference): for images smaller than 9 px, where two floor-mode
    pools would leave no pixels, the pools use ``ceil_mode=True`` instead.

    Args:
        channels: input channels.
        classes: output classes.
        image_size: input side length in pixels.
        width: base channel width w (the reference uses 64 for its experiments; 32 default here
            for speed).
        norm: ``"batch"`` (reference), ``"group"`` (GroupNorm, e.g. for DP-SGD, where batch
            statistics are not allowed) or ``"none"``.
        groups: number of GroupNorm groups when ``norm="group"``; must divide ``width``.
    """
    width = check_positive_int("width", width)
    check_choice("norm", norm, CONVNET_NORMS)
    groups = check_positive_int("groups", groups)
    if norm == "group" and width % groups:
        raise ValueError(
            f"option 'groups' ({groups}) must divide option 'width' ({width}) for norm='group'"
        )
    make_norm = CONVNET_NORMS[norm]
    ceil_mode = _pools_collapse(image_size)

    layers: OrderedDict[str, nn.Module] = OrderedDict()
    pool_index = 0
    for i, (mult_in, mult_out) in enumerate(_WIDTH_MULTIPLIERS):
        in_ch = channels if mult_in == 0 else mult_in * width
        out_ch = mult_out * width
        layers[f"conv{i}"] = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        layers[f"norm{i}"] = make_norm(out_ch, groups)
        layers[f"relu{i}"] = nn.ReLU()
        if i in _POOL_AFTER:
            layers[f"pool{pool_index}"] = nn.MaxPool2d(_POOL, ceil_mode=ceil_mode)
            pool_index += 1
    layers["flatten"] = nn.Flatten()
    features = nn.Sequential(layers)

    feature_dim = infer_feature_dim(features, channels, image_size)
    return SplitModel(
        features,
        nn.Linear(feature_dim, classes),
        in_channels=channels,
        image_size=image_size,
    )

"""Fully connected classifier (multi-layer perceptron).

Two configurations from the literature this tool reproduces:

* DLM — Zhao, Luo & Ding, "Deep Leakage from Model in Federated Learning", arXiv:2206.04887,
  2022: an MLP with one hidden layer of 32 units and U(-0.5, 0.5) initialisation, i.e.
  ``hidden=(32,), init="uniform"`` (``hidden=(32,)`` is the default here);
* PRECODE — Scheliga, Mäder & Seeland, "PRECODE — A Generic Model Extension to Prevent Deep
  Gradient Leakage", WACV 2022, evaluate an MLP with two hidden layers of 1024 units:
  ``hidden=(1024, 1024)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from torch import nn

from fl.models.base import SplitModel, check_choice, check_positive_int, uniform_init_

__all__ = ["MLP_ACTIVATIONS", "MLP_INITS", "build_mlp"]

MLP_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}
"""Registry of the ``activation`` option's values."""

MLP_INITS: tuple[str, ...] = ("default", "uniform")
"""Accepted values of the ``init`` option."""


def _check_hidden(hidden: object) -> tuple[int, ...]:
    """Return ``hidden`` as a tuple of positive ints (lists from config files are accepted)."""
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise ValueError(f"option 'hidden' must be a sequence of positive integers; got {hidden!r}")
    return tuple(check_positive_int("hidden", h) for h in hidden)


def build_mlp(
    channels: int,
    classes: int,
    image_size: int,
    *,
    hidden: tuple[int, ...] = (32,),
    activation: Literal["relu", "sigmoid", "tanh"] = "relu",
    init: Literal["uniform", "default"] = "default",
) -> SplitModel:
    """Build ``Flatten -> [Linear(d, h) -> activation for h in hidden] -> Linear(h_last, classes)``.

    ``d = channels · image_size²``. The features are everything before the last Linear, so
    ``feature_dim`` is ``hidden[-1]`` (or ``d`` when ``hidden`` is empty: logistic regression).

    Args:
        channels: input channels.
        classes: output classes.
        image_size: input side length in pixels.
        hidden: hidden-layer widths; ``(32,)`` is DLM's MLP, ``(1024, 1024)`` PRECODE's.
        activation: ``"relu"``, ``"sigmoid"`` or ``"tanh"`` after every hidden Linear.
        init: ``"default"`` keeps PyTorch's initialisation; ``"uniform"`` sets every weight and
            bias to U(-0.5, 0.5) as in DLM (and DLG).
    """
    hidden = _check_hidden(hidden)
    check_choice("activation", activation, MLP_ACTIVATIONS)
    check_choice("init", init, MLP_INITS)
    make_activation = MLP_ACTIVATIONS[activation]

    layers: list[nn.Module] = [nn.Flatten()]
    width = channels * image_size * image_size
    for h in hidden:
        layers += [nn.Linear(width, h), make_activation()]
        width = h
    model = SplitModel(
        nn.Sequential(*layers),
        nn.Linear(width, classes),
        in_channels=channels,
        image_size=image_size,
    )
    if init == "uniform":
        uniform_init_(model)
    return model

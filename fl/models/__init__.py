"""Model zoo for the federated-learning simulator, the attacks and the defenses.

Every model is a :class:`SplitModel` (``features -> bottleneck -> classifier``, see
:mod:`fl.models.base`) and is built by name through a registry::

    from fl import models

    models.available()                     # ['convnet', 'lenet', 'mlp', 'resnet18']
    net = models.build("convnet", channels=3, classes=10, image_size=32, width=64)
    models.options("convnet")              # {'width': 32, 'norm': 'batch', 'groups': 32}

Built-in models:

* ``lenet`` — sigmoid LeNet of DLG (Zhu et al., NeurIPS 2019), :mod:`fl.models.lenet`;
* ``convnet`` — ConvNet of Inverting Gradients (Geiping et al., NeurIPS 2020),
  :mod:`fl.models.convnet`;
* ``resnet18`` — torchvision ResNet-18 (He et al., CVPR 2016) with a small-image stem,
  :mod:`fl.models.resnet`;
* ``mlp`` — fully connected network (DLM / PRECODE configurations), :mod:`fl.models.mlp`.

Users add their own with :func:`register`. A builder is a callable
``builder(channels, classes, image_size, **options) -> SplitModel``: its first three parameters
receive the input channels, the number of classes and the image side length (positionally), and
every further parameter is a model option that must have a default. :func:`options` reports those
defaults by inspecting the signature, and :func:`build` rejects option names the builder does
not accept.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import TypeVar

from fl.models.base import SplitModel
from fl.models.convnet import build_convnet
from fl.models.lenet import build_lenet
from fl.models.mlp import build_mlp
from fl.models.resnet import build_resnet18
from fl.registry import Registry

__all__ = [
    "MODELS",
    "Builder",
    "SplitModel",
    "UnknownModelError",
    "UnknownOptionError",
    "available",
    "build",
    "options",
    "register",
    "unregister",
]

Builder = Callable[..., SplitModel]
"""A model builder: ``(channels, classes, image_size, **options) -> SplitModel``."""

_B = TypeVar("_B", bound=Callable[..., SplitModel])

_NUM_POSITIONAL = 3
"""Leading builder parameters that are not options: channels, classes, image_size."""


class UnknownModelError(ValueError):
    """Raised by :func:`build` / :func:`options` for a name that is not registered."""


class UnknownOptionError(TypeError, ValueError):
    """Raised by :func:`build` for a keyword option the model's builder does not accept.

    Subclasses both TypeError (what Python raises for an unexpected keyword argument) and
    ValueError (what configuration validation code usually catches).
    """


MODELS: Registry[Builder] = Registry(
    "model",
    UnknownModelError,
    taken_message="model name {name!r} is already registered to {current!r}; "
    "pass replace=True to replace it",
)
"""Model name -> builder. Filled with the built-ins below and by :func:`register`."""


def _option_parameters(builder: Builder) -> tuple[list[inspect.Parameter], bool]:
    """Return the builder's option parameters and whether it also takes ``**kwargs``.

    Raises:
        TypeError: if the builder cannot take channels, classes and image_size positionally,
            or if an option has no default.
    """
    params = list(inspect.signature(builder).parameters.values())
    positional = [
        p
        for p in params[:_NUM_POSITIONAL]
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) < _NUM_POSITIONAL:
        raise TypeError(
            f"model builder {builder!r} must take (channels, classes, image_size) as its first "
            f"three positional parameters"
        )
    opts: list[inspect.Parameter] = []
    var_keyword = False
    for p in params[_NUM_POSITIONAL:]:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        elif p.default is inspect.Parameter.empty:
            raise TypeError(
                f"model builder {builder!r}: option {p.name!r} must have a default value"
            )
        elif p.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise TypeError(
                f"model builder {builder!r}: option {p.name!r} must be passable by keyword"
            )
        else:
            opts.append(p)
    return opts, var_keyword


def register(
    name: str, *, replace: bool = False, overwrite: bool | None = None
) -> Callable[[_B], _B]:
    """Return a decorator registering a model builder under ``name``.

    Example::

        @models.register("tiny")
        def build_tiny(channels, classes, image_size, *, hidden=8):
            ...
            return SplitModel(features, nn.Linear(hidden, classes),
                              in_channels=channels, image_size=image_size)

    The builder's signature is checked when it is registered (see the module docstring).
    Registering the same function twice is a no-op; registering a different builder under a
    taken name raises ValueError unless ``replace`` is True (``overwrite`` is its deprecated
    former name).
    """
    if overwrite is not None:
        warnings.warn(
            "models.register(overwrite=) is deprecated; use replace=", DeprecationWarning, 2
        )
        replace = replace or overwrite
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(
            f"model name must be a non-empty string without surrounding spaces, got {name!r}"
        )

    def decorator(builder: _B) -> _B:
        if not callable(builder):
            raise TypeError(f"model builder for {name!r} must be callable, got {builder!r}")
        _option_parameters(builder)  # validate the signature now, not at first build
        MODELS.register(name, builder, replace=replace)
        return builder

    return decorator


def unregister(name: str) -> None:
    """Remove a registered model (mainly for tests and plugins); unknown names raise."""
    MODELS.unregister(name)


def available() -> list[str]:
    """Return the registered model names, sorted."""
    return MODELS.names()


def _lookup(name: str) -> Builder:
    """Return the builder registered under ``name`` or raise :class:`UnknownModelError`."""
    return MODELS.get(name)


def options(name: str) -> dict[str, object]:
    """Return the keyword options of model ``name`` mapped to their default values.

    Raises:
        UnknownModelError: if ``name`` is not registered.
    """
    opts, _ = _option_parameters(_lookup(name))
    return {p.name: p.default for p in opts}


def _check_size(argument: str, value: object) -> int:
    """Return ``value`` if it is a positive int (bools rejected), else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be a positive integer, got {value!r}")
    return value


def build(
    name: str, *, channels: int, classes: int, image_size: int, **options: object
) -> SplitModel:
    """Build model ``name`` for ``channels``-channel square images of side ``image_size``.

    Args:
        name: a registered model name (see :func:`available`).
        channels: input image channels (1 for MNIST-like data, 3 for CIFAR-like data).
        classes: number of output classes.
        image_size: side length in pixels of the (square) input images.
        **options: model-specific options (see :func:`options` and each builder's docstring).

    The model is built on the CPU in training mode; parameter initialisation draws from torch's
    global RNG, so seeding with ``torch.manual_seed`` makes the build reproducible.

    Raises:
        UnknownModelError: unknown ``name`` (the message lists the known names).
        UnknownOptionError: an option the model does not accept (the message names it and lists
            the accepted options).
        ValueError: a size argument or option value out of range.
    """
    builder = _lookup(name)
    channels = _check_size("channels", channels)
    classes = _check_size("classes", classes)
    image_size = _check_size("image_size", image_size)
    opts, var_keyword = _option_parameters(builder)
    accepted = [p.name for p in opts]
    unknown = sorted(set(options) - set(accepted))
    if unknown and not var_keyword:
        raise UnknownOptionError(
            f"model {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"accepted options: {', '.join(accepted) if accepted else '(none)'}"
        )
    model = builder(channels, classes, image_size, **options)
    if not isinstance(model, SplitModel):
        raise TypeError(
            f"builder for model {name!r} returned {type(model).__name__}, expected SplitModel"
        )
    return model


_BUILTINS: dict[str, Builder] = {
    "convnet": build_convnet,
    "lenet": build_lenet,
    "mlp": build_mlp,
    "resnet18": build_resnet18,
}
"""The models shipped with Obscura, registered at import time."""

for _name, _builder in _BUILTINS.items():
    register(_name)(_builder)
MODELS.mark_builtin()

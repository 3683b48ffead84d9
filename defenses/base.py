"""The defense interface: hooks on a federated run plus a declared search space.

A defense is a :class:`fl.simulation.ClientHooks` subclass (it may act on the model, on each
private batch before training, on the gradient computation, with an extra loss, and on the
outgoing update) that also declares its hyperparameters: a pydantic ``Params`` model with the
paper's defaults, and a :class:`ParamSpec` per tunable hyperparameter so that the orchestrator can
build an Optuna search space without knowing the defense.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fl.registry import Registry
from fl.simulation.hooks import ClientHooks


class DefenseConfigError(ValueError):
    """A defense was given an unknown hyperparameter or a value out of range."""


class UnknownDefenseError(ValueError):
    """No defense is registered under that name; the message lists the known ones."""


class ParamSpec(BaseModel):
    """The search range of one hyperparameter (Optuna's distributions).

    ``float``/``int``: ``low``..``high`` (inclusive), ``log`` for a log-uniform scale;
    ``categorical``: one of ``choices``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    type: Literal["float", "int", "categorical"] = Field(
        description="float or int (low..high, inclusive) or categorical (one of choices)."
    )
    low: float | None = Field(None, description="Lower end of a float or int range.")
    high: float | None = Field(None, description="Upper end of a float or int range.")
    log: bool = Field(False, description="Sample on a log scale (needs low > 0).")
    choices: tuple[Any, ...] | None = Field(None, description="A categorical range's values.")

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical range needs a non-empty 'choices' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range needs 'low' and 'high'")
        if self.low > self.high:
            raise ValueError(f"'low' ({self.low}) must not exceed 'high' ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0 (got {self.low})")
        return self

    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in this range."""
        if self.type == "categorical":
            return value in (self.choices or ())
        assert self.low is not None and self.high is not None
        return self.low <= float(value) <= self.high


class DefenseParams(BaseModel):
    """Base of every defense's hyperparameters (unknown names and NaN/infinity rejected)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


D = TypeVar("D", bound=DefenseParams)


class Defense(ClientHooks, Generic[D]):
    """Base class of every defense, generic in its hyperparameters model ``D``: validated
    ``params``, a declared ``search_space``.

    Subclasses set ``Params`` (defaults from the paper or its code) and ``search_space`` (the
    tunable hyperparameters and their ranges; every key must be a field of ``Params``) and
    override the :class:`fl.simulation.ClientHooks` methods they need. One instance serves one
    federated run and may keep per-client state (e.g. a generator per client).
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[DefenseParams]] = DefenseParams
    search_space: ClassVar[dict[str, ParamSpec]] = {}
    concurrent_clients: ClassVar[bool] = False
    params: D

    def __init__(self, **params: Any) -> None:
        try:
            self.params = cast(D, self.Params(**params))
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
            )
            known = ", ".join(self.Params.model_fields) or "(none)"
            raise DefenseConfigError(
                f"defense {self.name!r}: {problems} (hyperparameters: {known})"
            ) from None

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The default value of every hyperparameter."""
        return cls.Params().model_dump()


DEFENSES: Registry[type[Defense[Any]]] = Registry(
    "defense", UnknownDefenseError, taken_message="a defense named {name!r} is already registered"
)
"""Defense name -> class: the built-ins (marked in :mod:`defenses`) and users' own."""
_D = TypeVar("_D", bound=type[Defense[Any]])


def register_defense(name: str, *, replace: bool = False) -> Callable[[_D], _D]:
    """Class decorator registering a defense under ``name`` (also for users' own defenses);
    another class under a taken name raises ``ValueError`` unless ``replace``.

    Checks that every search-space key is a hyperparameter of the defense.
    """

    def deco(cls: _D) -> _D:
        DEFENSES.check_free(name, cls, replace=replace)
        unknown = set(cls.search_space) - set(cls.Params.model_fields)
        if unknown:
            raise ValueError(
                f"defense {name!r}: search_space names unknown fields {sorted(unknown)}"
            )
        cls.name = name
        DEFENSES.register(name, cls, replace=replace)
        return cls

    return deco


def available_defenses() -> list[str]:
    """Sorted names of the registered defenses."""
    return DEFENSES.names()


def defense_class(name: str) -> type[Defense[Any]]:
    """The class registered under ``name`` (:class:`UnknownDefenseError` lists the known ones)."""
    return DEFENSES.get(name)


def get_defense(name: str, **params: Any) -> Defense[Any]:
    """Build the defense registered under ``name`` with ``params`` over its defaults."""
    return defense_class(name)(**params)


def unregister_defense(name: str) -> None:
    """Remove a registered defense (for tests and plugins); an unknown name is ignored."""
    if name in DEFENSES:
        DEFENSES.unregister(name)


@register_defense("none")
class NoDefense(Defense[DefenseParams]):
    """The control: no defense at all. Every hook is a no-op, so the attacks see exactly what an
    undefended client sends; every study should include it to show that the attacks work."""

    concurrent_clients: ClassVar[bool] = True  # stateless

"""One small registry behind everything Obscura looks up by name.

Attacks (:mod:`attacks.base`), defenses (:mod:`defenses.base`), models (:mod:`fl.models`),
datasets (:mod:`fl.data.base`) and custom objectives (:mod:`orchestrator.metrics`) each keep a
:class:`Registry`: a name maps to one object, a lookup of an unknown name raises that registry's
own ``Unknown...Error`` listing the registered names, and a taken name is only given to another
object with ``replace=True``. Entries shipped with Obscura are marked *built in*
(:meth:`Registry.mark_builtin`); the others (a user's, a plugin's) are what
:mod:`orchestrator.registry` ships to Ray's workers (:meth:`Registry.customs`,
:meth:`Registry.restore`). It lives in ``fl``, the lowest layer, so every package can use it.

Example:
    >>> colours: Registry[str] = Registry("colour", ValueError)
    >>> colours.register("red", "#f00")
    '#f00'
    >>> sorted(colours.mark_builtin())
    ['red']
    >>> colours.register("teal", "#088")
    '#088'
    >>> colours.names(), colours.customs()
    (['red', 'teal'], {'teal': '#088'})
    >>> colours.get("blue")
    Traceback (most recent call last):
    ...
    ValueError: unknown colour 'blue'; known colours: red, teal
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")

UNKNOWN = "unknown {kind} {name!r}; known {plural}: {choices}"
"""The default message of an unknown name (fields: kind, plural, name, choices)."""

TAKEN = "{kind} {name!r} is already registered; pass replace=True to replace it"
"""The default message of a taken name (fields: kind, name, current)."""


@dataclass(frozen=True)
class _Entry(Generic[T]):
    """A registered object and whether it ships with Obscura."""

    value: T
    builtin: bool


class Registry(Generic[T]):
    """Names mapped to objects of type ``T``, with one set of verbs for every registry.

    Args:
        kind: what one entry is, in messages (``"attack"``).
        unknown: the exception :meth:`get` and :meth:`unregister` raise for an unknown name.
        plural: ``kind``'s plural in messages (default ``kind + "s"``).
        key: maps a name to its key (e.g. lower-cased); may raise for a bad name.
        unknown_message, taken_message: message templates (see :data:`UNKNOWN`, :data:`TAKEN`).
    """

    def __init__(
        self,
        kind: str,
        unknown: type[Exception],
        *,
        plural: str | None = None,
        key: Callable[[str], str] | None = None,
        unknown_message: str = UNKNOWN,
        taken_message: str = TAKEN,
    ) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.unknown = unknown
        self._key = key or (lambda name: name)
        self._unknown_message = unknown_message
        self._taken_message = taken_message
        self._entries: dict[str, _Entry[T]] = {}

    def key(self, name: str) -> str:
        """The key ``name`` is stored under (the name itself unless the registry normalises)."""
        return self._key(name)

    def check_free(self, name: str, value: object = None, *, replace: bool = False) -> str:
        """The key of ``name``; raise ``ValueError`` when it is taken by an object other than
        ``value`` and ``replace`` is false (wrappers call it before their own checks)."""
        key = self._key(name)
        current = self._entries.get(key)
        if current is not None and current.value is not value and not replace:
            raise ValueError(
                self._taken_message.format(kind=self.kind, name=key, current=current.value)
            )
        return key

    def register(self, name: str, value: T, *, replace: bool = False, builtin: bool = False) -> T:
        """Register ``value`` under ``name`` and return it.

        Registering the same object again is a no-op; another object under a taken name raises
        ``ValueError`` unless ``replace`` (a replaced built-in becomes a custom entry)."""
        key = self.check_free(name, value, replace=replace)
        current = self._entries.get(key)
        if current is None or current.value is not value:
            self._entries[key] = _Entry(value, builtin)
        return value

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its object; an unknown name raises :attr:`unknown`."""
        value = self.get(name)
        del self._entries[self._key(name)]
        return value

    def get(self, name: str) -> T:
        """The object registered under ``name``; an unknown name raises :attr:`unknown`,
        whose message lists the registered names."""
        key = self._key(name)
        try:
            return self._entries[key].value
        except (KeyError, TypeError):  # TypeError: an unhashable name is unknown too
            raise self.error(name) from None

    def error(self, name: object) -> Exception:
        """The :attr:`unknown` exception for ``name``, listing the registered names."""
        message = self._unknown_message.format(
            kind=self.kind, plural=self.plural, name=name, choices=", ".join(self.names())
        )
        return self.unknown(message)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, object)`` pairs, sorted by name."""
        return [(name, self._entries[name].value) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        try:
            return isinstance(name, str) and self._key(name) in self._entries
        except (TypeError, ValueError):  # a name the key function refuses is not registered
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` ships with Obscura (unknown names raise :attr:`unknown`)."""
        self.get(name)
        return self._entries[self._key(name)].builtin

    def mark_builtin(self) -> frozenset[str]:
        """Mark every entry registered so far as built in (a package calls this once its own
        entries are registered) and return the built-in names."""
        self._entries = {k: _Entry(e.value, True) for k, e in self._entries.items()}
        return frozenset(self._entries)

    def builtins(self) -> frozenset[str]:
        """The names of the entries that ship with Obscura."""
        return frozenset(k for k, e in self._entries.items() if e.builtin)

    def customs(self) -> dict[str, T]:
        """The entries that do not ship with Obscura (a user's, a plugin's), by name."""
        return {k: e.value for k, e in sorted(self._entries.items()) if not e.builtin}

    def restore(self, customs: Mapping[str, T]) -> None:
        """Register what :meth:`customs` returned (in another process) as custom entries,
        replacing any entry of the same name."""
        for name, value in customs.items():
            self.register(name, value, replace=True)

    def copy(self) -> Registry[T]:
        """An independent registry with the same entries (e.g. for a test to change freely)."""
        other: Registry[T] = Registry(
            self.kind,
            self.unknown,
            plural=self.plural,
            key=self._key,
            unknown_message=self._unknown_message,
            taken_message=self._taken_message,
        )
        other._entries = dict(self._entries)
        return other

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"

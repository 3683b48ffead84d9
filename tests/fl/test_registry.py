"""The generic registry behind the attacks, defenses, models, datasets and objectives."""

from __future__ import annotations

from typing import Any

import pytest

from fl.registry import Registry


class UnknownThingError(ValueError):
    """The registry's own error for an unknown name."""


def _things() -> Registry[object]:
    return Registry("thing", UnknownThingError)


def test_register_get_names_and_the_unknown_error_listing_the_choices() -> None:
    things = _things()
    a, b = object(), object()
    assert things.register("b", b) is b
    assert things.register("a", a) is a
    assert things.get("a") is a and things.names() == ["a", "b"] == list(things)
    assert len(things) == 2 and "a" in things and "c" not in things and 3 not in things
    assert things.items() == [("a", a), ("b", b)]
    with pytest.raises(UnknownThingError, match=r"unknown thing 'c'; known things: a, b"):
        things.get("c")
    unhashable: Any = ["a"]
    with pytest.raises(UnknownThingError):
        things.get(unhashable)  # a wrong type is unknown too


def test_a_taken_name_needs_replace_and_the_same_object_is_a_no_op() -> None:
    things = _things()
    first, second = object(), object()
    things.register("x", first)
    things.register("x", first)  # same object: nothing happens
    with pytest.raises(ValueError, match="'x' is already registered; pass replace=True"):
        things.register("x", second)
    assert things.get("x") is first
    things.register("x", second, replace=True)
    assert things.get("x") is second


def test_unregister_returns_the_object_and_refuses_unknown_names() -> None:
    things = _things()
    value = object()
    things.register("x", value)
    assert things.unregister("x") is value and "x" not in things
    with pytest.raises(UnknownThingError, match="unknown thing 'x'"):
        things.unregister("x")


def test_builtins_are_told_apart_from_customs_and_travel_with_restore() -> None:
    things = _things()
    things.register("core", 1)
    assert things.mark_builtin() == frozenset({"core"})
    things.register("mine", 2)
    assert things.is_builtin("core") and not things.is_builtin("mine")
    assert things.builtins() == {"core"} and things.customs() == {"mine": 2}
    things.register("core", 3, replace=True)  # a replaced built-in is the user's now
    assert things.customs() == {"core": 3, "mine": 2}
    worker = _things()
    worker.register("core", 1)
    worker.mark_builtin()
    worker.restore(things.customs())
    assert worker.items() == [("core", 3), ("mine", 2)]
    worker.restore(things.customs())  # a reused worker restores again: no error
    assert worker.customs() == things.customs()


def test_a_key_function_normalises_names_and_messages_are_the_registrys_own() -> None:
    def lower(name: str) -> str:
        if not isinstance(name, str):
            raise TypeError("a name must be a string")
        return name.strip().lower()

    things: Registry[int] = Registry(
        "dataset",
        UnknownThingError,
        key=lower,
        unknown_message="no {kind} {name!r} among {choices}",
        taken_message="{name!r} is taken by {current}",
    )
    things.register(" Toy ", 1)
    assert things.names() == ["toy"] and things.get("TOY") == 1 and "tOy" in things
    assert 5 not in things
    with pytest.raises(ValueError, match="'toy' is taken by 1"):
        things.register("toy", 2)
    with pytest.raises(UnknownThingError, match="no dataset 'Other' among toy"):
        things.get("Other")
    not_a_name: Any = 5
    with pytest.raises(TypeError, match="a name must be a string"):
        things.get(not_a_name)  # the key function's own check applies


def test_copy_is_independent() -> None:
    things = _things()
    things.register("a", 1)
    things.mark_builtin()
    other = things.copy()
    other.register("b", 2)
    assert things.names() == ["a"] and other.names() == ["a", "b"]
    assert other.is_builtin("a") and other.customs() == {"b": 2}
    assert repr(other) == "Registry('thing', 2 entries)"

"""Property-based: malformed study files always exit 2, name the field, and write nothing."""

from __future__ import annotations

import copy
import math
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from orchestrator.cli import main
from orchestrator.config import AttackSection

REQUIRED = [
    ("study",),
    ("data",),
    ("data", "dataset"),
    ("model",),
    ("model", "name"),
    ("federation",),
    ("defenses",),
    ("attacks",),
    ("objectives",),
]
POSITIVE_INTS = [
    ("federation", "clients"),
    ("federation", "clients_per_round"),
    ("federation", "rounds"),
    ("federation", "batch_size"),
    ("federation", "local_epochs"),
    ("search", "trials"),
    ("search", "concurrency"),
]
SECTIONS = ["data", "federation", "search", "resources", "tracking", "model"]
NAMES = [("data", "dataset"), ("model", "name")]
junk = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12)
wrong_types = st.one_of(
    junk.map(lambda t: "x" + t),
    st.lists(st.integers(), min_size=1, max_size=3),
    st.dictionaries(junk, st.integers(), min_size=1, max_size=2),
)


def _get(raw: dict, path: tuple[str, ...]) -> dict:
    node = raw
    for part in path[:-1]:
        node = node[part]
    return node


def _apply(raw: dict[str, Any], draw: Any) -> tuple[str, str]:
    kind = draw(
        st.sampled_from(
            [
                "missing",
                "type",
                "range",
                "inverted",
                "unknown_key",
                "empty",
                "unknown_name",
                "not_yaml",
                "not_mapping",
            ]
        )
    )
    if kind == "missing":
        path = draw(st.sampled_from(REQUIRED))
        _get(raw, path).pop(path[-1])
        return yaml.safe_dump(raw), path[-1]
    if kind == "type":
        path = draw(st.sampled_from(POSITIVE_INTS))
        _get(raw, path)[path[-1]] = draw(wrong_types)
        return yaml.safe_dump(raw), path[-1]
    if kind == "range":
        path = draw(st.sampled_from(POSITIVE_INTS))
        _get(raw, path)[path[-1]] = draw(st.integers(max_value=0))
        return yaml.safe_dump(raw), path[-1]
    if kind == "inverted":
        lo = draw(st.floats(min_value=11, max_value=50))
        hi = draw(st.floats(min_value=51, max_value=99))
        raw["defenses"]["prune"] = {"percent": {"type": "float", "low": hi, "high": lo}}
        return yaml.safe_dump(raw), "prune"
    if kind == "unknown_key":
        section = draw(st.sampled_from([*SECTIONS, "<top>"]))
        key = "zz_" + draw(junk)
        if section == "<top>":
            raw[key] = 1
        elif section == "model":
            raw["model"][key] = 1  # model options are checked against the model's options
        else:
            raw[section] = dict(raw.get(section) or {}, **{key: 1})
        return yaml.safe_dump(raw), key
    if kind == "empty":
        section = draw(st.sampled_from(["defenses", "attacks", "objectives"]))
        raw[section] = {} if section == "defenses" else []
        return yaml.safe_dump(raw), section
    if kind == "unknown_name":
        which = draw(st.sampled_from(["data", "model", "defense", "attack", "metric"]))
        name = "zz" + draw(junk)
        token = {
            "data": "known datasets",
            "model": "known models",
            "defense": "known defenses",
            "attack": "known attacks",
            "metric": "known metrics",
        }[which]
        if which == "data":
            raw["data"]["dataset"] = name
        elif which == "model":
            raw["model"]["name"] = name
        elif which == "defense":
            raw["defenses"][name] = {}
        elif which == "attack":
            raw["attacks"][0]["name"] = name
        else:
            raw["objectives"][0]["metric"] = name
        return yaml.safe_dump(raw), token
    if kind == "not_mapping":
        return yaml.safe_dump(draw(st.lists(st.integers(), max_size=3))), "mapping"
    text = "study: [" + draw(st.text(alphabet="abc: {", max_size=20))
    return text, "YAML"


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_malformed_study_files_exit_2_and_name_the_field(data, capsys, valid_raw) -> None:
    text, token = _apply(copy.deepcopy(valid_raw), data.draw)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "study.yaml"
        path.write_text(text)
        out = Path(tmp) / "out"
        code = main(["study", str(path), "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert token in err, (token, err)
        assert "Traceback" not in err
        assert not out.exists()
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["study.yaml"]


# Every field of the schema: wrong types, non-finite numbers, negative and huge values, path
# characters. Each value is refused with exit 2 naming the field, or (where the schema allows
# it) accepted; never a traceback. Where a field has a bound (or must be a name) the value must
# be refused.


@dataclass(frozen=True)
class Leaf:
    """One field of the study schema: where it lives and what it accepts."""

    path: tuple[str | int, ...]
    kinds: frozenset[str]  # int, float, bool, str, path, literal, none, any, dict, model
    listed: bool = False  # a list of ``kinds``: bad values go in as one-element lists
    low: float | None = None  # a lower bound (ge/gt) on the value or each element
    high: float | None = None  # an upper bound (le/lt, or one a validator enforces)
    name_like: bool = False  # only names/registry keys: path characters must be refused

    @property
    def numeric(self) -> bool:
        return bool(self.kinds & {"int", "float"}) and not self.kinds & {"str", "path", "any"}

    @property
    def typed(self) -> bool:
        """Refuses a mapping (and, unless it takes strings, a junk string)."""
        return not self.kinds & {"any", "dict", "model"}


def _kinds(ann: Any) -> tuple[frozenset[str], bool]:
    origin = get_origin(ann)
    if origin is Annotated:
        return _kinds(get_args(ann)[0])
    if origin in (Union, types.UnionType):
        parts = [_kinds(a) for a in get_args(ann)]
        return frozenset().union(*(k for k, _ in parts)), any(lst for _, lst in parts)
    if origin in (list, tuple, set):
        inner = [_kinds(a)[0] for a in get_args(ann) if a is not Ellipsis]
        return frozenset().union(*inner) if inner else frozenset({"any"}), True
    if origin is Literal:
        return frozenset({"literal"}), False
    if origin is dict:
        return frozenset({"dict"}), False
    simple = {bool: "bool", int: "int", float: "float", str: "str", Path: "path"}
    if ann in simple:
        return frozenset({simple[ann]}), False
    if ann is type(None):
        return frozenset({"none"}), False
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return frozenset({"model"}), False
    return frozenset({"any"}), False


def _bounds(metadata: list[Any]) -> tuple[float | None, float | None]:
    def first(names: tuple[str, str]) -> float | None:
        found = [float(getattr(m, a)) for m in metadata for a in names if hasattr(m, a)]
        return found[0] if found else None

    return first(("ge", "gt")), first(("le", "lt"))


REGISTRY_NAMES = {"name", "dataset", "metric", "mode", "study", "label"}
"""Leaves that must match a pattern or a registry: any path characters are refused."""
VALIDATED_HIGH = {"rounds", "victims", "iterations", "restarts", "seed"}
"""Leaves a validator bounds from above (attack rounds by federation.rounds, victims by
clients_per_round, iterations/restarts by the study maxima; params.seed is refused)."""


def _leaves(model: type[BaseModel], prefix: tuple[str | int, ...]) -> list[Leaf]:
    out: list[Leaf] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaves(ann, (*prefix, name))
            continue
        args = get_args(ann)
        item = args[0] if get_origin(ann) is list and args else None
        if isinstance(item, type) and issubclass(item, BaseModel):
            out += _leaves(item, (*prefix, name, 0))
            continue
        kinds, listed = _kinds(ann)
        low, high = _bounds(field.metadata)
        if name in VALIDATED_HIGH and high is None:
            high = math.inf
        if name == "rounds" and listed:
            low = 0
        out.append(Leaf((*prefix, name), kinds, listed, low, high, name in REGISTRY_NAMES))
    return out


def _schema_leaves(valid_raw: dict[str, Any]) -> list[Leaf]:
    """Every field: the study's sections, model options, each defense's and each usable
    attack's parameters."""
    from attacks import attack_class, available_attacks
    from defenses import available_defenses, defense_class
    from orchestrator.config import StudyConfig, StudyFileError, parse_study

    skip = {"defenses", "attacks", "model"}  # expanded below
    leaves = [leaf for leaf in _leaves(StudyConfig, ()) if leaf.path[0] not in skip]
    leaves += [leaf for leaf in _leaves(StudyConfig, ()) if leaf.path[:2] == ("model", "name")]
    leaves += [leaf for leaf in _leaves(AttackSection, ("attacks", 0)) if leaf.path[2] != "params"]
    leaves.append(Leaf(("model", "hidden"), frozenset({"int"}), True, 1, math.inf))
    leaves += [Leaf(("model", k), frozenset({"literal"})) for k in ("activation", "init")]
    for name in available_defenses():
        leaves += _leaves(defense_class(name).Params, ("defenses", name))
    for name in available_attacks():
        raw = copy.deepcopy(valid_raw)
        raw["attacks"] = [_attack_entry(name)]
        try:
            parse_study(raw)
        except StudyFileError:
            continue  # this attack cannot run on the tiny study (e.g. weights messages)
        leaves += _leaves(attack_class(name).Params, ("attack", name))
    return leaves


def _attack_entry(name: str) -> dict[str, Any]:
    caps = {"knows_labels": True, "knows_bn_stats": True}
    return {"name": name, "params": {"iterations": 2}, "capabilities": caps}


def _place(raw: dict[str, Any], leaf: Leaf, value: Any) -> None:
    if leaf.path[0] == "attack":  # params of a chosen attack
        entry = _attack_entry(str(leaf.path[1]))
        node = entry["params"]
        for part in leaf.path[2:-1]:  # a nested parameter model (e.g. learned.examples)
            node = node.setdefault(part, {})
        node[leaf.path[-1]] = value
        raw["attacks"] = [entry]
    elif leaf.path[0] == "defenses":
        raw["defenses"][leaf.path[1]] = {leaf.path[2]: value}
    else:
        node: Any = raw
        for part in leaf.path[:-1]:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
        node[leaf.path[-1]] = value


DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
NON_FINITE = [math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity", "1e999"]
NEGATIVE = [-1, -(10**6), -1e-3]
HUGE = [10**12, 10**30, 1e300]
PATHS = ["../../x", "a/b", "a\\b", "..", "", "/etc/passwd", "x\x00y"]


def _mutation(leaf: Leaf, draw: Any) -> tuple[Any, bool]:
    """A bad value for ``leaf`` and whether the schema must refuse it."""
    kinds = ["mapping", "junk", "path"]
    if leaf.numeric:
        kinds += ["non_finite", "negative", "huge"]
    kind = draw(st.sampled_from(kinds))
    takes_text = bool(leaf.kinds & {"str", "path", "any"})
    if kind == "mapping":
        return {"zz_" + draw(junk): 1}, leaf.typed
    if kind == "junk":
        value, refuse = "x" + draw(junk), leaf.typed and not takes_text
    elif kind == "path":
        value = draw(st.sampled_from(PATHS))
        refuse = leaf.name_like or (leaf.typed and not takes_text)
    elif kind == "non_finite":
        value, refuse = draw(st.sampled_from(NON_FINITE)), True
    elif kind == "negative":
        value = draw(st.sampled_from(NEGATIVE))
        below = leaf.low is not None and value < leaf.low
        refuse = below or (isinstance(value, float) and "float" not in leaf.kinds)
    else:
        value = draw(st.sampled_from(HUGE))
        refuse = leaf.high is not None and value > leaf.high
    return ([value] if leaf.listed else value), refuse


@pytest.fixture(scope="module")
def schema_leaves(valid_raw) -> list[Leaf]:
    return _schema_leaves(valid_raw)


def test_the_schema_walk_reaches_every_section(schema_leaves) -> None:
    heads = {leaf.path[0] for leaf in schema_leaves}
    assert {"study", "seed", "data", "model", "federation", "defenses", "attacks"} <= heads
    assert {"objectives", "search", "resources", "tracking", "attack", "success_psnr"} <= heads
    paths = {leaf.path for leaf in schema_leaves}
    assert ("federation", "partition", "alpha") in paths and ("attacks", 0, "label") in paths
    assert ("defenses", "prune", "percent") in paths and ("attack", "idlg", "lr") in paths
    assert len(schema_leaves) > 80


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_every_field_refuses_bad_values_naming_it(data, capsys, valid_raw, schema_leaves) -> None:
    leaf = data.draw(st.sampled_from(schema_leaves))
    value, refuse = _mutation(leaf, data.draw)
    raw = copy.deepcopy(valid_raw)
    _place(raw, leaf, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "study.yaml"
        path.write_text(yaml.dump(raw, Dumper=DUMPER), encoding="utf-8")
        code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code in (0, 2), (leaf.path, value, err)
    if refuse:
        assert code == 2, (leaf.path, value)
    if code == 2:
        assert str(leaf.path[-1]) in err, (leaf.path, value, err)

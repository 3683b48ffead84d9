"""Property-based: malformed study files always exit 2, name the field, and write nothing."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.cli import main

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

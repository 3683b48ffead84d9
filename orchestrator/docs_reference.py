"""Reference pages of the documentation, generated from the pydantic models and the registries.

The study-file reference walks :class:`orchestrator.config.StudyConfig` and the models nested in
it; the attack and defense pages list each registered class's parameters model; the models and
datasets page lists the registries of :mod:`fl.models` and :mod:`fl.data`. The MkDocs hook
``docs/_hooks/reference.py`` writes these pages at build time, so nothing here is written twice.

Example:
    >>> page = study_file_reference()
    >>> "| `federation.rounds` |" in page
    True
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from attacks import attack_class, available_attacks
from defenses import available_defenses, defense_class
from fl import data as fl_data
from fl import models as fl_models
from orchestrator.config import StudyConfig

_HEADER = "| key | type | default | bounds | description |\n|---|---|---|---|---|"
_BOUNDS = (
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "≤"),
    (annotated_types.Lt, "lt", "<"),
)


def type_name(annotation: Any) -> str:
    """A short, readable name of a field's type (``int | None``, ``'iid' | 'dirichlet'``)."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a field holds (directly, optionally, or as a list), and whether in a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is list and args:
        model, _ = _nested_model(args[0])
        return model, True
    if origin in (Union, types.UnionType):
        for arg in args:
            model, in_list = _nested_model(arg)
            if model is not None:
                return model, in_list
    return None, False


def default_text(field: FieldInfo) -> str:
    """The field's default as the study file would spell it; ``required`` when there is none."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True, validated_data={})
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value!r}`" if isinstance(value, str | tuple | list | dict) else f"`{value}`"


def bounds_text(field: FieldInfo) -> str:
    """The numeric bounds and pattern the field enforces (``≥ 1, ≤ 100000``), else empty."""
    parts: list[str] = []
    for item in field.metadata:
        for kind, attr, sign in _BOUNDS:
            if isinstance(item, kind):
                parts.append(f"{sign} {getattr(item, attr)}")
        pattern = getattr(item, "pattern", None)
        if pattern:
            parts.append(f"matches `{pattern}`")
    return ", ".join(parts)


def _cell(text: str) -> str:
    """Text that fits in one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def walk_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every field of ``model`` and of the models nested in it, as (dotted key, field);
    list items are spelled ``key[]``."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        yield key, field
        nested, in_list = _nested_model(field.annotation)
        if nested is not None:
            yield from walk_fields(nested, f"{key}[]." if in_list else f"{key}.")


def field_table(model: type[BaseModel], prefix: str = "") -> str:
    """A Markdown table of every (nested) field: key, type, default, bounds, description."""
    rows = [_HEADER]
    for key, field in walk_fields(model, prefix):
        rows.append(
            f"| `{key}` | {_cell(type_name(field.annotation))} | {_cell(default_text(field))} "
            f"| {_cell(bounds_text(field))} | {_cell(field.description or '')} |"
        )
    return "\n".join(rows)


def study_file_keys() -> list[str]:
    """Every key of the study file (dotted; list items as ``key[]``)."""
    return [key for key, _ in walk_fields(StudyConfig)]


def study_file_reference() -> str:
    """The study-file reference page: every key with its type, default, bounds, description."""
    return (
        "# Study-file reference\n\n"
        "Generated at build time from `orchestrator.config.StudyConfig` and the models nested "
        "in it (`orchestrator/docs_reference.py`). `model` takes further keys: the options of "
        "the chosen model ([models and datasets](models-and-datasets.md)); `defenses` maps a "
        "defense name to its hyperparameters ([defenses](defenses.md)); `attacks[].params` "
        "holds the attack's parameters ([attacks](attacks.md)).\n\n"
        f"{field_table(StudyConfig)}\n"
    )


def _class_doc(cls: type) -> str:
    """The first paragraph of a class's docstring, on one line."""
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split())


def attacks_reference() -> str:
    """One parameter table per registered attack (from each class's ``Params`` model)."""
    out = [
        "# Attack parameters\n",
        "Generated at build time from the attack registry (`attacks.available_attacks()`) and "
        "each attack's `Params` model; a study sets them under `attacks[].params`.\n",
    ]
    for name in available_attacks():
        cls = attack_class(name)
        out.append(f"## `{name}`\n\n{_class_doc(cls)}\n\n{field_table(cls.Params)}\n")
    return "\n".join(out)


def _search_range(cls: Any, key: str) -> str:
    """The search range a defense declares for one hyperparameter, else empty."""
    spec = cls.search_space.get(key)
    if spec is None:
        return ""
    if spec.type == "categorical":
        return "{" + ", ".join(map(str, spec.choices or ())) + "}"
    return f"{spec.low:g}–{spec.high:g}{' log' if spec.log else ''} ({spec.type})"


def defenses_reference() -> str:
    """One hyperparameter table per registered defense, with its declared search range."""
    out = [
        "# Defense hyperparameters\n",
        "Generated at build time from the defense registry (`defenses.available_defenses()`), "
        "each defense's `Params` model and its `search_space`; a study sets them under "
        "`defenses.<name>` as constants or search ranges.\n",
    ]
    header = (
        "| key | type | default | bounds | search range | description |\n"
        "|---|---|---|---|---|---|"
    )
    for name in available_defenses():
        cls = defense_class(name)
        rows = [header]
        for key, field in cls.Params.model_fields.items():
            rows.append(
                f"| `{key}` | {_cell(type_name(field.annotation))} | "
                f"{_cell(default_text(field))} | {_cell(bounds_text(field))} | "
                f"{_search_range(cls, key)} | {_cell(field.description or '')} |"
            )
        table = "\n".join(rows) if len(rows) > 1 else "No hyperparameters."
        out.append(f"## `{name}`\n\n{_class_doc(cls)}\n\n{table}\n")
    return "\n".join(out)


def models_and_datasets_reference() -> str:
    """The registered models with their options and defaults, and the registered datasets."""
    out = [
        "# Models and datasets\n",
        "Generated at build time from `fl.models.available()` / `fl.models.options(name)` and "
        "`fl.data.available()` / `fl.data.info(name)`.\n",
        "## Models\n",
        "| model | options (defaults) |\n|---|---|",
    ]
    for name in fl_models.available():
        opts = ", ".join(f"`{k}={v!r}`" for k, v in fl_models.options(name).items())
        out.append(f"| `{name}` | {_cell(opts) or '(none)'} |")
    out += [
        "\n## Datasets\n",
        "| dataset | channels | classes | splits | native size | description |",
        "|---|---|---|---|---|---|",
    ]
    for name in fl_data.available():
        info = fl_data.info(name)
        out.append(
            f"| `{name}` | {info.channels or 'any'} | {info.num_classes or 'any'} | "
            f"{', '.join(info.splits)} | {info.native_size or 'any'} | "
            f"{_cell(info.description or '')} |"
        )
    return "\n".join(out) + "\n"


def metrics_reference() -> str:
    """The metric reference page: the per-image metrics and trial statistics of the one metric
    table (:mod:`attacks.scoring.table`)."""
    from attacks.scoring.table import reference_markdown

    return (
        "# Metric reference\n\n"
        "Generated from `attacks/scoring/table.py`, the one place a per-image metric is declared "
        "(see [adding a metric](../metrics.md#adding-a-metric)). Each per-image metric is a key of "
        "a scored image and a column of `attacks.parquet`; each trial statistic is reported per "
        "attack (`<attack>_<name>`) and as the worst case over attacks (`attack_<name>`).\n\n"
        + reference_markdown()
    )


PAGES = {
    "reference/study-file.md": study_file_reference,
    "reference/metrics.md": metrics_reference,
    "reference/attacks.md": attacks_reference,
    "reference/defenses.md": defenses_reference,
    "reference/models-and-datasets.md": models_and_datasets_reference,
}
"""Generated page (path under ``docs/``) -> the function that writes its Markdown."""

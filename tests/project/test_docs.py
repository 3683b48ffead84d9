"""The documentation is checked like code: every schema field says what it is, and the generated
reference pages list every study-file key, attack and defense."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("attacks", "defenses", "fl", "orchestrator")


def _modules() -> list[str]:
    """Every module of the four packages (imported, so that their models exist)."""
    names: list[str] = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            if not info.name.endswith(".__main__"):  # running it would parse pytest's argv
                names.append(info.name)
    return names


def _models() -> list[type[BaseModel]]:
    """The pydantic models defined in the packages (not the ones they import)."""
    found: list[type[BaseModel]] = []
    for name in _modules():
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, BaseModel)
                and obj.__module__ == name
                and obj not in found
            ):
                found.append(obj)
    return found


def test_every_model_field_has_a_description() -> None:
    """A field without a description is a hole in the generated reference pages."""
    missing = [
        f"{model.__module__}.{model.__qualname__}.{field}"
        for model in _models()
        for field in inspect.get_annotations(model)
        if field in model.model_fields and not (model.model_fields[field].description or "").strip()
    ]
    assert not missing, f"{len(missing)} fields without a description:\n" + "\n".join(missing)


def test_models_are_found() -> None:
    """The walk reaches nested modules (a guard against a walk that finds nothing)."""
    names = {f"{m.__module__}.{m.__qualname__}" for m in _models()}
    assert "orchestrator.config.StudyConfig" in names
    assert "fl.simulation.config.FederationConfig" in names
    assert any(n.startswith("defenses.") for n in names)


def _instance_keys(obj: BaseModel, prefix: str = "") -> list[str]:
    """The keys of a validated study, read off the instance (independent of the generator)."""
    keys: list[str] = []
    for name in type(obj).model_fields:
        key = f"{prefix}{name}"
        keys.append(key)
        value = getattr(obj, name)
        if isinstance(value, BaseModel):
            keys += _instance_keys(value, f"{key}.")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            keys += _instance_keys(value[0], f"{key}[].")
    return keys


def test_reference_lists_every_study_file_key() -> None:
    from orchestrator.config import load_study
    from orchestrator.docs_reference import study_file_keys, study_file_reference

    study = load_study(ROOT / "studies" / "quickstart.yaml")
    page = study_file_reference()
    keys = study_file_keys()
    assert set(_instance_keys(study)) <= set(keys)
    for key in keys:
        assert f"| `{key}` |" in page, key


def test_reference_lists_every_attack_and_defense() -> None:
    from attacks import attack_class, available_attacks
    from defenses import available_defenses, defense_class
    from orchestrator.docs_reference import attacks_reference, defenses_reference

    attacks_page, defenses_page = attacks_reference(), defenses_reference()
    for name in available_attacks():
        assert f"## `{name}`" in attacks_page, name
        section = attacks_page.split(f"## `{name}`", 1)[1].split("\n## ", 1)[0]
        for field in attack_class(name).Params.model_fields:
            assert f"| `{field}` |" in section, (name, field)
    for name in available_defenses():
        assert f"## `{name}`" in defenses_page, name
        section = defenses_page.split(f"## `{name}`", 1)[1].split("\n## ", 1)[0]
        for field in defense_class(name).Params.model_fields:
            assert f"| `{field}` |" in section, (name, field)


def test_reference_lists_models_and_datasets() -> None:
    from fl import data, models
    from orchestrator.docs_reference import models_and_datasets_reference

    page = models_and_datasets_reference()
    for name in [*models.available(), *data.available()]:
        assert f"| `{name}` |" in page, name

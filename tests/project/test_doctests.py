"""The docstring examples (``>>>``) of the four packages run and print what they show: the
equivalent of ``pytest --doctest-modules`` on the packages, without adding it to every run's
options (it would import every module of the suite's collection)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("attacks", "defenses", "fl", "orchestrator")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(
    _module(p)
    for pkg in PACKAGES
    for p in (ROOT / pkg).rglob("*.py")
    if p.name != "__main__.py" and ">>>" in p.read_text()
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    assert tests, f"{name} has '>>>' in its source but no docstring example was found"
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    failed = runner.failures
    assert failed == 0, f"{failed} docstring examples of {name} failed:\n" + "".join(report)


def test_some_modules_have_examples() -> None:
    assert len(MODULES) >= 5

"""Functions in every package (fl/, defenses/, attacks/, orchestrator/) have one job: at most 80
lines each, unless their docstring says why (it then contains "longer than 80 lines because")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 80


def _long_functions(folder: Path, root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            why = "longer than 80 lines because" in (ast.get_docstring(node) or "")
            if lines > LIMIT and not why:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines})")
    return found


PACKAGES = ("fl", "defenses", "attacks", "orchestrator")


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_over_80_lines_in_any_package(package: str) -> None:
    assert _long_functions(ROOT / package) == []


def test_the_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n")
    assert _long_functions(tmp_path, tmp_path) == ["m.py:1 long (81)"]

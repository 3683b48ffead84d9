"""The project's modules form no import cycle of any kind: not at module level, not through
imports inside functions (which only hide a cycle), not under ``if TYPE_CHECKING:`` (a cycle of
annotations is still two modules that cannot be read apart), and not through the package
``__init__`` an import runs first; and each module imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("attacks", "defenses", "fl", "orchestrator")


def _module(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Module name -> file, for every module of ``packages`` under ``root``."""
    return {_module(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


MODULES = _modules(ROOT, PACKAGES)


def _ancestors(name: str) -> list[str]:
    """The packages above module ``name``: ``a.b.c`` -> ``["a", "a.b"]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(name: str, path: Path, modules: dict[str, Path] = MODULES) -> set[str]:
    """The modules of ``modules`` that ``name`` imports anywhere in its code (functions and
    ``if TYPE_CHECKING:`` blocks included), with the packages whose ``__init__`` such an import
    runs first (those above the imported module, less those above ``name`` itself, which are
    already being imported when ``name`` runs)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    own = {*_ancestors(name), name}
    found |= {a for m in found for a in _ancestors(m)} - own
    return {m for m in found if m in modules and m != name}


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules it imports (:func:`_imported`)."""
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules() -> None:
    graph = _graph(MODULES)
    assert len(graph) > 50 and graph["orchestrator.study"]  # the scan sees the project
    cycles = _cycles(graph)
    assert cycles == [], "import cycles (modules of one strongly connected component):\n" + (
        "\n".join(" <-> ".join(c) for c in cycles)
    )


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_check_sees_cycles_of_every_kind_in_a_package(tmp_path: Path) -> None:
    """A tmp package with a TYPE_CHECKING cycle, a cycle through an import inside a function,
    and one through a package ``__init__`` (``pkg.sub.x`` imports ``pkg.y``, which imports
    ``pkg.sub.z``: that runs ``pkg/sub/__init__``, which imports ``pkg.sub.x``)."""
    pkg = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "b.py": "from pkg import a\n",
        "c.py": "def f():\n    from pkg.d import g\n",
        "d.py": "from pkg.c import f\n",
        "y.py": "from pkg.sub.z import Z\n",
        "sub/__init__.py": "from pkg.sub.x import X\n",
        "sub/x.py": "from pkg.y import Y\n",
        "sub/z.py": "Z = 1\n",
        "free.py": "from pkg.sub import z\nfrom pkg import a\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = _graph(_modules(tmp_path, ("pkg",)))
    assert sorted(_cycles(graph)) == [
        ["pkg.a", "pkg.b"],
        ["pkg.c", "pkg.d"],
        ["pkg.sub", "pkg.sub.x", "pkg.y"],
    ]


@pytest.mark.slow
def test_every_module_imports_on_its_own_in_a_fresh_interpreter() -> None:
    failures = {}
    for name in (m for m in MODULES if not m.endswith("__main__")):  # those run a program
        done = subprocess.run(
            [sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=ROOT
        )
        if done.returncode != 0:
            failures[name] = done.stderr.strip().splitlines()[-1:]
    assert not failures, failures

"""Every ```python block of README.md and docs/*.md runs, each in a fresh interpreter from the
project root: a documented example that no longer works is a test failure.

A block preceded by ``<!-- no-run: <reason> -->`` is skipped with that reason (for the few that
download data or run for minutes); one that reads ``../shared/data`` is skipped when that folder
is absent, as the data tests are.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
BLOCK = re.compile(
    r"(?:<!--\s*no-run:\s*(?P<reason>.*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S
)
TIMEOUT_S = 300


def _snippets() -> list[tuple[str, str, str | None]]:
    """(where, code, reason to skip) for every python block of the README and the docs."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("code"))
            where = f"{path.relative_to(ROOT)}:{line}"
            found.append((where, match.group("code"), match.group("reason")))
    return found


SNIPPETS = _snippets()


@pytest.mark.parametrize(("where", "code", "reason"), SNIPPETS, ids=[s[0] for s in SNIPPETS])
def test_snippet_runs(where: str, code: str, reason: str | None) -> None:
    if reason is not None:
        pytest.skip(f"marked no-run: {reason}")
    if "../shared/data" in code and not (SHARED / "data").is_dir():
        pytest.skip("reads ../shared/data, which is absent")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    backbone = SHARED / "weights" / "lpips_alexnet_features.pth"
    if backbone.is_file():
        env.setdefault("OBSCURA_LPIPS_BACKBONE", str(backbone))
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, f"{where} failed:\n{done.stderr[-3000:]}"


def test_snippets_found() -> None:
    """The parser finds the documented examples (a guard against a pattern that finds none)."""
    assert len(SNIPPETS) >= 4
    assert sum(reason is None for _, _, reason in SNIPPETS) >= 3

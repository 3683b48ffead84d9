"""Project-wide test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``shared/`` directory beside the project root holding the real data files.

    Tests using it are skipped when it is absent (e.g. outside the development machines).
    """
    path = Path(__file__).resolve().parents[1].parent / "shared"
    if not path.is_dir():
        pytest.skip("../shared (real MedMNIST files) not present beside the project root")
    return path

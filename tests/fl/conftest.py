"""Fixtures for the fl tests: small slices of the real PneumoniaMNIST file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl import data


@pytest.fixture(scope="session")
def pneumonia_train(shared_dir: Path) -> data.ImageData:
    """The real PneumoniaMNIST training split (4708 images, 28 px)."""
    return data.load("pneumoniamnist", root=shared_dir / "data", split="train")


@pytest.fixture(scope="session")
def pneumonia_test(shared_dir: Path) -> data.ImageData:
    """The real PneumoniaMNIST test split (624 images, 28 px)."""
    return data.load("pneumoniamnist", root=shared_dir / "data", split="test")

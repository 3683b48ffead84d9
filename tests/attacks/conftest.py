"""Real test images for the attack tests (scikit-image's bundled photographs)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests._support.samples import sample_images


@pytest.fixture(scope="session")
def real_images_16() -> torch.Tensor:
    """Twenty-four different real 16 px RGB images."""
    return sample_images(16, 24)


@pytest.fixture
def float64() -> Iterator[None]:
    """Models, images, dummy data and optimiser state built during the test are float64: for
    comparisons of two optimisations that must agree up to rounding (float32 rounding, which
    differs between CPUs' kernels, is amplified by signed Adam and L-BFGS)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)

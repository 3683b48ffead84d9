"""Real test images for the attack tests (scikit-image's bundled photographs)."""

from __future__ import annotations

import pytest
import torch

from attacks.samples import sample_images


@pytest.fixture(scope="session")
def real_images_16() -> torch.Tensor:
    """Twenty-four different real 16 px RGB images."""
    return sample_images(16, 24)

"""Reconstruction-grid titles: shown whole, wrapped at word boundaries."""

from __future__ import annotations

import torch
from PIL import Image

from attacks.scoring.plots import save_pair_grid, wrap_title


def test_titles_wrap_between_words_and_keep_every_word() -> None:
    title = "inverting_gradients_aware, round 15, client 7"
    for width in (2.0, 3.4, 12.0):
        lines = wrap_title(title, width)
        assert " ".join(lines) == title
        limit = max(8, int(width * 72 / 6))
        assert all(len(line) <= limit or " " not in line for line in lines)
    assert len(wrap_title(title, 2.0)) > 1 and len(wrap_title(title, 12.0)) == 1


def test_a_one_image_grid_grows_to_hold_its_wrapped_title(tmp_path) -> None:
    images = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    short = save_pair_grid(images, images, tmp_path / "short.png", title="ig")
    long = save_pair_grid(
        images, images, tmp_path / "long.png", title="inverting_gradients_aware, round 15, client 7"
    )
    assert Image.open(long).size[1] > Image.open(short).size[1]

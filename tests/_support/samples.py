"""Real sample images for calibration, benchmarks and tests (scikit-image's bundled photos).

Attacks must be calibrated on real images, not noise: these are crops of the photographs that
ship with scikit-image, so they work offline.
"""

from __future__ import annotations

import numpy as np
import torch

_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry")


def sample_images(size: int, count: int, channels: int = 3) -> torch.Tensor:
    """``count`` different real images: the four quadrant crops and the centre crop of each of
    scikit-image's colour photographs in turn, resized to ``size`` px, in [0, 1], shape
    (count, channels, size, size); ``channels=1`` gives luminance."""
    from skimage import data as skdata
    from skimage.color import rgb2gray
    from skimage.transform import resize

    out: list[np.ndarray] = []
    for name in _SOURCES:
        img = getattr(skdata, name)()[..., :3]
        h, w = img.shape[:2]
        s = min(h, w) // 2
        boxes = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), ((h - s) // 2, (w - s) // 2)]
        for top, left in boxes:
            patch = resize(img[top : top + s, left : left + s], (size, size), anti_aliasing=True)
            out.append(rgb2gray(patch)[..., None] if channels == 1 else patch)
            if len(out) == count:
                arr = np.stack(out).astype(np.float32)
                return torch.from_numpy(arr).permute(0, 3, 1, 2).clamp(0, 1).contiguous()
    raise ValueError(f"at most {len(out)} sample images are available; asked for {count}")

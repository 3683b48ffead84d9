"""The ``folder`` dataset: a user's own images, one sub-folder per class.

Layout (``root`` is passed to :func:`fl.data.load` as ``root=``)::

    root/<class>/*.png|jpg|jpeg|bmp                 # automatic split, or
    root/{train,val,test}/<class>/*.png|jpg|...     # explicit splits (``train`` required)

* Classes are the sorted names of the class sub-folders holding at least one image (the union
  over all splits in the explicit layout), so label ``i`` is ``class_names[i]`` in every split.
* Without ``train/``/``val/``/``test/`` sub-folders the images are split 80/10/10
  deterministically: all files sorted by (class, file name) are permuted with
  ``np.random.default_rng(FOLDER_SPLIT_SEED)``; ``val`` and ``test`` each get ``N // 10`` images
  (so fewer than 10 images leave them empty, which is an error when they are requested) and
  ``train`` gets the rest.
* Images are converted to 8-bit greyscale (``L``) when every file in the dataset is greyscale,
  otherwise to RGB (alpha is dropped). 16-bit and float images are rejected.
* If the images differ in size, ``image_size`` is required; each image is then resized to
  ``image_size x image_size`` (bilinear, antialiased, aspect ratio not preserved).

Facts are discovered, so ``info("folder")`` is generic and the loaded data's ``info`` carries the
discovered channels, classes, splits and (for uniform square images) native size. ``download`` is
ignored: there is nothing to download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fl.data.base import SPLITS, DatasetError, DatasetInfo, ImageData, register, resize_images

__all__ = ["FOLDER_EXTENSIONS", "FOLDER_INFO", "FOLDER_SPLIT_SEED", "load_folder"]

#: File suffixes (case-insensitive) treated as images.
FOLDER_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")

#: Seed of the permutation behind the automatic 80/10/10 split.
FOLDER_SPLIT_SEED = 0

_GREY_MODES = frozenset({"1", "L", "LA"})
_COLOUR_MODES = frozenset({"P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})

FOLDER_INFO = DatasetInfo(
    name="folder",
    channels=0,
    num_classes=0,
    class_names=(),
    splits=SPLITS,
    native_size=0,
    mean=None,
    std=None,
    description=(
        "a user's images, one sub-folder per class (root/<class>/*.png|jpg|jpeg|bmp or "
        "root/{train,val,test}/<class>/...); channels and classes are discovered at load time"
    ),
)


@dataclass(frozen=True)
class _Item:
    """One image file and the name of its class folder."""

    path: Path
    class_name: str


@dataclass(frozen=True)
class _Header:
    """What PIL reports about a file without decoding its pixels."""

    mode: str
    size: tuple[int, int]  # width, height


def _is_image(path: Path) -> bool:
    """Whether ``path`` is a visible file with a supported image suffix."""
    return (
        path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() in (FOLDER_EXTENSIONS)
    )


def _scan(directory: Path) -> list[_Item]:
    """List ``directory/<class>/<image>`` files, sorted by class then file name."""
    items: list[_Item] = []
    for class_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        if class_dir.name.startswith("."):
            continue
        items.extend(
            _Item(path, class_dir.name) for path in sorted(class_dir.iterdir()) if _is_image(path)
        )
    return items


def _header(path: Path) -> _Header:
    """Read an image's mode and size, raising :class:`DatasetError` naming unreadable files."""
    try:
        with Image.open(path) as image:
            return _Header(image.mode, image.size)
    except OSError as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def _split_items(root: Path) -> dict[str, list[_Item]]:
    """Return the files of every split: explicit sub-folders, or the seeded 80/10/10 split."""
    explicit = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if explicit:
        if "train" not in explicit:
            raise DatasetError(
                f"image folder {root} has {sorted(explicit)} sub-folders but no train/; "
                f"add {root / 'train'} (one sub-folder per class)"
            )
        return {s: _scan(d) for s, d in explicit.items()}
    items = _scan(root)
    n_total = len(items)
    n_holdout = n_total // 10
    order = np.random.default_rng(FOLDER_SPLIT_SEED).permutation(n_total)
    n_train = n_total - 2 * n_holdout
    chosen = {
        "train": np.sort(order[:n_train]),
        "val": np.sort(order[n_train : n_train + n_holdout]),
        "test": np.sort(order[n_train + n_holdout :]),
    }
    return {s: [items[i] for i in idx] for s, idx in chosen.items()}


def _read_pixels(path: Path, mode: str) -> np.ndarray:
    """Decode one image into an ``(H, W)`` or ``(H, W, 3)`` ``uint8`` array."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert(mode), dtype=np.uint8)  # writable copy
    except OSError as exc:
        raise DatasetError(f"cannot decode image {path}: {exc}") from exc


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``(H, W)`` or ``(H, W, C)`` array -> ``(1, C, H, W)`` uint8 tensor."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).unsqueeze(0)


def load_folder(root: Path, split: str, download: bool, image_size: int | None = None) -> ImageData:
    """Load ``split`` of an image folder (see the module docstring for layout and rules)."""
    del download  # nothing to download for a user's folder
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a directory")
    splits = _split_items(root)
    every = [item for items in splits.values() for item in items]
    if not every:
        raise DatasetError(
            f"image folder {root} holds no images; expected {root}/<class>/*"
            f"{{{','.join(FOLDER_EXTENSIONS)}}} or {root}/train/<class>/..."
        )
    headers = {item.path: _header(item.path) for item in every}
    unsupported = [p for p, h in headers.items() if h.mode not in _GREY_MODES | _COLOUR_MODES]
    if unsupported:
        raise DatasetError(
            f"image {unsupported[0]} has mode {headers[unsupported[0]].mode!r}; only 8-bit grey "
            f"or colour images are supported (convert 16-bit/float images to 8-bit)"
        )
    mode = "L" if all(h.mode in _GREY_MODES for h in headers.values()) else "RGB"
    first = every[0].path
    sizes = {h.size for h in headers.values()}
    if len(sizes) > 1 and image_size is None:
        odd = next(p for p, h in headers.items() if h.size != headers[first].size)
        raise DatasetError(
            f"images in {root} differ in size ({first} is {headers[first].size}, {odd} is "
            f"{headers[odd].size}); pass image_size to resize them all"
        )
    if split not in splits:
        raise DatasetError(
            f"image folder {root} has no {split!r} split; it has: {', '.join(sorted(splits))}"
        )
    items = splits[split]
    if not items:
        raise DatasetError(
            f"split {split!r} of image folder {root} is empty ({len(every)} images in all; the "
            f"automatic 80/10/10 split needs at least 10); add images or use explicit "
            f"train/val/test sub-folders"
        )
    class_names = tuple(sorted({item.class_name for item in every}))
    class_index = {name: i for i, name in enumerate(class_names)}
    tensors = [_to_tensor(_read_pixels(item.path, mode)) for item in items]
    if len(sizes) > 1 and image_size is not None:  # differing sizes without a size raised above
        tensors = [resize_images(t, image_size) for t in tensors]
    images = torch.cat(tensors, dim=0)
    labels = torch.tensor([class_index[item.class_name] for item in items], dtype=torch.int64)
    (width, height) = next(iter(sizes))
    native = width if len(sizes) == 1 and width == height else 0
    info = DatasetInfo(
        name="folder",
        channels=1 if mode == "L" else 3,
        num_classes=len(class_names),
        class_names=class_names,
        splits=tuple(s for s in SPLITS if s in splits),
        native_size=native,
        mean=None,
        std=None,
        description=f"image folder {root}: {len(every)} images, {len(class_names)} classes",
    )
    return ImageData(images=images, labels=labels, info=info, mean=(), std=(), split=split)


register("folder", FOLDER_INFO)(load_folder)

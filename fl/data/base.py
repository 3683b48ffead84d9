"""Core types and the dataset registry of :mod:`fl.data`.

Every dataset is an entry in a registry mapping a lower-case name to a :class:`DatasetInfo`
(static facts) and a loader function ``(root: Path, split: str, download: bool) -> ImageData``.
:func:`load` looks the name up, calls the loader, resolves the per-channel normalisation
statistics of the train split and resizes the images if asked, so that everything downstream
works on in-memory ``uint8`` tensors of shape ``(N, C, H, W)``.

A loader may also accept a keyword argument ``image_size`` (as the ``folder`` loader does, because
a user's images can differ in size); :func:`load` then passes the requested size through.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fl.registry import Registry

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetError",
    "DatasetInfo",
    "ImageData",
    "Loader",
    "UnknownDatasetError",
    "available",
    "clear_caches",
    "compute_stats",
    "info",
    "load",
    "register",
    "resize_images",
    "unregister",
]

#: The split names a loader may be asked for.
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Images are resized in chunks of this many to bound the float32 working memory.
_RESIZE_CHUNK = 4096

#: Statistics are accumulated in chunks of this many images.
_STATS_CHUNK = 8192


class DatasetError(RuntimeError):
    """A dataset's files are missing, corrupt or fail their checksum, or a split does not exist.

    The message names the file or folder concerned, where it is expected and how to obtain it.
    """


class UnknownDatasetError(ValueError):
    """A dataset name that is not in the registry; the message lists the registered names."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a registered dataset.

    ``channels``, ``num_classes`` and ``native_size`` are 0 (and ``class_names`` empty) for
    datasets whose facts are only discovered at load time (``folder``, or a user loader registered
    without an info); the :class:`ImageData` returned by :func:`load` then carries the discovered
    info. ``mean``/``std`` are per-channel statistics of the train split on the [0, 1] scale, or
    ``None`` when they are computed from the train split on first load.
    """

    name: str
    channels: int
    num_classes: int
    class_names: tuple[str, ...]
    splits: tuple[str, ...]
    native_size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    description: str

    def __post_init__(self) -> None:
        """Check that the facts are self-consistent."""
        if not self.name:
            raise ValueError("DatasetInfo.name must be a non-empty string")
        if self.channels < 0 or self.num_classes < 0 or self.native_size < 0:
            raise ValueError(
                f"DatasetInfo({self.name!r}): channels, num_classes and native_size must be >= 0"
            )
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"DatasetInfo({self.name!r}): {len(self.class_names)} class names for "
                f"{self.num_classes} classes"
            )
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown:
            raise ValueError(f"DatasetInfo({self.name!r}): unknown splits {unknown}; use {SPLITS}")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"DatasetInfo({self.name!r}): give both mean and std, or neither")
        if self.mean is not None and self.std is not None:
            counts = {len(self.mean), len(self.std)}
            if self.channels and counts != {self.channels}:
                raise ValueError(
                    f"DatasetInfo({self.name!r}): mean/std need one value per channel "
                    f"({self.channels})"
                )
            if any(s <= 0 for s in self.std):
                raise ValueError(f"DatasetInfo({self.name!r}): std values must be > 0")

    @property
    def discovered(self) -> bool:
        """Whether channels/classes are only known after loading (generic info)."""
        return self.channels == 0


Indices = Sequence[int] | np.ndarray | torch.Tensor | slice


def _as_index(indices: Indices) -> torch.Tensor | slice:
    """Turn a user-supplied index collection into something a tensor can be indexed with."""
    if isinstance(indices, slice):
        return indices
    index = torch.as_tensor(np.asarray(indices) if not torch.is_tensor(indices) else indices)
    if index.dtype == torch.bool:
        return index
    if index.dtype.is_floating_point or index.dtype.is_complex:
        raise TypeError(f"indices must be integers or booleans, got {index.dtype}")
    return index.to(torch.long).reshape(-1)


@dataclass(eq=False)
class ImageData:
    """One split of a dataset held in memory.

    ``images`` is ``uint8`` of shape ``(N, C, H, W)``, ``labels`` is ``int64`` of shape ``(N,)``;
    ``mean``/``std`` are the per-channel statistics of the *train* split on the [0, 1] scale.
    Loaders may pass empty tuples for ``mean``/``std``: :func:`load` always replaces them with the
    resolved train-split statistics.
    """

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split: str

    def __post_init__(self) -> None:
        """Validate dtypes, shapes and label range so that errors surface at load time."""
        name = self.info.name
        if not torch.is_tensor(self.images) or self.images.dtype != torch.uint8:
            raise TypeError(f"{name}: images must be a uint8 tensor")
        if self.images.ndim != 4:
            raise ValueError(
                f"{name}: images must have shape (N, C, H, W), got {tuple(self.images.shape)}"
            )
        if not torch.is_tensor(self.labels) or self.labels.dtype != torch.int64:
            raise TypeError(f"{name}: labels must be an int64 tensor")
        if self.labels.ndim != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"{name}: labels must have shape ({self.images.shape[0]},), "
                f"got {tuple(self.labels.shape)}"
            )
        channels = self.images.shape[1]
        if self.info.channels and self.info.channels != channels:
            raise ValueError(
                f"{name}: info says {self.info.channels} channels, images have {channels}"
            )
        for label, stat in (("mean", self.mean), ("std", self.std)):
            if stat and len(stat) != channels:
                raise ValueError(f"{name}: {label} has {len(stat)} values for {channels} channels")
        if self.split not in SPLITS:
            raise ValueError(f"{name}: unknown split {self.split!r}; use one of {SPLITS}")
        if self.labels.numel():
            low, high = int(self.labels.min()), int(self.labels.max())
            if low < 0 or (self.info.num_classes and high >= self.info.num_classes):
                raise ValueError(
                    f"{name}: labels span [{low}, {high}] but there are "
                    f"{self.info.num_classes} classes"
                )

    def __len__(self) -> int:
        """Number of examples."""
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        """Number of image channels (1 grey, 3 RGB)."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """Image height and width in pixels."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def float_images(self, indices: Indices | None = None) -> torch.Tensor:
        """Return the (selected) images as float32 in [0, 1], shape ``(N, C, H, W)``."""
        images = self.images if indices is None else self.images[_as_index(indices)]
        return images.to(torch.float32).div_(255.0)

    def subset(self, indices: Indices) -> ImageData:
        """Return a new :class:`ImageData` holding only the given examples (same stats/info)."""
        index = _as_index(indices)
        return dataclasses.replace(self, images=self.images[index], labels=self.labels[index])


#: A dataset loader: ``(root, split, download) -> ImageData``; may accept ``image_size=``.
Loader = Callable[..., ImageData]


@dataclass(frozen=True)
class _Entry:
    """A registry entry: the static info, the loader, and whether it takes ``image_size``."""

    info: DatasetInfo
    loader: Loader
    takes_image_size: bool


def _normalise_name(name: str) -> str:
    """Registry keys are case-insensitive and stripped."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    return name.strip().lower()


DATASETS: Registry[_Entry] = Registry(
    "dataset",
    UnknownDatasetError,
    key=_normalise_name,
    unknown_message="unknown dataset {name!r}; registered datasets: {choices}",
    taken_message="dataset {name!r} is already registered; pass replace=True to override",
)
"""Dataset name (lower case) -> entry: the built-ins (marked in :mod:`fl.data`) and users' own."""
_STATS_CACHE: dict[tuple[str, str, int | None], tuple[tuple[float, ...], tuple[float, ...]]] = {}

#: Functions called by :func:`clear_caches`; other modules append their own cache clearers.
_CLEAR_HOOKS: list[Callable[[], None]] = []


def _generic_info(name: str) -> DatasetInfo:
    """Info for a dataset whose facts are discovered by its loader."""
    return DatasetInfo(
        name=name,
        channels=0,
        num_classes=0,
        class_names=(),
        splits=SPLITS,
        native_size=0,
        mean=None,
        std=None,
        description=f"user-registered dataset {name!r}; facts are discovered at load time",
    )


def register(
    name: str, info: DatasetInfo | None = None, *, replace: bool = False
) -> Callable[[Loader], Loader]:
    """Return a decorator registering a loader function under ``name``.

    The loader is called as ``loader(root: Path, split: str, download: bool)`` (plus
    ``image_size=`` when its signature has such a parameter) and must return an
    :class:`ImageData`. Without ``info``, a generic info is registered and the loaded data's info
    is used. Registering an existing name raises ``ValueError`` unless ``replace=True``.
    """
    key = _normalise_name(name)
    if not key:
        raise ValueError("dataset name must be non-empty")
    if info is not None and _normalise_name(info.name) != key:
        raise ValueError(f"info.name {info.name!r} does not match registered name {name!r}")
    DATASETS.check_free(key, replace=replace)
    resolved_info = info if info is not None else _generic_info(key)

    def decorator(loader: Loader) -> Loader:
        """Record ``loader`` in the registry and return it unchanged."""
        if not callable(loader):
            raise TypeError(f"loader for {key!r} must be callable")
        params = inspect.signature(loader).parameters
        DATASETS.register(key, _Entry(resolved_info, loader, "image_size" in params), replace=True)
        return loader

    return decorator


def unregister(name: str) -> None:
    """Remove a registered dataset (mainly for tests and plugins); unknown names raise."""
    DATASETS.unregister(name)


def available() -> list[str]:
    """Return the sorted names of all registered datasets."""
    return DATASETS.names()


def _entry(name: str) -> _Entry:
    """Look a dataset up, raising :class:`UnknownDatasetError` listing the known names."""
    return DATASETS.get(name)


def info(name: str) -> DatasetInfo:
    """Return the static :class:`DatasetInfo` of a registered dataset."""
    return _entry(name).info


def compute_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``uint8`` images ``(N, C, H, W)`` on [0, 1].

    Accumulates in float64 over chunks. A channel with zero spread (constant images) gets std 1.0
    so that normalising by it is the identity rather than a division by zero.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"need a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], _STATS_CHUNK):
        chunk = images[start : start + _STATS_CHUNK].to(torch.float64).div_(255.0)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    std = var.sqrt()
    std_list = [float(s) if s > 1e-12 else 1.0 for s in std]
    return tuple(float(m) for m in mean), tuple(std_list)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``uint8`` images ``(N, C, H, W)`` to ``size x size`` (bilinear, antialiased).

    Works on float32 in chunks and rounds back to ``uint8``; a no-op when already that size.
    """
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].to(torch.float32)
        resized = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + _RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def clear_caches() -> None:
    """Forget cached train-split statistics (and the MedMNIST checksum cache)."""
    _STATS_CACHE.clear()
    for hook in _CLEAR_HOOKS:
        hook()


def _call_loader(
    entry: _Entry, root: Path, split: str, download: bool, image_size: int | None
) -> ImageData:
    """Invoke a loader with the arguments its signature accepts and check what it returns."""
    kwargs: dict[str, Any] = {"image_size": image_size} if entry.takes_image_size else {}
    result = entry.loader(root, split, download, **kwargs)
    if not isinstance(result, ImageData):
        raise TypeError(
            f"loader for {entry.info.name!r} returned {type(result).__name__}, expected ImageData"
        )
    return result


def _resolve_stats(
    entry: _Entry,
    root: Path,
    split: str,
    download: bool,
    image_size: int | None,
    loaded: ImageData,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the train-split statistics: the info's constants, or computed once and cached.

    The cache key is ``(name, root, image_size)`` where ``image_size`` only matters for loaders
    that take it (their native images may not even be stackable without it).
    """
    if entry.info.mean is not None and entry.info.std is not None:
        return entry.info.mean, entry.info.std
    size_key = image_size if entry.takes_image_size else None
    key = (entry.info.name, str(root), size_key)
    cached = _STATS_CACHE.get(key)
    if cached is not None:
        return cached
    splits = loaded.info.splits or entry.info.splits
    if split == "train" or "train" not in splits:
        source = loaded
    else:
        source = _call_loader(entry, root, "train", download, image_size)
    stats = compute_stats(source.images)
    _STATS_CACHE[key] = stats
    return stats


def load(
    name: str,
    *,
    root: str | Path,
    split: str,
    download: bool = False,
    image_size: int | None = None,
) -> ImageData:
    """Load one split of a registered dataset into memory.

    ``root`` is the data directory (for ``folder``: the image tree itself). With ``download``,
    missing files are fetched from the official source. With ``image_size``, images are resized
    to ``image_size x image_size`` (bilinear, antialiased) when that differs from their size.
    The returned data's ``mean``/``std`` are the train split's per-channel statistics.
    """
    entry = _entry(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if entry.info.splits and split not in entry.info.splits:
        raise DatasetError(
            f"dataset {entry.info.name!r} has no {split!r} split; it has: "
            f"{', '.join(entry.info.splits)}"
        )
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    root_path = Path(root).expanduser().resolve()
    loaded = _call_loader(entry, root_path, split, download, image_size)
    if loaded.split != split:
        raise ValueError(
            f"loader for {entry.info.name!r} returned split {loaded.split!r}, asked for {split!r}"
        )
    mean, std = _resolve_stats(entry, root_path, split, download, image_size, loaded)
    images = loaded.images if image_size is None else resize_images(loaded.images, image_size)
    return dataclasses.replace(loaded, images=images, mean=mean, std=std)

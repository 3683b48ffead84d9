"""Classic vision benchmarks loaded through ``torchvision.datasets``.

``cifar10``, ``cifar100``, ``mnist`` and ``fashionmnist`` have only ``train`` and ``test`` splits
(asking for ``val`` raises :class:`DatasetError`). torchvision reads its own on-disk layout under
``root`` (e.g. ``<root>/cifar-10-batches-py``, ``<root>/MNIST/raw``); the whole split is
converted at once to ``uint8`` tensors ``(N, C, H, W)`` from the dataset's ``data``/``targets``
arrays, so no per-item PIL conversion happens. Mean/std are the well-known train-split constants
(population std on the [0, 1] scale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl.data.base import DatasetError, DatasetInfo, ImageData, register

__all__ = ["TORCHVISION_SETS", "TorchvisionSpec"]

_CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# CIFAR-100 fine labels, in label order (alphabetical), as in the dataset's ``meta`` file.
_CIFAR100_CLASSES = (
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
)

_MNIST_CLASSES = tuple(str(d) for d in range(10))

_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class TorchvisionSpec:
    """How to load one torchvision dataset and where its files live."""

    info: DatasetInfo
    class_name: str  # attribute of ``torchvision.datasets``
    subdir: str  # where torchvision expects the files, relative to root
    source: str  # where to get the files by hand


def _info(
    name: str,
    channels: int,
    class_names: tuple[str, ...],
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    description: str,
) -> DatasetInfo:
    """Registry facts of a train/test-only torchvision dataset."""
    return DatasetInfo(
        name=name,
        channels=channels,
        num_classes=len(class_names),
        class_names=class_names,
        splits=("train", "test"),
        native_size=size,
        mean=mean,
        std=std,
        description=description,
    )


#: The registered torchvision datasets, keyed by name.
TORCHVISION_SETS: dict[str, TorchvisionSpec] = {
    spec.info.name: spec
    for spec in (
        TorchvisionSpec(
            info=_info(
                "cifar10",
                3,
                _CIFAR10_CLASSES,
                32,
                (0.4914, 0.4822, 0.4465),
                (0.2470, 0.2435, 0.2616),
                "CIFAR-10: 32 px natural colour images, 10 classes, train/test 50000/10000",
            ),
            class_name="CIFAR10",
            subdir="cifar-10-batches-py",
            source="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract into root)",
        ),
        TorchvisionSpec(
            info=_info(
                "cifar100",
                3,
                _CIFAR100_CLASSES,
                32,
                (0.5071, 0.4865, 0.4409),
                (0.2673, 0.2564, 0.2762),
                "CIFAR-100: 32 px natural colour images, 100 fine classes, train/test 50000/10000",
            ),
            class_name="CIFAR100",
            subdir="cifar-100-python",
            source="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extract into root)",
        ),
        TorchvisionSpec(
            info=_info(
                "mnist",
                1,
                _MNIST_CLASSES,
                28,
                (0.1307,),
                (0.3081,),
                "MNIST: 28 px grey handwritten digits, 10 classes, train/test 60000/10000",
            ),
            class_name="MNIST",
            subdir="MNIST/raw",
            source="https://ossci-datasets.s3.amazonaws.com/mnist/ "
            "(the four *-idx?-ubyte.gz files, gunzipped)",
        ),
        TorchvisionSpec(
            info=_info(
                "fashionmnist",
                1,
                _FASHION_CLASSES,
                28,
                (0.2860,),
                (0.3530,),
                "Fashion-MNIST: 28 px grey clothing images, 10 classes, train/test 60000/10000",
            ),
            class_name="FashionMNIST",
            subdir="FashionMNIST/raw",
            source="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ "
            "(the four *-idx?-ubyte.gz files, gunzipped)",
        ),
    )
}


def _to_numpy(values: Any) -> np.ndarray:
    """Turn a torchvision ``data``/``targets`` attribute (array, tensor or list) into numpy."""
    if torch.is_tensor(values):
        return values.numpy()
    return np.asarray(values)


def _convert(spec: TorchvisionSpec, dataset: Any, split: str, root: Path) -> ImageData:
    """Build an :class:`ImageData` from a torchvision dataset's in-memory arrays."""
    images = _to_numpy(dataset.data)
    labels = _to_numpy(dataset.targets)
    if images.dtype != np.uint8:
        raise DatasetError(f"{spec.info.name} under {root}: images have dtype {images.dtype}")
    if images.ndim == 3:
        tensor = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    else:
        raise DatasetError(
            f"{spec.info.name} under {root}: unexpected image array shape {images.shape}"
        )
    return ImageData(
        images=tensor,
        labels=torch.from_numpy(labels.reshape(-1).astype(np.int64)),
        info=spec.info,
        mean=(),
        std=(),
        split=split,
    )


def _make_loader(spec: TorchvisionSpec) -> Callable[[Path, str, bool], ImageData]:
    """Build the registry loader of one torchvision dataset."""

    def loader(root: Path, split: str, download: bool) -> ImageData:
        """Load ``split`` through ``torchvision.datasets``, wrapping missing-file errors."""
        import torchvision.datasets as tv_datasets

        dataset_cls = getattr(tv_datasets, spec.class_name)
        location = Path(root) / spec.subdir
        try:
            dataset = dataset_cls(root=str(root), train=split == "train", download=download)
        except (RuntimeError, OSError) as exc:
            action = "downloading failed" if download else "files not found"
            raise DatasetError(
                f"{spec.info.name}: {action} under {location} ({exc}). Pass download=True with "
                f"network access, or offline place the files from {spec.source} so that "
                f"{location} exists."
            ) from exc
        return _convert(spec, dataset, split, Path(root))

    loader.__name__ = f"load_{spec.info.name}"
    loader.__qualname__ = loader.__name__
    return loader


for _spec in TORCHVISION_SETS.values():
    register(_spec.info.name, _spec.info)(_make_loader(_spec))

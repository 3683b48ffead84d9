"""Datasets and client partitioning for the federated-learning simulator.

Usage::

    from fl import data

    data.available()                       # registered dataset names
    data.info("pneumoniamnist")            # static facts (DatasetInfo)
    train = data.load("pneumoniamnist", root="~/data", split="train", image_size=32)
    parts = data.partition(train.labels, 10, scheme="dirichlet", alpha=0.1, seed=0)

Registered: the MedMNIST v2 2-D datasets at 28 px except the multi-label ChestMNIST
(:mod:`fl.data.medmnist`), ``cifar10``/``cifar100``/``mnist``/``fashionmnist`` through torchvision
(:mod:`fl.data.torchvision_sets`), and ``folder`` for a user's own class-per-folder images
(:mod:`fl.data.folder`). Further datasets are added with :func:`register` (removed with
:func:`unregister`).
"""

from __future__ import annotations

from fl.data import folder as _folder  # registers "folder"
from fl.data import medmnist as _medmnist  # registers the MedMNIST datasets
from fl.data import torchvision_sets as _torchvision_sets  # registers cifar/mnist sets
from fl.data.base import (
    DATASETS,
    SPLITS,
    DatasetError,
    DatasetInfo,
    ImageData,
    Loader,
    UnknownDatasetError,
    available,
    clear_caches,
    compute_stats,
    info,
    load,
    register,
    resize_images,
    unregister,
)
from fl.data.partition import SCHEMES, label_skew, partition, split_holdout

del _folder, _medmnist, _torchvision_sets
DATASETS.mark_builtin()

__all__ = [
    "DATASETS",
    "SCHEMES",
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
    "label_skew",
    "load",
    "partition",
    "register",
    "resize_images",
    "split_holdout",
    "unregister",
]

"""What an attacker holds beyond the server's view: public images of the clients' kind, and the
defense's algorithm (Kerckhoffs).

:class:`attacks.threat.PublicDataSpec` says where the images come from; :func:`load_public_data`
resolves it into tensors and refuses any overlap with a client's data, by index. An
:class:`AttackerResources` carries both to :meth:`attacks.base.Attack.run`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attacks.threat import PublicDataSpec
from fl import data as fl_data
from fl.simulation.hooks import ClientHooks


class PublicDataError(ValueError):
    """Public data that cannot be granted: a client's images, a missing source, a wrong shape."""


@dataclass(frozen=True)
class PublicData:
    """The attacker's public images (N, C, H, W) in [0, 1] and their labels, on the CPU.

    ``indices`` are the images' positions in their source split (for overlap checks) and
    ``source`` says where they come from, e.g. ``"1000 images of pneumoniamnist's test split"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: np.ndarray
    source: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[0] == 0:
            raise PublicDataError(
                f"public images must be a non-empty (N, C, H, W) batch, got "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise PublicDataError("public data needs one label per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def from_tensors(
        cls, images: torch.Tensor, labels: torch.Tensor, source: str = "given images"
    ) -> PublicData:
        """Public data from tensors already in hand (images in [0, 1] or ``uint8``).

        Example:
            >>> pub = PublicData.from_tensors(torch.rand(8, 1, 16, 16), torch.zeros(8).long())
            >>> len(pub)
            8
        """
        floats = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return cls(floats.cpu(), labels.long().cpu(), np.arange(images.shape[0]), source)


DefenseFactory = Callable[[], ClientHooks]
"""Builds a fresh instance of the trial's defense with its hyperparameters (its private state,
e.g. noise draws or a generator's weights, is the attacker's own)."""


@dataclass(frozen=True)
class AttackerResources:
    """What an attacker brings to an attack besides the observation: public images (granted by
    ``capabilities.public_data``) and the defense's algorithm and hyperparameters (Kerckhoffs:
    always known), as a factory of fresh hooks."""

    public: PublicData | None = None
    defense: DefenseFactory | None = None
    defense_name: str = "none"
    rounds: int | None = None
    """The federation's number of rounds (public; some defenses schedule by it)."""

    def hooks(self) -> ClientHooks:
        """A fresh instance of the defense (no defense: the no-op hooks)."""
        return self.defense() if self.defense is not None else ClientHooks()


def same_dataset(a: str, b: str) -> bool:
    """Whether two registered dataset names (any spelling the registry accepts) are one."""
    return fl_data.info(a).name == fl_data.info(b).name


def _draw(pool: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` positions of ``pool`` (all when fewer), chosen by ``seed``, sorted."""
    if count >= pool.shape[0]:
        return np.sort(pool)
    rng = np.random.default_rng([int(seed), 0x9B11C])
    return np.sort(rng.choice(pool, size=count, replace=False))


def check_disjoint(public: np.ndarray, clients: Sequence[np.ndarray]) -> None:
    """Refuse public train-split indices that any client holds.

    Raises:
        PublicDataError: naming the first client whose data overlaps, and how many images.

    Example:
        >>> check_disjoint(np.array([5, 6]), [np.array([0, 1]), np.array([2, 3])])
        >>> check_disjoint(np.array([1, 6]), [np.array([0, 1])])
        Traceback (most recent call last):
        ...
        attacks.public.PublicDataError: public data overlaps client 0's training data ...
    """
    for client, part in enumerate(clients):
        shared = np.intersect1d(public, part)
        if shared.size:
            raise PublicDataError(
                f"public data overlaps client {client}'s training data ({shared.size} images, "
                f"e.g. train index {int(shared[0])}); take it from a split no client holds "
                "(test, val) or from federation.partition.holdout"
            )


def load_public_data(
    spec: PublicDataSpec,
    *,
    dataset: str,
    root: str,
    seed: int,
    image_size: int | None = None,
    download: bool = False,
    holdout: np.ndarray | None = None,
    clients: Sequence[np.ndarray] = (),
    channels: int | None = None,
) -> PublicData:
    """Resolve ``spec`` for a study on ``dataset``: load the split, draw ``spec.count`` images.

    Args:
        spec: where the attacker's images come from and how many.
        dataset: the study's dataset (a registered name).
        root: the folder its files are in.
        seed: the study's seed (which images are drawn).
        image_size: the study's image size (None: native).
        download: whether a missing dataset may be downloaded.
        holdout: the train indices the partition keeps from every client (``split: holdout``).
        clients: every client's train indices; public train images among them are refused.
        channels: the model's input channels; another dataset must match them.

    Raises:
        PublicDataError: the study's own train split, a holdout without held-out images, public
            images a client holds, or another dataset of a different channel count.
    """
    source = spec.dataset or dataset
    same = same_dataset(source, dataset)
    if same and spec.split == "train":
        raise PublicDataError(
            "public_data.split: 'train' of the study's own dataset is the clients' data; use "
            "'test', 'val', or 'holdout' with federation.partition.holdout > 0"
        )
    if spec.split == "holdout":
        if not same:
            raise PublicDataError(
                "public_data.split: 'holdout' is a share of the study's own train split; for "
                f"another dataset ({source!r}) use 'train', 'val' or 'test'"
            )
        if holdout is None or holdout.size == 0:
            raise PublicDataError(
                "public_data.split: 'holdout' needs federation.partition.holdout > 0 (the share "
                "of the train split no client receives)"
            )
    split = "train" if spec.split == "holdout" else spec.split
    data = fl_data.load(source, root=root, split=split, download=download, image_size=image_size)
    pool = holdout if spec.split == "holdout" and holdout is not None else np.arange(len(data))
    chosen = _draw(np.asarray(pool, dtype=np.int64), spec.count, seed)
    if same and split == "train":
        check_disjoint(chosen, clients)
    if channels is not None and data.channels != channels:
        raise PublicDataError(
            f"public_data.dataset: {source!r} has {data.channels} channel(s), the model takes "
            f"{channels}; choose a dataset of the same kind"
        )
    index = torch.as_tensor(chosen)
    described = spec.model_copy(update={"count": int(chosen.size)}).describe(dataset)
    return PublicData(data.float_images(index), data.labels[index].long(), chosen, described)

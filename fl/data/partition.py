"""Splitting a dataset's examples among federated clients.

:func:`partition` returns one sorted ``int64`` index array per client (indices into ``labels``);
the arrays are disjoint, every client gets at least one example, and the result depends only on
the arguments (all randomness comes from ``np.random.default_rng(seed)``).

Schemes (a registry; see :data:`SCHEMES`):

* ``iid`` — a random permutation cut into ``num_clients`` near-equal parts (sizes differ by <= 1).
* ``dirichlet`` — label skew after Hsu et al. (2019), in the common per-class form: for every
  class, proportions ``p ~ Dir(alpha * 1_K)`` over the ``K`` clients, and that class's (shuffled)
  examples are cut according to ``p``. Small ``alpha`` gives each client few classes; large
  ``alpha`` approaches iid. If some client ends up empty, the whole draw is repeated (at most
  :data:`DIRICHLET_MAX_ATTEMPTS` times); if clients are still empty, each empty client receives
  one example taken from the currently largest client.
* ``shards`` — McMahan et al. (2017): examples sorted by label (random order within a class) are
  cut into ``num_clients * shards_per_client`` contiguous near-equal shards, and each client gets
  ``shards_per_client`` random shards. A client therefore sees at most ``shards_per_client``
  classes when shard boundaries coincide with class boundaries; a shard straddling a boundary adds
  one more class.

``max_per_client`` then caps every client by a seeded subsample without replacement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DIRICHLET_MAX_ATTEMPTS",
    "SCHEMES",
    "PartitionOptions",
    "label_skew",
    "partition",
    "split_holdout",
]

#: How often a Dirichlet draw is repeated before empty clients are filled by moving examples.
DIRICHLET_MAX_ATTEMPTS = 100


@dataclass(frozen=True)
class PartitionOptions:
    """Scheme parameters, validated by the scheme that uses them."""

    alpha: float
    shards_per_client: int


Scheme = Callable[[np.ndarray, int, np.random.Generator, PartitionOptions], list[np.ndarray]]


def _iid(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, options: PartitionOptions
) -> list[np.ndarray]:
    """Random equal split: a permutation cut into ``num_clients`` near-equal parts."""
    del options
    return list(np.array_split(rng.permutation(labels.shape[0]), num_clients))


def _dirichlet_draw(
    by_class: list[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """One Dirichlet label-skew draw: each class's examples cut by ``Dir(alpha)`` proportions."""
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for members in by_class:
        shuffled = rng.permutation(members)
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * shuffled.shape[0]).astype(np.int64)
        for client, piece in enumerate(np.split(shuffled, cuts)):
            buckets[client].append(piece)
    return [np.concatenate(pieces) for pieces in buckets]


def _fill_empty(parts: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Give each empty client one example taken at random from the currently largest client."""
    parts = list(parts)
    for client in range(len(parts)):
        if parts[client].shape[0]:
            continue
        donor = int(np.argmax([p.shape[0] for p in parts]))
        pick = int(rng.integers(parts[donor].shape[0]))
        parts[client] = parts[donor][pick : pick + 1]
        parts[donor] = np.delete(parts[donor], pick)
    return parts


def _dirichlet(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, options: PartitionOptions
) -> list[np.ndarray]:
    """Per-class ``Dir(alpha)`` proportions over clients (Hsu et al., 2019); no client empty."""
    alpha = options.alpha
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    parts: list[np.ndarray] = []
    for _ in range(DIRICHLET_MAX_ATTEMPTS):
        parts = _dirichlet_draw(by_class, num_clients, alpha, rng)
        if min(p.shape[0] for p in parts) > 0:
            return parts
    return _fill_empty(parts, rng)


def _shards(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, options: PartitionOptions
) -> list[np.ndarray]:
    """Label-sorted shards, ``shards_per_client`` random ones per client (McMahan et al., 2017)."""
    per_client = options.shards_per_client
    if isinstance(per_client, bool) or not isinstance(per_client, int | np.integer):
        raise ValueError(f"shards_per_client must be an int, got {per_client!r}")
    if per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {per_client}")
    n_shards = num_clients * int(per_client)
    if n_shards > labels.shape[0]:
        raise ValueError(
            f"shards: {num_clients} clients x {per_client} shards = {n_shards} shards, but only "
            f"{labels.shape[0]} examples; lower shards_per_client or num_clients"
        )
    order = rng.permutation(labels.shape[0])
    order = order[np.argsort(labels[order], kind="stable")]
    shards = np.array_split(order, n_shards)
    assignment = rng.permutation(n_shards).reshape(num_clients, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in assignment]


#: Registered partition schemes by name.
SCHEMES: dict[str, Scheme] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "shards": _shards,
}


def _as_labels(labels: Any) -> np.ndarray:
    """Validate labels (array, list or CPU tensor of shape (N,) or (N, 1)) into an int64 array."""
    array = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"labels must have shape (N,) or (N, 1), got {array.shape}")
    if array.shape[0] and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.shape[0] and array.min() < 0:
        raise ValueError("labels must be non-negative class indices")
    return array


def partition(
    labels: Sequence[int] | np.ndarray | Any,
    num_clients: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    max_per_client: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split example indices among ``num_clients`` clients according to ``scheme``.

    Returns ``num_clients`` disjoint, sorted, non-empty ``int64`` index arrays into ``labels``.
    ``alpha`` is used by ``dirichlet``, ``shards_per_client`` by ``shards``; ``max_per_client``
    caps each client's size by a seeded subsample. Raises ``ValueError`` for bad arguments.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; known schemes: {sorted(SCHEMES)}")
    array = _as_labels(labels)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer):
        raise ValueError(f"num_clients must be an int, got {num_clients!r}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > array.shape[0]:
        raise ValueError(
            f"cannot give {num_clients} clients at least one example each: only "
            f"{array.shape[0]} examples"
        )
    if max_per_client is not None and (
        isinstance(max_per_client, bool)
        or not isinstance(max_per_client, int | np.integer)
        or max_per_client < 1
    ):
        raise ValueError(f"max_per_client must be a positive int or None, got {max_per_client!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an int, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    options = PartitionOptions(alpha=float(alpha), shards_per_client=shards_per_client)
    parts = SCHEMES[scheme](array, int(num_clients), rng, options)
    if max_per_client is not None:
        parts = [
            rng.choice(p, size=int(max_per_client), replace=False)
            if p.shape[0] > max_per_client
            else p
            for p in parts
        ]
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]


def split_holdout(n: int, share: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split ``n`` train indices into those the clients share and a held-out ``share`` no
    client receives (an attacker's public data, ``federation.partition.holdout``).

    Returns ``(kept, held_out)``, both sorted ``int64``; ``share`` 0 keeps everything.

    Example:
        >>> kept, held = split_holdout(10, 0.2, seed=0)
        >>> len(kept), len(held), sorted(set(kept) | set(held)) == list(range(10))
        (8, 2, True)
    """
    if not 0 <= share < 1:
        raise ValueError(f"holdout share must be in [0, 1), got {share!r}")
    held_count = round(share * n)
    if held_count == 0:
        return np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)
    order = np.random.default_rng([int(seed), 0x401D]).permutation(n)
    return np.sort(order[held_count:]).astype(np.int64), np.sort(order[:held_count]).astype(
        np.int64
    )


def label_skew(
    parts: Sequence[np.ndarray],
    labels: Sequence[int] | np.ndarray | Any,
    num_classes: int | None = None,
) -> float:
    """Mean total-variation distance between each client's label distribution and the global one.

    0 means every client mirrors the global label mix; values near 1 mean clients hold classes
    that are rare overall. ``num_classes`` defaults to ``max(labels) + 1``.
    """
    array = _as_labels(labels)
    if not len(parts):
        raise ValueError("label_skew needs at least one client")
    classes = int(array.max()) + 1 if num_classes is None else int(num_classes)
    if classes < 1 or (array.shape[0] and array.max() >= classes):
        raise ValueError(f"num_classes={num_classes} does not cover labels up to {array.max()}")
    overall = np.bincount(array, minlength=classes) / array.shape[0]
    distances = []
    for client, indices in enumerate(parts):
        indices = np.asarray(indices, dtype=np.int64)
        if indices.shape[0] == 0:
            raise ValueError(f"client {client} is empty; label skew is undefined")
        local = np.bincount(array[indices], minlength=classes) / indices.shape[0]
        distances.append(0.5 * float(np.abs(local - overall).sum()))
    return float(np.mean(distances))

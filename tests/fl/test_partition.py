"""Tests of :func:`fl.data.partition` and :func:`fl.data.label_skew`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl import data

SCHEMES = ["iid", "dirichlet", "shards"]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """2000 labels over 10 classes with unequal class sizes."""
    return np.random.default_rng(123).integers(0, 10, 2000)


def _check_cover(parts: list[np.ndarray], n: int) -> None:
    """Parts are disjoint, sorted int64 index arrays whose union is range(n)."""
    joined = np.concatenate(parts)
    assert joined.shape[0] == n
    assert np.array_equal(np.sort(joined), np.arange(n))
    for part in parts:
        assert part.dtype == np.int64 and part.shape[0] > 0
        assert np.all(np.diff(part) > 0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_disjoint_cover(scheme: str, labels: np.ndarray) -> None:
    parts = data.partition(labels, 12, scheme=scheme, seed=3)
    assert len(parts) == 12
    _check_cover(parts, labels.shape[0])


def test_iid_sizes_nearly_equal(labels: np.ndarray) -> None:
    sizes = [p.shape[0] for p in data.partition(labels, 7, scheme="iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == labels.shape[0]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_per_seed(scheme: str, labels: np.ndarray) -> None:
    first = data.partition(labels, 10, scheme=scheme, seed=5)
    second = data.partition(labels, 10, scheme=scheme, seed=5)
    other = data.partition(labels, 10, scheme=scheme, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_accepts_tensors_and_column_labels(labels: np.ndarray) -> None:
    expected = data.partition(labels, 5, scheme="dirichlet", seed=1)
    for variant in (torch.from_numpy(labels), labels[:, None], labels.tolist()):
        got = data.partition(variant, 5, scheme="dirichlet", seed=1)
        assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))


def test_label_skew_grows_as_alpha_shrinks(labels: np.ndarray) -> None:
    def mean_skew(alpha: float) -> float:
        """Average skew of 20-client Dirichlet partitions over a few seeds."""
        return float(
            np.mean(
                [
                    data.label_skew(
                        data.partition(labels, 20, scheme="dirichlet", alpha=alpha, seed=s),
                        labels,
                        10,
                    )
                    for s in range(4)
                ]
            )
        )

    skews = [mean_skew(a) for a in (100.0, 1.0, 0.05)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.6
    iid = data.label_skew(data.partition(labels, 20, scheme="iid"), labels, 10)
    assert iid < 0.15


def test_label_skew_extremes() -> None:
    labels = np.array([0, 0, 1, 1])
    assert data.label_skew([np.array([0, 2]), np.array([1, 3])], labels) == 0.0
    assert data.label_skew([np.array([0, 1]), np.array([2, 3])], labels) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        data.label_skew([np.array([0, 1, 2, 3]), np.array([], dtype=np.int64)], labels)


def test_shards_limit_classes_per_client() -> None:
    # 10 classes x 60 examples; 20 clients x 3 shards = 60 shards of 10: shards never straddle.
    labels = np.repeat(np.arange(10), 60)
    np.random.default_rng(0).shuffle(labels)
    for k in (1, 2, 3):
        parts = data.partition(labels, 20, scheme="shards", shards_per_client=k, seed=k)
        _check_cover(parts, labels.shape[0])
        classes = [np.unique(labels[p]).shape[0] for p in parts]
        assert max(classes) <= k
        assert all(p.shape[0] == labels.shape[0] // 20 for p in parts)
    one = data.partition(labels, 20, scheme="shards", shards_per_client=1, seed=0)
    assert all(np.unique(labels[p]).shape[0] == 1 for p in one)


def test_dirichlet_never_leaves_a_client_empty(labels: np.ndarray) -> None:
    for seed in range(5):
        parts = data.partition(labels, 50, scheme="dirichlet", alpha=1e-3, seed=seed)
        _check_cover(parts, labels.shape[0])
    # As many clients as examples: every client gets exactly one.
    tiny = np.array([0, 0, 0, 1, 1, 2])
    parts = data.partition(tiny, 6, scheme="dirichlet", alpha=0.01, seed=0)
    assert [p.shape[0] for p in parts] == [1] * 6
    _check_cover(parts, 6)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_max_per_client(scheme: str, labels: np.ndarray) -> None:
    parts = data.partition(labels, 10, scheme=scheme, max_per_client=37, seed=2)
    assert all(0 < p.shape[0] <= 37 for p in parts)
    joined = np.concatenate(parts)
    assert np.unique(joined).shape[0] == joined.shape[0]
    again = data.partition(labels, 10, scheme=scheme, max_per_client=37, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    full = data.partition(labels, 10, scheme=scheme, max_per_client=10_000, seed=2)
    _check_cover(full, labels.shape[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "pathological"}, "known schemes: \\['dirichlet', 'iid', 'shards'\\]"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"scheme": "dirichlet", "alpha": -1.0}, "alpha"),
        ({"scheme": "shards", "shards_per_client": 0}, "shards_per_client"),
        ({"scheme": "shards", "shards_per_client": 200}, "only 100 examples"),
        ({"max_per_client": 0}, "max_per_client"),
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 101}, "only 100 examples"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    labels = np.arange(100) % 4
    call: dict[str, object] = {"num_clients": 4, **kwargs}
    num_clients = call.pop("num_clients")
    with pytest.raises(ValueError, match=message):
        data.partition(labels, num_clients, **call)  # type: ignore[arg-type]


def test_bad_labels() -> None:
    with pytest.raises(ValueError, match="integers"):
        data.partition(np.array([0.5, 1.0, 2.0]), 2)
    with pytest.raises(ValueError, match="shape"):
        data.partition(np.zeros((3, 2), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="non-negative"):
        data.partition(np.array([0, -1, 2]), 2)

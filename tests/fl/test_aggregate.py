"""The server's aggregation rule alone (:func:`fl.simulation.aggregate.aggregate`)."""

from __future__ import annotations

import pytest
import torch

from fl.simulation.aggregate import aggregate


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(seed + 1),
        "head.bias": torch.randn(2, generator=g, dtype=torch.float64),
    }


def test_weights_are_normalised() -> None:
    updates = [_state(0), _state(1)]
    counts = aggregate(updates, [2, 6])
    shares = aggregate(updates, [0.25, 0.75])
    for name, value in counts.items():
        assert torch.equal(value, shares[name]), name
    expected = 0.25 * updates[0]["conv.weight"] + 0.75 * updates[1]["conv.weight"]
    assert torch.allclose(counts["conv.weight"], expected, atol=1e-6, rtol=0)


def test_equal_weights_give_the_plain_mean() -> None:
    updates = [_state(s) for s in range(3)]
    mean = aggregate(updates, [5, 5, 5])
    for name in ("conv.weight", "bn.running_mean", "head.bias"):
        plain = torch.stack([u[name] for u in updates]).mean(0)
        assert torch.allclose(mean[name], plain, atol=1e-6, rtol=0), name


def test_one_client_is_the_identity() -> None:
    update = _state(4)
    out = aggregate([update], [17])
    assert out.keys() == update.keys()
    for name, value in update.items():
        assert out[name].dtype == value.dtype
        assert torch.equal(out[name], value), name


def test_dtypes_kept_and_integer_buffers_take_the_largest() -> None:
    updates = [_state(2), _state(7), _state(0)]
    out = aggregate(updates, [1, 1, 3])
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert out["bn.num_batches_tracked"].shape == torch.Size([])
    assert int(out["bn.num_batches_tracked"]) == 8
    assert out["head.bias"].dtype == torch.float64
    assert out["conv.weight"].dtype == torch.float32


def test_the_arithmetic_is_the_simulators() -> None:
    """Bit for bit the FedAvg rule the simulator has always applied: float64 weights normalised
    then taken as Python floats, ``sum()`` of ``w * tensor`` client by client, integer buffers
    the clients' ``max``."""
    updates = [_state(s) for s in range(5)]
    counts = [3, 8, 8, 1, 13]
    w = torch.tensor(counts, dtype=torch.float64)
    shares = (w / w.sum()).tolist()
    out = aggregate(updates, counts)
    for name, value in updates[0].items():
        if value.is_floating_point():
            before = sum(s * u[name] for s, u in zip(shares, updates, strict=True))
        else:
            before = max(u[name] for u in updates)
        assert torch.equal(out[name], before), name


def test_inputs_are_not_modified() -> None:
    updates = [_state(0), _state(1)]
    copies = [{k: v.clone() for k, v in u.items()} for u in updates]
    aggregate(updates, [1, 2])
    for u, c in zip(updates, copies, strict=True):
        for name in u:
            assert torch.equal(u[name], c[name])


def test_no_update_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one client update"):
        aggregate([], [])


@pytest.mark.parametrize(
    ("weights", "problem"),
    [([1.0], "one weight per update"), ([1.0, -1.0], "non-negative"), ([0, 0], "positive sum")],
)
def test_bad_weights_are_an_error(weights: list[float], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        aggregate([_state(0), _state(1)], weights)

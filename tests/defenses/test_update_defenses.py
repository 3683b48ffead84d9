"""Defenses on the outgoing update: magnitude pruning, gradient noise, weight DP (DLM)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from defenses import DefenseConfigError, get_defense
from defenses.noise import GradientNoise, draw_noise
from defenses.pruning import Prune, prune_tensor
from defenses.weight_dp import WeightDP, clip_rows
from fl import models
from fl.data import DatasetInfo, ImageData
from fl.simulation import ClientContext, FederationConfig, Simulator, observe_client_step
from tests._support.samples import sample_images


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Run single-threaded: on a shared 2-core machine intra-op threads oversubscribe the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def context(seed: int = 0, rnd: int = 0) -> ClientContext:
    """A client context whose generator is seeded with ``seed``."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return ClientContext(
        round=rnd,
        rounds=2,
        client=0,
        lr=0.1,
        device=torch.device("cpu"),
        generator=gen,
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
        kind="gradient",
    )


def random_update(seed: int = 0) -> dict[str, torch.Tensor]:
    """An update with a conv weight, a linear weight and a bias of distinct magnitudes."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(12, 3, 5, 5, generator=g),
        "fc.weight": torch.randn(10, 101, generator=g) * 3.0,
        "fc.bias": torch.randn(10, generator=g),
    }


# --- prune ------------------------------------------------------------------------------------


def test_prune_defaults_and_ranges() -> None:
    assert Prune.defaults() == {"percent": 60.0}
    spec = Prune.search_space["percent"]
    assert (spec.low, spec.high) == (10.0, 99.0)
    with pytest.raises(DefenseConfigError, match="percent"):
        get_defense("prune", percent=101)


@pytest.mark.parametrize("percent", [10.0, 60.0, 90.0])
def test_prune_zeroes_the_percent_smallest_entries_per_tensor(percent: float) -> None:
    update = random_update()
    out = get_defense("prune", percent=percent).process_update(update, context())
    for name, value in update.items():
        pruned = out[name]
        n = value.numel()
        zeros = int((pruned == 0).sum())
        # numpy.percentile's threshold, strictly-below rule (the Soteria code's)
        thresh = np.percentile(value.abs().numpy().ravel(), percent)
        assert zeros == int((value.abs().numpy() < thresh).sum())
        assert abs(zeros / n - percent / 100) <= 1.0 / n + 1e-9, (name, zeros, n)
        # the largest entries survive unchanged, the smallest are gone
        order = value.abs().flatten().argsort(descending=True)
        kept = order[: n - zeros]
        assert torch.equal(pruned.flatten()[kept], value.flatten()[kept])
        assert bool((pruned.flatten()[order[n - zeros :]] == 0).all())


def test_prune_tensor_edge_rates() -> None:
    value = torch.tensor([3.0, -1.0, 2.0, -4.0])
    assert torch.equal(prune_tensor(value, 0.0), value)
    assert torch.equal(prune_tensor(value, 100.0), torch.tensor([0.0, 0.0, 0.0, -4.0]))
    assert torch.equal(prune_tensor(value, 50.0), torch.tensor([3.0, 0.0, 0.0, -4.0]))


def test_prune_fedavg_message_is_global_plus_pruned_weight_change() -> None:
    torch.manual_seed(0)
    model = models.build("lenet", channels=3, classes=10, image_size=16)
    images, labels = sample_images(16, 4), torch.tensor([0, 1, 2, 3])
    kwargs = {"algorithm": "fedavg", "lr": 0.05, "local_steps": 3, "batch_size": 2}
    plain, _ = observe_client_step(model, images, labels, **kwargs)
    pruned, _ = observe_client_step(
        model, images, labels, hooks=get_defense("prune", percent=60.0), **kwargs
    )
    for name, start in plain.global_state.items():
        if name not in plain.message:
            continue
        delta = plain.message[name] - start
        expected = start + prune_tensor(delta, 60.0)
        torch.testing.assert_close(pruned.message[name], expected, rtol=0, atol=1e-6)
        unchanged = float((pruned.message[name] == start).float().mean())
        assert abs(unchanged - 0.6) <= 1.0 / start.numel() + 1e-9, (name, unchanged)


# --- gradient noise -----------------------------------------------------------------------------


def test_gradient_noise_defaults_and_ranges() -> None:
    assert GradientNoise.defaults() == {"scale": 1e-2, "distribution": "gaussian"}
    assert GradientNoise.search_space["scale"].log
    assert set(GradientNoise.search_space["distribution"].choices or ()) == {"gaussian", "laplace"}
    with pytest.raises(DefenseConfigError, match="distribution"):
        get_defense("gradient_noise", distribution="uniform")
    with pytest.raises(DefenseConfigError, match="scale"):
        get_defense("gradient_noise", scale=-1.0)


@pytest.mark.parametrize("distribution", ["gaussian", "laplace"])
def test_gradient_noise_has_the_stated_spread(distribution: str) -> None:
    scale = 0.05
    update = {"w": torch.ones(400, 500), "b": torch.zeros(300)}
    defense = get_defense("gradient_noise", scale=scale, distribution=distribution)
    out = defense.process_update(update, context(seed=3))
    noise = out["w"] - update["w"]
    assert out["b"].shape == (300,) and not torch.equal(out["b"], update["b"])
    assert abs(float(noise.mean())) < 0.02 * scale
    if distribution == "gaussian":
        assert float(noise.std()) == pytest.approx(scale, rel=0.02)
    else:
        assert float(noise.var()) == pytest.approx(2 * scale**2, rel=0.03)
        assert float(noise.abs().mean()) == pytest.approx(scale, rel=0.02)  # E|X| = b
        assert bool(torch.isfinite(noise).all())


def test_laplace_inverse_cdf_matches_the_laplace_distribution() -> None:
    sample = draw_noise(torch.zeros(200_000), 1.0, "laplace", torch.Generator().manual_seed(0))
    probs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    expected = -torch.sign(probs - 0.5) * torch.log(1 - 2 * (probs - 0.5).abs())
    torch.testing.assert_close(torch.quantile(sample, probs), expected, rtol=0, atol=0.03)


def test_gradient_noise_is_deterministic_per_generator_seed() -> None:
    update = random_update()
    defense = get_defense("gradient_noise", scale=0.1, distribution="laplace")
    a = defense.process_update(update, context(seed=5))
    b = defense.process_update(update, context(seed=5))
    c = defense.process_update(update, context(seed=6))
    for name in update:
        assert torch.equal(a[name], b[name])
        assert not torch.equal(a[name], c[name])


class _Recorder(GradientNoise):
    """GradientNoise that keeps the noise it added, per (round, client)."""

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.noise: dict[tuple[int, int], torch.Tensor] = {}

    def process_update(
        self, update: dict[str, torch.Tensor], ctx: ClientContext
    ) -> dict[str, torch.Tensor]:
        out = super().process_update(update, ctx)
        self.noise[(ctx.round, ctx.client)] = out["classifier.weight"] - update["classifier.weight"]
        return out


def _tiny_data() -> ImageData:
    images = (sample_images(8, 8) * 255).round().to(torch.uint8)
    info = DatasetInfo(
        name="tiny",
        channels=3,
        num_classes=4,
        class_names=("a", "b", "c", "d"),
        splits=("train",),
        native_size=8,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        description="test photographs",
    )
    labels = torch.arange(8) % 4
    return ImageData(images, labels, info, (0.5,) * 3, (0.25,) * 3, "train")


def test_gradient_noise_differs_across_rounds_and_repeats_across_runs() -> None:
    data = _tiny_data()
    cfg = FederationConfig(
        algorithm="fedsgd", clients=2, clients_per_round=2, rounds=2, batch_size=4, lr=0.1
    )

    def run(seed: int) -> dict[tuple[int, int], torch.Tensor]:
        torch.manual_seed(0)
        model = models.build("mlp", channels=3, classes=4, image_size=8)
        hooks = _Recorder(scale=0.1)
        Simulator(model, data, cfg, hooks=hooks, device="cpu", seed=seed).run()
        return hooks.noise

    first, again, other = run(0), run(0), run(1)
    assert set(first) == {(r, c) for r in range(2) for c in range(2)}
    for key in first:
        assert torch.equal(first[key], again[key])
        assert not torch.equal(first[key], other[key])
    assert not torch.equal(first[(0, 0)], first[(1, 0)])  # fresh noise each round
    assert not torch.equal(first[(0, 0)], first[(0, 1)])  # and each client


# --- weight DP (DLM) ----------------------------------------------------------------------------


def test_weight_dp_defaults_and_ranges() -> None:
    assert WeightDP.defaults() == {"clip": 0.2, "scale": 1e-3, "distribution": "laplace"}
    assert set(WeightDP.search_space) == {"clip", "scale"}
    with pytest.raises(DefenseConfigError, match="clip"):
        get_defense("weight_dp", clip=0.0)


def test_weight_dp_clips_every_row_without_noise() -> None:
    clip = 0.5
    update = random_update()
    update["fc.weight"][0] *= 1e-3  # a short row stays as it is
    out = get_defense("weight_dp", clip=clip, scale=0.0).process_update(update, context())
    for name, value in update.items():
        rows = out[name].reshape(value.shape[0], -1) if value.ndim > 1 else out[name][None]
        original = value.reshape(rows.shape)
        norms = rows.norm(dim=1)
        assert bool((norms <= clip * (1 + 1e-6)).all()), name
        long = original.norm(dim=1) > clip
        torch.testing.assert_close(norms[long], torch.full_like(norms[long], clip))
        # clipping only rescales: each row keeps its direction
        cos = torch.nn.functional.cosine_similarity(rows, original, dim=1)
        torch.testing.assert_close(cos, torch.ones_like(cos))
    torch.testing.assert_close(out["fc.weight"][0], update["fc.weight"][0])
    assert out["fc.bias"].norm() <= clip * (1 + 1e-6)  # the bias is one row


def test_weight_dp_adds_noise_after_clipping() -> None:
    update = {"w": torch.randn(300, 400, generator=torch.Generator().manual_seed(1))}
    scale = 0.01
    for distribution, variance in (("laplace", 2 * scale**2), ("gaussian", scale**2)):
        defense = get_defense("weight_dp", clip=0.2, scale=scale, distribution=distribution)
        out = defense.process_update(update, context(seed=2))
        noise = out["w"] - clip_rows(update["w"], 0.2)
        assert float(noise.var()) == pytest.approx(variance, rel=0.03)
        assert abs(float(noise.mean())) < 6 * math.sqrt(variance / noise.numel())


def test_clip_rows_views_conv_weights_per_output_channel() -> None:
    weight = torch.ones(4, 2, 3, 3)  # each output channel has norm sqrt(18)
    clipped = clip_rows(weight, 1.0)
    torch.testing.assert_close(clipped.reshape(4, -1).norm(dim=1), torch.ones(4))
    torch.testing.assert_close(clip_rows(torch.tensor(3.0), 1.0), torch.tensor(1.0))

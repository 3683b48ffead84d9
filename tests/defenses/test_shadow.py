"""Shadow defense (Jiang, Ma, Yang 2025, arXiv 2506.15711): maps, saliency, scale, momentum,
isolation from the client's model, and a run through the simulator on real data."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from defenses import DefenseConfigError, available_defenses, get_defense
from defenses.shadow import (
    InvertingGradientsShadow,
    ShadowDefense,
    equalize_histogram,
    saliency_mask,
    saliency_scores,
    saliency_weight,
    vulnerability_map,
)
from fl import data, models
from fl.simulation import (
    ClientContext,
    FederationConfig,
    PartitionConfig,
    Simulator,
    normalize,
    observe_client_step,
)
from tests._support.samples import sample_images

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def make_ctx(
    *,
    round_: int = 0,
    rounds: int = 4,
    client: int = 0,
    indices: list[int] | None = None,
    seed: int = 0,
) -> ClientContext:
    """A client context as the simulator builds it (CPU, generator seeded by ``seed``)."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return ClientContext(
        round=round_,
        rounds=rounds,
        client=client,
        lr=0.1,
        device=torch.device("cpu"),
        generator=gen,
        mean=MEAN,
        std=STD,
        kind="gradient",
        batch_indices=None if indices is None else torch.tensor(indices),
    )


class FixedErrorShadow:
    """A test shadow whose per-pixel error is a given (B, H, W) map (``x_hat = x + error``)."""

    def __init__(self, error: torch.Tensor) -> None:
        self.error = error

    def __call__(
        self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, ctx: ClientContext
    ) -> torch.Tensor:
        return images + self.error.unsqueeze(1)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run this module's small models on one intra-op thread.

    The shadow runs many tiny double-backward passes; on a busy 2-core machine torch's OpenMP
    pool then spends most of its time waiting (measured: the simulator test 57 s with 2 threads
    under load, 2 s with 1 thread). The previous setting is restored afterwards.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Four real 16 px RGB images."""
    return sample_images(16, 4)


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 3])


def lenet() -> models.SplitModel:
    torch.manual_seed(0)
    return models.build("lenet", channels=3, classes=10, image_size=16)


def convnet(width: int = 8) -> models.SplitModel:
    torch.manual_seed(0)
    return models.build("convnet", channels=3, classes=10, image_size=16, width=width)


def random_error(batch: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, size, size, generator=gen) * 0.5


# --------------------------------------------------------------------------- registration


def test_registered_with_paper_defaults_and_search_space() -> None:
    assert "shadow" in available_defenses()
    d = get_defense("shadow")
    assert isinstance(d, ShadowDefense)
    assert d.defaults() == {
        "scale": 0.19,
        "temperature": 20.0,
        "saliency_share": 0.3,
        "momentum": 0.9,
        "shadow": "inverting_gradients",
        "shadow_iterations": 50,
        "shadow_tv": 1e-4,
    }
    assert isinstance(d.shadow_model, InvertingGradientsShadow)
    space = ShadowDefense.search_space
    assert (space["scale"].low, space["scale"].high) == (0.05, 0.5)
    assert (space["temperature"].low, space["temperature"].high, space["temperature"].log) == (
        1.0,
        50.0,
        True,
    )
    assert (space["saliency_share"].low, space["saliency_share"].high) == (0.1, 0.5)
    sit = space["shadow_iterations"]
    assert (sit.type, sit.low, sit.high, sit.log) == ("int", 10, 200, True)
    with pytest.raises(DefenseConfigError):
        get_defense("shadow", temperature=0.0)
    with pytest.raises(DefenseConfigError):
        get_defense("shadow", shadow="stylegan3")


# --------------------------------------------------------------------------- vulnerability map


def test_equalize_histogram_is_monotone_rank_map_to_unit_range() -> None:
    values = torch.tensor([[3.0, 1.0, 2.0, 2.0, 10.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    out = equalize_histogram(values)
    assert out[0].min() == 0 and out[0].max() == 1
    assert out[0, 2] == out[0, 3]  # ties stay tied
    order = values[0].argsort()
    assert torch.all(out[0][order].diff() >= 0)
    assert torch.equal(out[1], torch.zeros(5))  # constant row


def test_map_is_largest_where_the_shadow_reconstructs_best() -> None:
    error = torch.full((1, 16, 16), 0.5)
    error[:, :8, :8] = 0.05  # the shadow reconstructs the top-left quadrant well
    n = vulnerability_map(error, temperature=20.0)
    assert torch.allclose(n.sum(dim=(1, 2)), torch.ones(1))  # a softmax over pixels
    assert n[:, :8, :8].min() > n[:, 8:, :].max()
    assert n[:, :8, :8].min() > n[:, :8, 8:].max()


@pytest.mark.parametrize("temperature", [1.0, 20.0, 50.0])
def test_map_is_monotone_in_inverse_error(temperature: float) -> None:
    error = random_error(batch=3)
    n = vulnerability_map(error, temperature)
    for e, m in zip(error, n, strict=True):
        order = (1.0 / e.flatten()).argsort()  # increasing 1/r
        assert torch.all(m.flatten()[order].diff() >= 0)
        assert m.flatten()[order[-1]] > m.flatten()[order[0]]


def test_noise_tracks_the_inverting_gradients_shadow_end_to_end(
    images: torch.Tensor, labels: torch.Tensor
) -> None:
    """With the real IG shadow on real images: more noise where the shadow's error is small."""
    defense = get_defense("shadow", shadow_iterations=40)
    maps = defense.perturbation(images, labels, lenet(), make_ctx())
    assert maps.error.std() > 0.01  # the shadow's error genuinely varies over pixels
    for err, noise, sal in zip(maps.error, maps.noise.abs(), maps.saliency, strict=True):
        keep = sal.flatten() == 0  # away from the saliency term, noise depends on error only
        e, n = err.flatten()[keep].numpy(), noise.flatten()[keep].numpy()
        rho = spearmanr(e, n).statistic
        assert rho < -0.95, rho
        q1, q3 = np.quantile(e, [0.25, 0.75])
        assert n[e <= q1].mean() > n[e >= q3].mean()
    # over all pixels too (the saliency term only lowers some of them)
    all_rho = [
        spearmanr(err.flatten().numpy(), noise.flatten().numpy()).statistic
        for err, noise in zip(maps.error, maps.noise.abs(), strict=True)
    ]
    assert max(all_rho) < 0, all_rho


# --------------------------------------------------------------------------- saliency


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("builder", ["lenet", "convnet", "mlp"])
def test_saliency_mask_has_the_requested_share(
    builder: str, share: float, images: torch.Tensor, labels: torch.Tensor
) -> None:
    torch.manual_seed(0)
    opts = {"width": 8} if builder == "convnet" else {}
    model = models.build(builder, channels=3, classes=10, image_size=16, **opts)
    scores = saliency_scores(model, images, labels, make_ctx())
    assert scores.shape == (4, 16, 16)
    assert torch.all(scores.flatten(1).std(dim=1) > 0)  # a real map, not a constant
    mask = saliency_mask(scores, share)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(mask.sum(dim=(1, 2)) == round(share * 256))
    # the mask marks the highest scores
    for s, m in zip(scores, mask, strict=True):
        assert s[m == 1].min() >= s[m == 0].max()


def test_grad_cam_uses_the_last_conv_and_the_true_label(images: torch.Tensor) -> None:
    """Grad-CAM at the last Conv2d of ``features`` for the given (true) labels."""
    model = convnet()
    ctx = make_ctx()
    y = torch.tensor([0, 1, 2, 3])
    got = saliency_scores(model, images, y, ctx)
    other = saliency_scores(model, images, torch.tensor([5, 6, 7, 8]), ctx)
    assert not torch.allclose(got, other)  # class-specific
    # an independent Grad-CAM computation with retain_grad on the last conv's output
    ref = copy.deepcopy(model).eval()
    last = [m for m in ref.features.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    acts: list[torch.Tensor] = []

    def keep(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
        out.retain_grad()
        acts.append(out)

    handle = last.register_forward_hook(keep)
    logits = ref(normalize(images, MEAN, STD))
    handle.remove()
    logits[torch.arange(4), y].sum().backward()
    a = acts[0]
    assert a.shape[-1] < 16  # a coarse grid, upsampled
    cam = (a.grad.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True)
    cam = torch.nn.functional.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(got, cam[:, 0].detach(), atol=1e-6)


def test_alpha_schedule() -> None:
    assert saliency_weight(0, 10) == pytest.approx(0.1)
    assert saliency_weight(1, 10) == pytest.approx(0.1)
    assert saliency_weight(3, 10) == pytest.approx(0.3)
    assert saliency_weight(5, 10) == pytest.approx(0.5)
    assert saliency_weight(9, 10) == pytest.approx(0.5)
    assert saliency_weight(0, 1) == pytest.approx(0.1)


@pytest.mark.parametrize("round_", [0, 2, 7])
def test_salient_pixels_get_less_noise(
    round_: int, images: torch.Tensor, labels: torch.Tensor
) -> None:
    error = random_error()
    model = convnet()
    with_sal = ShadowDefense(shadow_model=FixedErrorShadow(error))
    without = ShadowDefense(shadow_model=FixedErrorShadow(error), saliency_share=0.0)
    a = with_sal.perturbation(images, labels, model, make_ctx(round_=round_, rounds=10))
    b = without.perturbation(images, labels, model, make_ctx(round_=round_, rounds=10))
    alpha = saliency_weight(round_, 10)
    assert a.alpha == pytest.approx(alpha)
    assert torch.equal(a.vulnerability, b.vulnerability)
    sal = a.saliency == 1
    assert torch.allclose(a.noise_map[sal], (1 - alpha) * a.vulnerability[sal])
    assert torch.equal(a.noise_map[~sal], a.vulnerability[~sal])
    # after rescaling, the salient region's share of the noise drops
    for k in range(images.shape[0]):
        s = sal[k]
        ratio_with = a.noise[k][s].mean() / a.noise[k][~s].mean()
        ratio_without = b.noise[k][s].mean() / b.noise[k][~s].mean()
        assert ratio_with < ratio_without
        assert ratio_with / ratio_without == pytest.approx(1 - alpha, rel=1e-4)


# --------------------------------------------------------------------------- scale


@pytest.mark.parametrize(("round_", "rounds", "scale"), [(0, 5, 0.19), (3, 5, 0.19), (4, 4, 0.5)])
def test_noise_scale(
    round_: int, rounds: int, scale: float, images: torch.Tensor, labels: torch.Tensor
) -> None:
    x = images * torch.tensor([1.0, 0.5, 0.8, 0.3]).view(4, 1, 1, 1)  # different maxima
    defense = ShadowDefense(shadow_model=FixedErrorShadow(random_error()), scale=scale)
    ctx = make_ctx(round_=round_, rounds=rounds)
    out = defense.transform_batch(x, labels, lenet(), ctx)
    noise = out - x
    assert torch.allclose(noise, noise[:, :1].expand_as(noise), atol=1e-6)  # same on channels
    expected = scale * x.flatten(1).amax(dim=1) * math.exp(round_ / rounds)
    assert torch.allclose(noise.abs().flatten(1).amax(dim=1), expected, rtol=1e-5)
    assert torch.all(noise > 0)  # the map is positive; not clamped afterwards
    if round_ == rounds:
        assert out.max() > 1  # x_def is deliberately not clamped to [0, 1]


# --------------------------------------------------------------------------- momentum


def test_momentum_per_client_and_example(images: torch.Tensor, labels: torch.Tensor) -> None:
    err_a, err_b = random_error(seed=1), random_error(seed=2)
    shadow = FixedErrorShadow(err_a)
    defense = ShadowDefense(shadow_model=shadow)
    model = lenet()
    first = defense.perturbation(images, labels, model, make_ctx(indices=[3, 7, 9, 11]))
    assert torch.equal(first.vulnerability, first.fresh)  # nothing to blend with yet
    assert torch.equal(defense.previous_map(0, 7), first.vulnerability[1])
    assert defense.previous_map(1, 7) is None

    shadow.error = err_b
    ctx = make_ctx(round_=1, indices=[7, 3, 20, 21])  # two seen examples, in another order
    second = defense.perturbation(images, labels, model, ctx)
    fresh_b = vulnerability_map(err_b, 20.0)
    assert torch.allclose(second.fresh, fresh_b)
    assert torch.allclose(second.vulnerability[0], 0.9 * first.vulnerability[1] + 0.1 * fresh_b[0])
    assert torch.allclose(second.vulnerability[1], 0.9 * first.vulnerability[0] + 0.1 * fresh_b[1])
    assert torch.equal(second.vulnerability[2:], fresh_b[2:])  # new examples: fresh maps
    assert torch.equal(defense.previous_map(0, 7), second.vulnerability[0])

    other = defense.perturbation(
        images, labels, model, make_ctx(round_=1, client=1, indices=[7, 3, 20, 21])
    )
    assert torch.equal(other.vulnerability, other.fresh)  # clients do not share state

    no_index = defense.perturbation(images, labels, model, make_ctx(round_=2))
    assert torch.equal(no_index.vulnerability, no_index.fresh)


def test_bad_shadow_output_is_an_error(images: torch.Tensor, labels: torch.Tensor) -> None:
    defense = ShadowDefense(shadow_model=FixedErrorShadow(random_error(batch=2)))
    with pytest.raises(RuntimeError):
        defense.transform_batch(images, labels, lenet(), make_ctx())

    def wrong_shape(model, x, y, ctx):  # type: ignore[no-untyped-def]
        return x[:, :1]

    with pytest.raises(ValueError, match="shadow model returned shape"):
        ShadowDefense(shadow_model=wrong_shape).transform_batch(images, labels, lenet(), make_ctx())


# --------------------------------------------------------------------------- isolation


def test_model_untouched_shape_and_determinism(images: torch.Tensor, labels: torch.Tensor) -> None:
    model = convnet()  # with BatchNorm, in training mode
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    out_a = get_defense("shadow", shadow_iterations=10).transform_batch(
        images, labels, model, make_ctx(seed=5, indices=[0, 1, 2, 3])
    )
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert out_a.shape == images.shape
    assert not torch.equal(out_a, images)
    out_b = get_defense("shadow", shadow_iterations=10).transform_batch(
        images, labels, model, make_ctx(seed=5, indices=[0, 1, 2, 3])
    )
    assert torch.equal(out_a, out_b)


def test_observe_client_step_keeps_originals_as_truth(
    images: torch.Tensor, labels: torch.Tensor
) -> None:
    defense = get_defense("shadow", shadow_iterations=10)
    obs, truth = observe_client_step(
        lenet(), images, labels, hooks=defense, mean=MEAN, std=STD, reveal_labels=True
    )
    assert torch.equal(truth.images, images)
    assert truth.trained_images is not None
    assert truth.trained_images.shape == images.shape
    added = truth.trained_images - truth.images
    assert torch.all(added > 0)
    expected = 0.19 * images.flatten(1).amax(dim=1)  # round 0 of 1: exp(0) = 1
    assert torch.allclose(added.flatten(1).amax(dim=1), expected, rtol=1e-5)
    assert obs.kind == "gradient"


# --------------------------------------------------------------------------- simulation


def test_fedavg_run_on_real_pneumonia(shared_dir: Path) -> None:
    root = shared_dir / "data"
    train = data.load("pneumoniamnist", root=root, split="train").subset(range(200))
    test = data.load("pneumoniamnist", root=root, split="test").subset(range(100))
    torch.manual_seed(0)
    model = models.build("convnet", channels=1, classes=2, image_size=28, width=4)
    cfg = FederationConfig(
        algorithm="fedavg",
        clients=2,
        clients_per_round=2,
        rounds=2,
        batch_size=8,
        lr=0.01,
        partition=PartitionConfig(max_per_client=16),
    )
    defense = get_defense("shadow", shadow_iterations=5)
    result = Simulator(model, train, cfg, test=test, hooks=defense, device="cpu", seed=0).run()
    assert len(result.history) == 2
    assert all(math.isfinite(r.train_loss) for r in result.history)
    assert result.final_metrics
    # every client example has a momentum map after two rounds
    for client in range(2):
        for pos in range(16):
            kept = defense.previous_map(client, pos)  # type: ignore[attr-defined]
            assert kept is not None and kept.shape == (28, 28)

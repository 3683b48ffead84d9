"""Learning to obscure data (Wan et al., arXiv 2206.00769): the per-client generator defense."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attacks import get_attack
from attacks.scoring.metrics import score
from defenses import DefenseConfigError, get_defense
from defenses.obscure import Obscure, ObscureGenerator
from fl import data, models
from fl.simulation import (
    CaptureConfig,
    ClientContext,
    FederationConfig,
    PartitionConfig,
    Simulator,
    normalize,
    observe_client_step,
)
from tests._support.samples import sample_images


@pytest.fixture(scope="module")
def pneumonia(shared_dir: Path) -> data.ImageData:
    """The first 400 images of the real PneumoniaMNIST training split."""
    train = data.load("pneumoniamnist", root=shared_dir / "data", split="train")
    return train.subset(range(400))


def make_ctx(
    client: int = 0,
    seed: int = 0,
    mean: tuple[float, ...] = (0.0, 0.0, 0.0),
    std: tuple[float, ...] = (1.0, 1.0, 1.0),
) -> ClientContext:
    gen = torch.Generator().manual_seed(seed)
    return ClientContext(
        round=0,
        rounds=1,
        client=client,
        lr=0.1,
        device=torch.device("cpu"),
        generator=gen,
        mean=mean,
        std=std,
        kind="gradient",
    )


def pretrained_mlp(train: data.ImageData, steps: int = 60) -> models.SplitModel:
    """An MLP briefly trained on ``train`` so its predictions carry information."""
    torch.manual_seed(0)
    model = models.build("mlp", channels=1, classes=2, image_size=28)
    x, y = normalize(train.float_images(), train.mean, train.std), train.labels
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rng = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=rng)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


def test_registered_with_defaults_and_search_space() -> None:
    d = get_defense("obscure")
    assert isinstance(d, Obscure)
    assert d.defaults() == {
        "feature_weight": 1.0,
        "distinct_weight": 1.0,
        "margin": 0.05,
        "width": 16,
        "steps": 5,
        "generator_lr": 1e-3,
        "enforce_margin": True,
        "residual": True,
    }
    assert set(d.search_space) == {"feature_weight", "distinct_weight", "margin", "width", "steps"}
    assert d.search_space["width"].choices == (8, 16, 32)
    with pytest.raises(DefenseConfigError):
        get_defense("obscure", steps=0)


@pytest.mark.parametrize(("channels", "size"), [(3, 16), (1, 28), (3, 15)])
def test_generated_images_have_the_input_shape_and_lie_in_01(channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = models.build("lenet", channels=channels, classes=10, image_size=size)
    images = sample_images(size, 4, channels=channels)
    out = Obscure(steps=2).transform_batch(
        images, torch.arange(4), model, make_ctx(mean=(0.5,) * channels, std=(0.25,) * channels)
    )
    assert out.shape == images.shape and out.dtype == images.dtype
    assert not out.requires_grad
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert ObscureGenerator(channels, 8)(images).shape == images.shape


def test_trained_generator_obscures_yet_keeps_predictions(pneumonia: data.ImageData) -> None:
    model = pretrained_mlp(pneumonia)
    mean, std = pneumonia.mean, pneumonia.std
    images, labels = pneumonia.float_images(), pneumonia.labels
    # The default weights: the distinctness hinge is normalised by the margin (Eq. 1c), so it
    # holds the generator away from the identity against the O(1) task and feature terms.
    d = Obscure(steps=10)
    ctx = make_ctx(mean=mean, std=std)
    first: list[float] = []
    for b in range(10):  # ten client batches of 32 real images
        x, y = images[32 * b : 32 * (b + 1)], labels[32 * b : 32 * (b + 1)]
        d.transform_batch(x, y, model, ctx)
        first.append(d.last_losses[0][0])
        assert d.last_losses[0][-1] < d.last_losses[0][0]  # each batch's training lowers Eq. 1
    x, y = images[320:], labels[320:]  # 80 real images the generator has not seen
    out = d.transform_batch(x, y, model, ctx)  # what the client releases (projection included)
    with torch.no_grad():
        acc = float((model(normalize(out, mean, std)).argmax(1) == y).float().mean())
    mse = (out - x).pow(2).flatten(1).mean(1)
    assert float(mse.min()) > d.params.margin / 2, mse.min()
    majority = float(np.bincount(y.numpy()).max() / len(y))
    assert acc > majority + 0.1, (acc, majority)


def test_model_parameters_buffers_and_modes_are_untouched() -> None:
    torch.manual_seed(0)
    model = models.build("convnet", channels=3, classes=10, image_size=16, width=8)  # BatchNorm
    model.train()
    model.features.norm0.eval()  # a mixed mode must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    out = Obscure(steps=3).transform_batch(sample_images(16, 4), torch.arange(4), model, make_ctx())
    assert out.shape == (4, 3, 16, 16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


def test_per_client_generators_are_separate_and_deterministic() -> None:
    torch.manual_seed(0)
    model = models.build("lenet", channels=3, classes=10, image_size=16)
    images, labels = sample_images(16, 4), torch.arange(4)

    def run(seed: int) -> tuple[Obscure, torch.Tensor, torch.Tensor]:
        d = Obscure(steps=2)
        a = d.transform_batch(images, labels, model, make_ctx(client=0, seed=seed))
        b = d.transform_batch(images, labels, model, make_ctx(client=1, seed=seed))
        return d, a, b

    d1, a1, b1 = run(0)
    _, a2, b2 = run(0)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert set(d1.generators) == {0, 1} and d1.generators[0] is not d1.generators[1]
    assert not torch.equal(a1, b1)
    _, a3, _ = run(1)
    assert not torch.equal(a1, a3)
    # A client's generator persists (and keeps training) across its batches.
    gen0 = d1.generators[0]
    d1.transform_batch(images, labels, model, make_ctx(client=0, seed=5))
    assert d1.generators[0] is gen0


def test_observation_keeps_the_originals_and_records_the_obscured_images() -> None:
    torch.manual_seed(0)
    model = models.build("lenet", channels=3, classes=10, image_size=16)
    images, labels = sample_images(16, 2), torch.tensor([3, 7])
    obs, truth = observe_client_step(model, images, labels, hooks=Obscure())
    assert torch.equal(truth.images, images)
    assert truth.trained_images is not None and truth.trained_images.shape == images.shape
    assert float((truth.trained_images - images).pow(2).mean()) > 0.01
    # The message is the gradient at the obscured images, not at the originals.
    params = list(model.parameters())
    grad = torch.autograd.grad(F.cross_entropy(model(truth.trained_images), labels), params)
    for (name, p), g in zip(model.named_parameters(), grad, strict=True):
        assert torch.allclose(obs.message[name], g, rtol=1e-4, atol=1e-6), name
        assert p.shape == g.shape


def test_two_round_fedavg_run_on_real_pneumonia(pneumonia: data.ImageData) -> None:
    torch.manual_seed(0)
    model = models.build("convnet", channels=1, classes=2, image_size=28, width=8)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FederationConfig(
        algorithm="fedavg",
        clients=4,
        clients_per_round=2,
        rounds=2,
        batch_size=25,
        lr=0.05,
        partition=PartitionConfig(scheme="iid"),
    )
    defense = Obscure(steps=2)
    sim = Simulator(
        model, pneumonia, cfg, hooks=defense, capture=CaptureConfig(rounds=[1]), device="cpu"
    )
    result = sim.run()
    assert all(np.isfinite(r.train_loss) for r in result.history)
    assert any(not torch.equal(start[k], v) for k, v in result.model.state_dict().items())
    sampled = {c for r in result.history for c in r.clients}
    assert set(defense.generators) == sampled
    (_, truth), *_ = result.captures
    assert truth.trained_images is not None
    assert truth.trained_images.shape == truth.images.shape
    assert float((truth.trained_images - truth.images).pow(2).mean()) > 0.01


def test_idlg_reconstructs_the_obscured_image_not_the_original() -> None:
    image, label = sample_images(16, 1), torch.tensor([3])
    psnr: dict[str, float] = {}
    for name, hooks in (("none", None), ("obscure", Obscure())):
        torch.manual_seed(0)
        model = models.build("lenet", channels=3, classes=10, image_size=16)
        obs, truth = observe_client_step(model, image, label, hooks=hooks)
        rec = get_attack("idlg", iterations=50, seed=0).run(obs)
        psnr[name] = score(rec, truth, lpips=False)["psnr_mean"]
        if hooks is not None:
            assert truth.trained_images is not None
            obscured = score(rec, _Batch(truth.trained_images, label), lpips=False)
            psnr["vs_obscured"] = obscured["psnr_mean"]
    assert psnr["none"] > 30.0, psnr  # the attack works without the defense
    assert psnr["vs_obscured"] > 30.0, psnr  # ... and recovers what the client trained on
    assert psnr["obscure"] < 16.0, psnr  # ... which is far from the private image
    assert psnr["none"] - psnr["obscure"] > 15.0, psnr


class _Batch:
    """Images and labels in the shape :func:`attacks.scoring.metrics.score` expects."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

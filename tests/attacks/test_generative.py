"""GIAS (Jeon et al. 2021) with a DCGAN trained on public data, on small real cases: 16 px chest
X-rays (PneumoniaMNIST test victims, the attacker's public images from the training split)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from attacks import AttackerResources, PublicData, ThreatModelError, get_attack
from attacks.generative.params import GeneratorParams
from attacks.scoring.metrics import psnr
from fl import data, models
from fl.simulation.simulator import observe_client_step

SIZE = 16
#: A cheap generator and search: enough to exercise both phases on two cores.
CHEAP = {
    "iterations": 20,
    "latent_restarts": 2,
    "finetune_iterations": 20,
    "generator": {"epochs": 6, "width": 16, "minibatch": 32},
}


@pytest.fixture(scope="module")
def xrays(shared_dir: Path) -> dict[str, Any]:
    root = shared_dir / "data"
    train = data.load("pneumoniamnist", root=root, split="train", image_size=SIZE)
    test = data.load("pneumoniamnist", root=root, split="test", image_size=SIZE)
    public = PublicData.from_tensors(
        train.float_images(slice(0, 1500)), train.labels[:1500], "1500 train images"
    )
    torch.manual_seed(0)
    model = models.build("convnet", channels=1, classes=2, image_size=SIZE, width=8)
    return {"train": train, "test": test, "public": public, "model": model}


def _observe(xrays: dict[str, Any], first: int, batch: int, **step: Any) -> Any:
    idx = list(range(first, first + batch))
    test, train = xrays["test"], xrays["train"]
    obs, _ = observe_client_step(
        xrays["model"],
        test.float_images(idx),
        test.labels[idx].long(),
        mean=train.mean,
        std=train.std,
        **step,
    )
    return obs


def test_gias_without_public_data_or_of_another_shape_is_refused(xrays: dict[str, Any]) -> None:
    obs = _observe(xrays, 0, 1)
    with pytest.raises(ThreatModelError, match="public_data"):
        get_attack("gias", **CHEAP).run(obs)
    wrong = PublicData.from_tensors(torch.rand(8, 1, 8, 8), torch.zeros(8))
    with pytest.raises(ThreatModelError, match="shape"):
        get_attack("gias", **CHEAP).run(obs, resources=AttackerResources(public=wrong))


@pytest.fixture(scope="module")
def gias(xrays: dict[str, Any]) -> Any:
    """One GIAS instance for the module: its generator is trained once (cached per attack)."""
    return get_attack("gias", **CHEAP)


@pytest.mark.parametrize("step", [{}, {"algorithm": "fedavg", "lr": 0.01, "local_steps": 2}])
def test_gias_fine_tuning_lowers_the_matching_loss(
    xrays: dict[str, Any], gias: Any, step: dict[str, Any]
) -> None:
    """On a gradient and on a FedAvg update (unrolled), at batch 2: images in [0, 1], and
    fine-tuning the generator copies keeps the lowest matching loss it reaches, below the
    latent search's."""
    resources = AttackerResources(public=xrays["public"])
    recs = [gias.run(_observe(xrays, first, 2, **step), resources=resources) for first in (0, 37)]
    for rec in recs:
        images = rec.images
        assert images.shape == (2, 1, SIZE, SIZE)
        assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
        assert rec.loss <= rec.extras["latent_loss"]  # the lowest-loss iterate is kept
    assert any(rec.loss < rec.extras["latent_loss"] for rec in recs)  # and it moved
    assert recs[1].extras["generator_seconds"] == 0  # one generator for every victim


def test_the_generator_learns_the_public_images(xrays: dict[str, Any], gias: Any) -> None:
    """Six epochs on 1,500 X-rays: samples differ from each other and average close to the
    public mean image (flat grey, a DCGAN at initialisation, is 17.9 dB from it; about 31 dB
    measured)."""
    images = xrays["public"].images
    params = GeneratorParams(**CHEAP["generator"])  # type: ignore[arg-type]
    trained, _ = gias.cache.get(images, params, 0, torch.device("cpu"))
    with torch.no_grad():
        samples = trained.generator(
            torch.randn(256, 100, generator=torch.Generator().manual_seed(1))
        )
    assert samples.shape == (256, 1, SIZE, SIZE)
    assert float(samples.min()) >= 0.0 and float(samples.max()) <= 1.0
    mean = images.mean(0)
    assert psnr(samples.mean(0), mean) > 25.0
    assert float(samples.std(0).mean()) > 0.05  # not one image for every code
    assert trained.seconds > 0 and len(trained.generator_loss) == params.epochs

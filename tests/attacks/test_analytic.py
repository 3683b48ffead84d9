"""The analytic attack (x = dW_i / db_i through a fully connected first layer) on real images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks import AttackerCapabilities, ThreatModelError, available_attacks, get_attack
from attacks.scoring.metrics import score
from fl import models
from fl.models.base import SplitModel
from fl.simulation import observe_client_step


def mlp(seed: int = 0, hidden: int = 64) -> SplitModel:
    torch.manual_seed(seed)
    return models.build("mlp", channels=3, classes=10, image_size=16, hidden=[hidden])


def psnrs(rec, truth) -> list[float]:
    return [p["psnr"] for p in score(rec, truth, lpips=False)["per_image"]]


def test_exact_at_batch_one_from_a_gradient(real_images_16) -> None:
    obs, truth = observe_client_step(mlp(), real_images_16[:1], torch.tensor([3]))
    rec = get_attack("analytic").run(obs)
    assert "analytic" in available_attacks()
    assert psnrs(rec, truth)[0] >= 60.0
    assert rec.iterations == 0 and not rec.diverged
    assert rec.extras["repeated_clusters"] == 1.0  # every active row gives the same image
    assert rec.seconds < 5.0


def test_exact_from_a_one_step_fedavg_update_without_the_learning_rate(real_images_16) -> None:
    image, label = real_images_16[2:3], torch.tensor([5])
    obs, truth = observe_client_step(mlp(1), image, label, algorithm="fedavg", lr=0.05)
    hidden_lr = AttackerCapabilities(knows_lr=False)
    rec = get_attack("analytic").run(obs, hidden_lr)
    assert psnrs(rec, truth)[0] >= 60.0


def test_exact_after_several_local_steps_without_the_lr_or_the_step_count(real_images_16) -> None:
    """K plain-SGD steps on one image: every row's update is a sum of that image's delta x
    terms, so the ratio is still the image, with the steps and the rate hidden."""
    image, label = real_images_16[4:5], torch.tensor([2])
    obs, truth = observe_client_step(
        mlp(2), image, label, algorithm="fedavg", lr=0.05, local_steps=3
    )
    blind = AttackerCapabilities(knows_lr=False, knows_local_steps=False)
    assert psnrs(get_attack("analytic").run(obs, blind), truth)[0] >= 60.0


def test_two_local_steps_over_two_batches_still_give_some_images(real_images_16) -> None:
    """Two steps of batch 2 over four distinct images: rows one image alone activates in both
    steps give it exactly; with a wide first layer most images have such rows."""
    images, labels = real_images_16[:4], torch.arange(4)
    obs, truth = observe_client_step(
        mlp(3, hidden=512), images, labels, algorithm="fedavg", local_steps=2, batch_size=2
    )
    got = psnrs(get_attack("analytic").run(obs), truth)
    assert sum(p >= 40.0 for p in got) >= 2, got


def test_refuses_a_convnet_and_a_first_linear_without_bias(real_images_16) -> None:
    torch.manual_seed(0)
    convnet = models.build("convnet", channels=3, classes=10, image_size=16, width=4)
    obs, _ = observe_client_step(convnet, real_images_16[:1], torch.tensor([1]))
    with pytest.raises(ThreatModelError, match=r"fully connected first layer.*Conv2d"):
        get_attack("analytic").run(obs)
    features = nn.Sequential(nn.Flatten(), nn.Linear(768, 32, bias=False), nn.ReLU())
    no_bias = SplitModel(features, nn.Linear(32, 10), in_channels=3, image_size=16)
    obs, _ = observe_client_step(no_bias, real_images_16[:1], torch.tensor([1]))
    with pytest.raises(ThreatModelError, match=r"has no bias"):
        get_attack("analytic").run(obs)


@pytest.mark.parametrize(("batch", "seed"), [(2, 0), (3, 1), (4, 2), (4, 3)])
def test_recovers_at_least_one_image_of_a_small_batch(real_images_16, batch, seed) -> None:
    """Measured on 8 seeds at widths 64 and 128: the best image of a batch of 2-4 is always
    >= 68 dB (most are exact); 40 dB is the floor."""
    images = real_images_16[4 * seed : 4 * seed + batch]
    obs, truth = observe_client_step(mlp(seed, hidden=128), images, torch.arange(batch))
    rec = get_attack("analytic").run(obs)
    assert rec.images.shape == images.shape
    assert max(psnrs(rec, truth)) >= 40.0


def test_images_do_not_depend_on_the_labels_and_labels_are_inferred(real_images_16) -> None:
    """The attack sees only the observation: without labels granted it infers them, and the
    images are the same whether labels are granted or not."""
    images, labels = real_images_16[8:11], torch.tensor([2, 7, 9])
    obs, _ = observe_client_step(mlp(4, hidden=128), images, labels, reveal_labels=True)
    blind = get_attack("analytic").run(obs)
    told = get_attack("analytic").run(obs, AttackerCapabilities(knows_labels=True))
    assert blind.label_source == "inferred" and told.label_source == "known"
    assert torch.equal(blind.images, told.images)
    assert torch.equal(told.labels, labels)

"""Registering and averaging reconstructions of one batch, and the mean of an attack's restarts."""

from __future__ import annotations

import pytest
import torch

from attacks import AttackerCapabilities, get_attack
from attacks._machinery.convolution import exact_convolutions
from attacks.base import local_rng, restart_generator
from attacks.priors.consensus import registered_mean, registration
from fl import models
from fl.simulation import denormalize, observe_client_step

MEAN, STD = (0.45, 0.42, 0.4), (0.25, 0.25, 0.25)


def test_registration_undoes_a_permutation_and_keeps_labels_apart(
    real_images_16: torch.Tensor,
) -> None:
    images = real_images_16[:4]
    order = [2, 0, 3, 1]
    shuffled = images[order]
    assert [order[i] for i in registration(images, shuffled)] == [0, 1, 2, 3]
    # two near-identical images told apart only by their labels
    twins = torch.stack([images[0], images[0] + 1e-3])
    labels = torch.tensor([4, 7])
    assert registration(twins, twins, labels, labels.flip(0)) == [1, 0]
    assert torch.allclose(registered_mean([images, shuffled, images.flip(0)]), images)


def test_registered_mean_refuses_mismatched_members(real_images_16: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="different shapes"):
        registered_mean([real_images_16[:2], real_images_16[:3]])
    with pytest.raises(ValueError, match="at least one"):
        registered_mean([])


def test_restart_average_returns_the_registered_mean_of_noisy_restarts(
    real_images_16: torch.Tensor,
) -> None:
    torch.manual_seed(0)
    model = models.build("convnet", channels=3, classes=10, image_size=16, width=4)
    obs, _ = observe_client_step(
        model, real_images_16[:2], torch.tensor([1, 5]), mean=MEAN, std=STD
    )
    granted = AttackerCapabilities(knows_labels=True, knows_bn_stats=True)
    params = {"iterations": 10, "tv": 0.2, "init": "mean", "bn_prior": 0.3, "init_noise": 0.25}
    attack = get_attack("inverting_gradients", restarts=3, restart_average=True, **params)
    rec = attack.run(obs, granted)
    seen = attack.restricted(obs, granted)
    with local_rng(seen.device), exact_convolutions(attack.params.exact_convolutions):
        tries = [attack.attempt(seen, restart_generator(seen.device, 0, r), r) for r in range(3)]
    best = min(range(3), key=lambda r: tries[r].loss)
    order = [best] + [r for r in range(3) if r != best]
    mean = registered_mean([tries[r].inputs for r in order], [tries[r].labels for r in order])
    expected = denormalize(mean, MEAN, STD).clamp(0, 1)
    assert torch.allclose(rec.images, expected, atol=1e-6)
    assert rec.extras["restarts_averaged"] == 3.0 and rec.loss == tries[best].loss
    # the noise starts every restart but the first elsewhere; restart 0 is the plain run
    single = get_attack("inverting_gradients", restarts=1, **params).run(obs, granted)
    assert torch.equal(single.images, denormalize(tries[0].inputs, MEAN, STD).clamp(0, 1))
    assert (tries[1].inputs - tries[0].inputs).abs().max() > 1e-3

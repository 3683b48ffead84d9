"""The classifier's input recovered from the last layer's update, and the feature prior."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attacks.priors.features import feature_prior, feature_targets
from fl import models
from fl.simulation import normalize, observe_client_step

MEAN, STD = (0.45, 0.42, 0.4), (0.25, 0.25, 0.25)


def convnet(classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build("convnet", channels=3, classes=classes, image_size=16, width=4)


def true_sums(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per label present (sorted), the sum of its images' features in a train-mode forward."""
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        h = ref.forward_features(normalize(images, MEAN, STD))
    return torch.stack([h[labels == c].sum(dim=0) for c in torch.unique(labels)])


def relative_errors(got: torch.Tensor, want: torch.Tensor) -> list[float]:
    return [float((g - w).norm() / w.norm()) for g, w in zip(got, want, strict=True)]


@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_batch_one_features_are_exact(real_images_16: torch.Tensor, algorithm: str) -> None:
    model = convnet()
    images, labels = real_images_16[:1], torch.tensor([4])
    obs, _ = observe_client_step(
        model, images, labels, algorithm=algorithm, local_steps=1, mean=MEAN, std=STD
    )
    present, sums = feature_targets(obs, labels)
    assert present.tolist() == [4]
    assert max(relative_errors(sums, true_sums(model, images, labels))) < 1e-4


def test_batch_feature_sums_per_label(real_images_16: torch.Tensor) -> None:
    """Four images, three labels (two share one), ten classes: each label's feature sum."""
    model = convnet()
    images, labels = real_images_16[:4], torch.tensor([3, 0, 7, 0])
    obs, _ = observe_client_step(model, images, labels, mean=MEAN, std=STD)
    present, sums = feature_targets(obs, labels)
    assert present.tolist() == [0, 3, 7]
    errors = relative_errors(sums, true_sums(model, images, labels))
    # the shared label is taken at its mean's posterior: a few per cent (measured 2 %)
    assert max(errors) < 0.1, errors


def test_undetermined_sums_leave_the_prior_off(real_images_16: torch.Tensor) -> None:
    """Two classes, both present: the rows p - e_c are parallel, only a difference is known."""
    model = convnet(classes=2)
    images, labels = real_images_16[:4], torch.tensor([0, 1, 0, 0])
    obs, _ = observe_client_step(model, images, labels, mean=MEAN, std=STD)
    present, _ = feature_targets(obs, labels)
    assert present.numel() == 0
    prior = feature_prior(obs, obs.model, labels, 1.0)
    assert prior.loss() == 0.0


def test_prior_is_zero_at_the_truth_and_large_elsewhere(real_images_16: torch.Tensor) -> None:
    model = convnet()
    images, labels = real_images_16[:4], torch.tensor([1, 2, 5, 8])
    obs, _ = observe_client_step(model, images, labels, mean=MEAN, std=STD)
    prior = feature_prior(obs, obs.model, labels, 1.0)

    def value(x: torch.Tensor) -> float:
        with torch.no_grad(), prior.recording():
            obs.model(normalize(x, MEAN, STD))
            return float(prior.loss())

    at_truth, elsewhere = value(images), value(real_images_16[8:12])
    assert at_truth < 1e-3 and elsewhere > 100 * at_truth, (at_truth, elsewhere)


def test_prior_needs_fixed_labels(real_images_16: torch.Tensor) -> None:
    obs, _ = observe_client_step(
        convnet(), real_images_16[:1], torch.tensor([1]), mean=MEAN, std=STD
    )
    with pytest.raises(ValueError, match="fixed labels"):
        feature_prior(obs, obs.model, None, 1.0)


def test_one_label_batch_of_two_classes_gives_the_batch_sum(real_images_16: torch.Tensor) -> None:
    """A FedAvg step on a two-class model whose batch has one label: one group, determined."""
    model = convnet(classes=2)
    images, labels = real_images_16[:4], torch.tensor([1, 1, 1, 1])
    obs, _ = observe_client_step(
        model, images, labels, algorithm="fedavg", local_steps=1, mean=MEAN, std=STD
    )
    present, sums = feature_targets(obs, labels)
    assert present.tolist() == [1]
    # four images at their mean's posterior: a few per cent (measured 5 %)
    assert max(relative_errors(sums, true_sums(model, images, labels))) < 0.15

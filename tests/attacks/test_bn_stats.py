"""BatchNorm statistics from the buffers a client returns, and the attacks that match them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attacks import AttackerCapabilities, ThreatModelError, get_attack
from attacks._machinery.matching import unrolled_update
from attacks._machinery.setup import InversionSetup
from attacks.priors.bn_stats import BatchNormRecorder, batchnorm_targets, step_batch_sizes
from attacks.scoring.metrics import score
from fl import models
from fl.simulation import normalize, observe_client_step

MEAN, STD = (0.45, 0.42, 0.4), (0.25, 0.25, 0.25)
GRANTED = AttackerCapabilities(knows_labels=True, knows_bn_stats=True)


def convnet(width: int = 4, size: int = 16, seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return models.build("convnet", channels=3, classes=classes, image_size=size, width=width)


def batch_statistics(model: nn.Module, inputs: torch.Tensor) -> dict[str, tuple]:
    """Each BatchNorm layer's batch mean and biased variance in one train-mode forward of a
    copy of ``model`` (what the layer normalised with)."""
    ref = copy.deepcopy(model).train()
    seen: dict[str, tuple] = {}
    for name, m in ref.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(
                lambda _m, a, n=name: seen.__setitem__(
                    n, (a[0].mean((0, 2, 3)), a[0].var((0, 2, 3), unbiased=False))
                )
            )
    with torch.no_grad():
        ref(inputs)
    return seen


@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_buffers_give_the_batch_statistics_of_one_local_step(
    real_images_16: torch.Tensor, algorithm: str
) -> None:
    model = convnet()
    images, labels = real_images_16[:3], torch.tensor([1, 2, 3])
    obs, _ = observe_client_step(
        model, images, labels, algorithm=algorithm, local_steps=1, mean=MEAN, std=STD
    )
    targets = batchnorm_targets(obs)
    truth = batch_statistics(model, normalize(images, MEAN, STD))
    assert set(targets) == set(truth) and len(truth) == 8
    for name, (mean, var) in truth.items():
        assert targets[name].exact
        # float32 rounding of the buffers, amplified by 1 / momentum = 10 in the subtraction
        scale = 1e-5 * (1 + var.abs().max())
        assert torch.allclose(targets[name].mean, mean, atol=scale), name
        assert torch.allclose(targets[name].batch_var, var, atol=scale), name


@pytest.mark.parametrize("momentum", [0.1, None])
def test_several_local_steps_give_the_mixture_the_unrolled_steps_reproduce(
    real_images_16: torch.Tensor, momentum: float | None
) -> None:
    """Over K local steps the buffers mix the steps' statistics; replaying the client's SGD on
    its own images must reproduce that mixture (prior ~ 0), other images must not."""
    model = convnet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    images, labels = real_images_16[:4], torch.tensor([0, 1, 2, 3])
    obs, _ = observe_client_step(
        model, images, labels, algorithm="fedavg", lr=0.05, local_steps=3, batch_size=2,
        mean=MEAN, std=STD,
    )  # fmt: skip
    targets = batchnorm_targets(obs)
    assert step_batch_sizes(4, 2, 3) == [2, 2, 2]
    assert not targets["features.norm0"].exact
    assert abs(sum(targets["features.norm0"].weights) - 1) < 1e-12
    setup = InversionSetup.from_observation(obs)
    recorder = BatchNormRecorder(setup.model, targets)

    def prior(x: torch.Tensor) -> float:
        with recorder.recording():
            unrolled_update(setup, x, labels, 0.05, 3, 2)
        return float(recorder.loss().detach())

    own = prior(normalize(images, MEAN, STD))
    other = prior(normalize(real_images_16[4:8], MEAN, STD))
    assert own < 1e-4 and other > 1000 * own


def test_relative_distance_is_zero_on_the_target_and_free_of_the_layers_scale(
    real_images_16: torch.Tensor,
) -> None:
    """The relative prior scores the client's own batch ~0 and another batch > 0; scaling the
    first layer's weights (and so its statistics) leaves the relative score of a layer as it was,
    while the absolute one moves with the scale."""
    images, labels = real_images_16[:1], torch.tensor([1])

    def scores(scale: float) -> tuple[float, float, float]:
        model = convnet()
        with torch.no_grad():
            model.features.conv0.weight.mul_(scale)
            model.features.conv0.bias.mul_(scale)
        obs, _ = observe_client_step(model, images, labels, mean=MEAN, std=STD)
        setup = InversionSetup.from_observation(obs)
        recorder = BatchNormRecorder(setup.model, batchnorm_targets(obs))
        out = []
        for x, relative in (
            (images, True),
            (real_images_16[5:6], True),
            (real_images_16[5:6], False),
        ):
            with recorder.recording():
                setup.model(normalize(x, MEAN, STD))
            out.append(float(recorder.loss(10.0, relative=relative).detach()))
        return out[0], out[1], out[2]

    own, other, absolute = scores(1.0)
    _, other_scaled, absolute_scaled = scores(8.0)
    assert own < 1e-3 * other
    assert abs(other_scaled - other) < 0.05 * other
    assert absolute_scaled > 2 * absolute


def test_bn_prior_needs_the_statistics_and_a_batchnorm_model(real_images_16: torch.Tensor) -> None:
    images, labels = real_images_16[:1], torch.tensor([3])
    obs, _ = observe_client_step(convnet(), images, labels, mean=MEAN, std=STD)
    for name, params in [
        ("see_through_gradients", {}),
        ("inverting_gradients", {"bn_prior": 0.1}),
    ]:
        with pytest.raises(ThreatModelError, match="knows_bn_stats=True"):
            get_attack(name, iterations=1, **params).run(obs, AttackerCapabilities())
    torch.manual_seed(0)
    lenet = models.build("lenet", channels=3, classes=10, image_size=16)
    obs, _ = observe_client_step(lenet, images, labels)
    with pytest.raises(ThreatModelError, match="no BatchNorm layer"):
        get_attack("see_through_gradients", iterations=1).run(obs, GRANTED)
    # without the prior, Inverting Gradients needs no statistics
    get_attack("inverting_gradients", iterations=1).run(obs, AttackerCapabilities())


def test_soterias_own_forward_leaves_one_update_of_the_buffers(
    real_images_16: torch.Tensor,
) -> None:
    """A defense that computes the gradient itself: the step's buffers still reveal exactly
    the batch statistics (the loss logged after it must not update them again)."""
    from defenses import get_defense

    model = convnet()
    images, labels = real_images_16[:2], torch.tensor([4, 5])
    obs, _ = observe_client_step(
        model, images, labels, hooks=get_defense("soteria", percent=40.0), mean=MEAN, std=STD
    )
    targets = batchnorm_targets(obs)
    for name, (mean, _var) in batch_statistics(model, normalize(images, MEAN, STD)).items():
        assert torch.allclose(targets[name].mean, mean, atol=1e-5), name


def test_batchnorm_statistics_improve_inverting_gradients_at_equal_iterations(
    real_images_16: torch.Tensor,
) -> None:
    """The brightness a train-mode BatchNorm hides from the gradient, put back from the
    buffers: on every image a little (measured +0.5 to +2.7 dB on six images, mean +1.6 dB,
    width 8, 200 iterations), on average clearly."""
    gains = []
    for i in range(4):
        torch.manual_seed(i)
        model = models.build("convnet", channels=3, classes=10, image_size=16, width=8)
        obs, truth = observe_client_step(
            model, real_images_16[i : i + 1], torch.tensor([i]), mean=MEAN, std=STD
        )
        psnr = {}
        for key, params in {"ig": {}, "bn": {"bn_project": True}}.items():
            attack = get_attack("inverting_gradients", iterations=200, tv=0.2, **params)
            psnr[key] = score(attack.run(obs, GRANTED), truth, lpips=False)["psnr_mean"]
        gains.append(psnr["bn"] - psnr["ig"])
    assert sum(gains) / len(gains) >= 0.5, gains


@pytest.mark.parametrize(
    ("algorithm", "params"),
    [("fedsgd", {"group_size": 2, "group_every": 5}), ("fedavg", {"objective": "cosine"})],
)
def test_see_through_gradients_runs_on_both_messages(
    real_images_16: torch.Tensor, algorithm: str, params: dict
) -> None:
    images, labels = real_images_16[:2], torch.tensor([2, 7])
    batch = 1 if algorithm == "fedavg" else None  # FedAvg: two steps of one image each
    obs, truth = observe_client_step(
        convnet(), images, labels, algorithm=algorithm, lr=0.05, local_steps=2,
        batch_size=batch, mean=MEAN, std=STD,
    )  # fmt: skip
    attack = get_attack("see_through_gradients", iterations=30, warmup=5, bn_project=True, **params)
    rec = attack.run(obs, AttackerCapabilities(knows_bn_stats=True))
    assert rec.images.shape == images.shape and rec.iterations == 30 and not rec.diverged
    assert rec.label_source == "inferred" and sorted(rec.labels.tolist()) == [2, 7]
    s = score(rec, truth, lpips=False)
    assert s["psnr_mean"] > 5.0

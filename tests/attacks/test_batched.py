"""Batched Inverting Gradients: V victims in one optimisation equal V separate ``attack.run``.

The whole-run comparisons run in float64. In float32 the batched kernels sum in another order
than separate runs, and signed Adam turns that rounding into other trajectories wherever it
flips the sign of a near-zero gradient component: seen here with AVX2 kernels, 206 pixels of a
BatchNorm ConvNet victim off by up to 1.2e-3 after 20 iterations, and none with AVX-512 ones.
In float64 the rounding is ~1e-16 relative, so a flip needs a gradient component within about
1e-13 of zero; none occurs in these runs on any CPU we tried (both give identical images),
while a real fault (victims, labels, targets or BatchNorm statistics mixed up) changes pixels
by 1e-2 or more within the first steps. Hence ``atol=1e-9`` below.
"""

from __future__ import annotations

import math

import pytest
import torch

from attacks import AttackerCapabilities, Reconstruction, get_attack
from attacks._machinery.optim import run_signed_adam, run_signed_adam_batched
from attacks.inverting_gradients import batching_obstacle
from fl import models
from fl.simulation import observe_client_step
from fl.simulation.observation import Observation

GRANTED = AttackerCapabilities(knows_labels=True)  # victim 0's labels are revealed


def _victims(
    images: torch.Tensor, arch: str, seeds: list[int], **step: object
) -> list[Observation]:
    """One client step of two real images per seed; the seed draws the model's weights (equal
    seeds: clients of one round, different seeds: other rounds). Victim 0's labels are
    granted, the others' are inferred by the attack."""
    out = []
    images = images.to(torch.get_default_dtype())
    for v, seed in enumerate(seeds):
        torch.manual_seed(seed)
        opts = {"width": 8} if arch == "convnet" else {}
        model = models.build(arch, channels=3, classes=10, image_size=16, **opts)
        labels = torch.tensor([v, 5 + v])
        obs, _ = observe_client_step(
            model, images[2 * v : 2 * v + 2], labels, reveal_labels=v == 0, **step
        )
        out.append(obs)
    return out


def _assert_same(batched: list[Reconstruction], separate: list[Reconstruction]) -> None:
    """Equal up to float64 rounding (see the module docstring): images to 1e-9, the final
    loss 1 - cos to 1e-9 (relative or absolute), labels and step counts exactly."""
    assert len(batched) == len(separate)
    for b, s in zip(batched, separate, strict=True):
        assert b.images.dtype == s.images.dtype == torch.float64
        diff = float((b.images - s.images).abs().max())
        assert torch.allclose(b.images, s.images, rtol=0, atol=1e-9), diff
        assert b.labels is not None and s.labels is not None
        assert torch.equal(b.labels, s.labels)
        assert (b.label_source, b.iterations, b.diverged) == (
            s.label_source,
            s.iterations,
            s.diverged,
        )
        assert math.isclose(b.loss, s.loss, rel_tol=1e-9, abs_tol=1e-9), (b.loss, s.loss)
        assert b.restart_losses == [b.loss]


def test_lenet_victims_with_different_weights_match_separate_runs(
    real_images_16, float64: None
) -> None:
    victims = _victims(real_images_16, "lenet", seeds=[0, 1, 2])
    attack = get_attack("inverting_gradients", iterations=50, seed=3)
    assert batching_obstacle(attack, victims) is None
    separate = [attack.run(o, GRANTED) for o in victims]
    batched = attack.run_many(victims, GRANTED, batched=True)
    assert [r.label_source for r in batched] == ["known", "inferred", "inferred"]
    _assert_same(batched, separate)


def test_a_diverging_victim_stops_alone_as_in_its_separate_run(
    real_images_16, float64: None
) -> None:
    victims = _victims(real_images_16, "lenet", seeds=[0, 1, 2])
    broken = {k: g * math.inf for k, g in victims[1].message.items()}
    victims[1] = victims[1].replace(message=broken)
    attack = get_attack("inverting_gradients", iterations=20, seed=0)
    separate = [attack.run(o, GRANTED) for o in victims]
    batched = attack.run_many(victims, GRANTED, batched=True)
    assert [r.diverged for r in batched] == [False, True, False]
    _assert_same(batched, separate)


@pytest.mark.parametrize("seeds", [[0, 0, 0], [0, 1, 0]], ids=["one-round", "two-rounds"])
def test_batchnorm_convnet_victims_match_separate_runs(
    real_images_16, float64: None, seeds
) -> None:
    victims = _victims(real_images_16[6:], "convnet", seeds=seeds)
    attack = get_attack("inverting_gradients", iterations=50, seed=1)
    assert batching_obstacle(attack, victims) is None
    separate = [attack.run(o, GRANTED) for o in victims]
    buffers = [{k: b.clone() for k, b in o.model.named_buffers()} for o in victims]
    batched = attack.run_many(victims, GRANTED, batched=True)
    _assert_same(batched, separate)
    for obs, before in zip(victims, buffers, strict=True):  # running stats left alone
        assert all(torch.equal(b, before[k]) for k, b in obs.model.named_buffers())


def test_unsupported_victims_fall_back_to_separate_runs(real_images_16) -> None:
    victims = _victims(real_images_16, "lenet", seeds=[0, 1], algorithm="fedavg", lr=0.1)
    attack = get_attack("inverting_gradients", iterations=5, seed=0)
    assert batching_obstacle(attack, victims) == "not a FedSGD gradient observation"
    separate = [attack.run(o, GRANTED) for o in victims]
    batched = attack.run_many(victims, GRANTED, batched=True)
    for b, s in zip(batched, separate, strict=True):
        assert torch.equal(b.images, s.images) and b.loss == s.loss
    gradients = _victims(real_images_16, "lenet", seeds=[0, 1])
    for params, reason in [
        ({"restarts": 2}, "more than one restart"),
        ({"labels": "soft"}, "optimised soft labels"),
    ]:
        assert batching_obstacle(get_attack("inverting_gradients", **params), gradients) == reason
    assert batching_obstacle(get_attack("dlg"), gradients) is not None
    assert batching_obstacle(attack, gradients[:1]) == "fewer than two victims"


def test_batched_signed_adam_freezes_a_diverging_victim_like_a_separate_run() -> None:
    centres = torch.tensor([0.3, -0.2, 0.1]).view(3, 1, 1, 1)
    start = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    lower, upper = torch.full((1, 1, 1), -0.5), torch.full((1, 1, 1), 0.5)

    def loss_of(x: torch.Tensor, v: int, calls: int) -> torch.Tensor:
        poison = math.nan if v == 1 and calls >= 4 else 0.0  # victim 1 blows up at step 4
        return ((x - centres[v]) ** 2).sum() + torch.abs(x).sum() * 0.1 + poison

    expected = []
    for v in range(3):
        x = start[v].clone().requires_grad_(True)
        calls = [0]

        def one(x: torch.Tensor = x, v: int = v, calls: list[int] = calls) -> torch.Tensor:
            calls[0] += 1
            return loss_of(x, v, calls[0] - 1)

        result = run_signed_adam(x, one, iterations=8, lr=0.1, lower=lower, upper=upper)
        expected.append((x.detach(), *result))

    xs = start.clone().requires_grad_(True)
    calls = [0]

    def every() -> torch.Tensor:
        calls[0] += 1
        return torch.stack([loss_of(xs[v], v, calls[0] - 1) for v in range(3)])

    losses, steps, diverged = run_signed_adam_batched(
        xs, every, iterations=8, lr=0.1, lower=lower, upper=upper
    )
    assert steps == [8, 4, 8] and diverged == [False, True, False]
    for v, (x, loss, step, div) in enumerate(expected):
        assert torch.allclose(xs[v].detach(), x, rtol=0, atol=1e-6)
        assert (steps[v], diverged[v]) == (step, div)
        assert math.isclose(losses[v], loss, rel_tol=1e-6)

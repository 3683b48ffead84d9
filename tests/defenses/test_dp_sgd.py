"""DP-SGD (Abadi et al. 2016): per-example gradients, clipping, noise, RDP accounting, and a run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from defenses import DefenseConfigError, get_defense
from defenses.dp_sgd import DPSGD, per_example_gradients
from fl import data, models
from fl.simulation import ClientContext, FederationConfig, PartitionConfig, Simulator
from tests._support.samples import sample_images


def make_ctx(client: int = 0, seed: int = 0, client_size: int | None = None) -> ClientContext:
    """A client context on the CPU with a seeded generator (and ``client_size`` if given)."""
    gen = torch.Generator().manual_seed(seed)
    ctx = ClientContext(
        round=0,
        rounds=1,
        client=client,
        lr=0.1,
        device=torch.device("cpu"),
        generator=gen,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        kind="gradient",
    )
    if client_size is not None:
        ctx.extras["client_size"] = client_size
    return ctx


def lenet(seed: int = 0) -> models.SplitModel:
    torch.manual_seed(seed)
    return models.build("lenet", channels=3, classes=10, image_size=16)


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real 16 px RGB images and labels."""
    return sample_images(16, n), torch.arange(n) % 10


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def test_registered_with_defaults_and_search_space() -> None:
    d = get_defense("dp_sgd")
    assert isinstance(d, DPSGD)
    assert d.defaults() == {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    assert set(d.search_space) == {"noise_multiplier", "max_grad_norm"}
    assert d.search_space["noise_multiplier"].log and d.search_space["max_grad_norm"].log
    for bad in ({"noise_multiplier": 0.0}, {"max_grad_norm": -1.0}, {"delta": 1.0}):
        with pytest.raises(DefenseConfigError):
            get_defense("dp_sgd", **bad)


@pytest.mark.parametrize("name", ["lenet", "mlp", "convnet"])
def test_per_example_gradients_equal_a_loop_of_single_example_gradients(name: str) -> None:
    torch.manual_seed(0)
    opts = {"norm": "group", "groups": 4, "width": 8} if name == "convnet" else {}
    model = models.build(name, channels=3, classes=10, image_size=16, **opts)
    x, y = batch(5)
    per_ex = per_example_gradients(model, x, y)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(per_ex) == list(params)
    for i in range(5):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        ref = torch.autograd.grad(loss, list(params.values()))
        for (n, g), r in zip(per_ex.items(), ref, strict=True):
            assert torch.allclose(g[i], r, rtol=1e-4, atol=1e-5 * float(r.abs().max())), n


def test_negligible_noise_and_huge_clip_give_the_batch_mean_gradient() -> None:
    model = lenet()
    x, y = batch(8)
    d = DPSGD(noise_multiplier=1e-10, max_grad_norm=1e4)
    got = d.compute_gradients(model, x, y, make_ctx())
    ref = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert list(got) == [n for n, _ in model.named_parameters()]
    for (n, g), r in zip(got.items(), ref, strict=True):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6), n


def test_tiny_clip_bounds_each_contribution() -> None:
    model = lenet()
    x, y = batch(8)
    per_ex = per_example_gradients(model, x, y)
    raw = torch.stack([flat({k: v[i] for k, v in per_ex.items()}).norm() for i in range(8)])
    clip = 1e-3
    assert bool((raw > clip).all())  # the clip is active for every example
    d = DPSGD(noise_multiplier=1e-10, max_grad_norm=clip)
    got = flat(d.compute_gradients(model, x, y, make_ctx()))
    assert float(got.norm()) <= clip * (1 + 1e-4)
    # Every example clipped to exactly C: the mean of the clipped (unit-direction) gradients.
    units = [flat({k: v[i] for k, v in per_ex.items()}) / raw[i] * clip for i in range(8)]
    assert torch.allclose(got, torch.stack(units).mean(0), rtol=1e-3, atol=1e-9)


def test_noise_std_is_sigma_c_over_batch() -> None:
    model = lenet()
    x, y = batch(8)
    sigma, clip = 2.0, 0.5
    noisy = flat(
        DPSGD(noise_multiplier=sigma, max_grad_norm=clip).compute_gradients(
            model, x, y, make_ctx(seed=1)
        )
    )
    clean = flat(
        DPSGD(noise_multiplier=1e-10, max_grad_norm=clip).compute_gradients(
            model, x, y, make_ctx(seed=1)
        )
    )
    noise = noisy - clean
    expected = sigma * clip / 8
    assert noise.numel() > 5000
    assert abs(float(noise.std()) / expected - 1) < 0.05, (float(noise.std()), expected)
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(noise.numel())
    # deterministic for the same generator seed, different for another
    again = flat(
        DPSGD(noise_multiplier=sigma, max_grad_norm=clip).compute_gradients(
            model, x, y, make_ctx(seed=1)
        )
    )
    other = flat(
        DPSGD(noise_multiplier=sigma, max_grad_norm=clip).compute_gradients(
            model, x, y, make_ctx(seed=2)
        )
    )
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)


def run_steps(d: DPSGD, steps: int, client: int = 0, n: int | None = 64) -> None:
    model = lenet()
    x, y = batch(8)
    for s in range(steps):
        d.compute_gradients(model, x, y, make_ctx(client=client, seed=s, client_size=n))


def test_epsilon_matches_opacus_and_behaves() -> None:
    sigma, delta, steps, q = 1.1, 1e-5, 4, 8 / 64
    d = DPSGD(noise_multiplier=sigma, delta=delta)
    assert d.epsilon() is None
    run_steps(d, steps)
    eps = d.epsilon()
    assert eps is not None and math.isfinite(eps) and eps > 0
    # Reference 1: a fresh Opacus RDPAccountant fed the same history.
    ref = RDPAccountant()
    for _ in range(steps):
        ref.step(noise_multiplier=sigma, sample_rate=q)
    assert eps == pytest.approx(ref.get_epsilon(delta=delta), rel=1e-12)
    # Reference 2: Opacus's RDP analysis functions directly.
    alphas = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=alphas)
    eps_ref, _ = rdp_analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)
    assert eps == pytest.approx(float(eps_ref), rel=1e-9)
    # Grows with steps; shrinks with the noise multiplier; shrinks with a looser delta.
    more = DPSGD(noise_multiplier=sigma, delta=delta)
    run_steps(more, 2 * steps)
    noisier = DPSGD(noise_multiplier=3 * sigma, delta=delta)
    run_steps(noisier, steps)
    assert more.epsilon() > eps > noisier.epsilon()  # type: ignore[operator]
    assert d.epsilon(1e-3) < eps  # type: ignore[operator]


def test_epsilon_is_the_worst_client_and_unknown_size_means_full_batch() -> None:
    d = DPSGD(noise_multiplier=1.0)
    run_steps(d, 1, client=0)
    run_steps(d, 3, client=1)
    assert set(d.accountants) == {0, 1}
    assert d.accountants[1].history == [(1.0, 8 / 64, 3)]
    single = DPSGD(noise_multiplier=1.0)
    run_steps(single, 3, client=1)
    assert d.epsilon() == pytest.approx(single.epsilon())
    full = DPSGD(noise_multiplier=1.0)
    run_steps(full, 3, n=None)
    assert full.accountants[0].history == [(1.0, 1.0, 3)]
    assert full.epsilon() > d.epsilon()  # type: ignore[operator]


def test_batchnorm_and_auxiliary_losses_are_rejected() -> None:
    bn = models.build("convnet", channels=1, classes=2, image_size=16, width=8)
    with pytest.raises(ValueError, match=r"BatchNorm.*norm='group'"):
        DPSGD().prepare_model(bn)
    gn = models.build(
        "convnet", channels=1, classes=2, image_size=16, width=8, norm="group", groups=4
    )
    assert DPSGD().prepare_model(gn) is gn

    class KLBottleneck(torch.nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return z

        def auxiliary_loss(self) -> torch.Tensor:
            return torch.zeros(())

    gn.bottleneck = KLBottleneck()
    with pytest.raises(ValueError, match="auxiliary loss"):
        DPSGD().prepare_model(gn)


def test_two_round_fedavg_run_on_real_pneumonia(shared_dir: Path) -> None:
    train = data.load("pneumoniamnist", root=shared_dir / "data", split="train").subset(range(400))
    torch.manual_seed(0)
    model = models.build(
        "convnet", channels=1, classes=2, image_size=28, norm="group", groups=4, width=8
    )
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
    defense = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)
    result = Simulator(model, train, cfg, hooks=defense, device="cpu", seed=0).run()
    assert len(result.history) == 2
    assert all(np.isfinite(r.train_loss) for r in result.history)
    changed = any(not torch.equal(start[k], v) for k, v in result.model.state_dict().items())
    assert changed
    eps = defense.epsilon()
    assert eps is not None and math.isfinite(eps) and eps > 0
    # 100 examples per client, batches of 25: q = 0.25, 4 steps per round sampled.
    sampled = [c for r in result.history for c in r.clients]
    for client, acc in defense.accountants.items():
        steps = 4 * sampled.count(client)
        assert acc.history == [(1.0, 0.25, steps)], (client, acc.history)

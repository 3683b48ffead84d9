"""Learned attacks on public data (Wu et al. 2023), on small real cases: 16 px chest X-rays.

Victims are PneumoniaMNIST test images; the attacker's public images come from the training
split (disjoint); the reference (mean image, identification pool) from the rest of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from attacks import (
    AttackerCapabilities,
    AttackerResources,
    PublicData,
    PublicDataError,
    PublicDataSpec,
    ThreatModelError,
    get_attack,
    load_public_data,
)
from attacks.learned.simulate import SURROGATE_CLIENT
from attacks.scoring.metrics import score
from attacks.scoring.population import Reference
from defenses import BUILTIN_DEFENSES, Defense, DefenseParams, get_defense
from fl import data, models
from fl.simulation import FederationConfig, Simulator
from fl.simulation.hooks import ClientContext
from fl.simulation.simulator import observe_client_step

SIZE = 16
VICTIMS = 8
#: A small, fast inverter: enough to learn 16 px X-rays' classifier inputs on two cores.
FAST = {"examples": 1200, "epochs": 25, "hidden": 256, "depth": 1}
SKETCHED = {**FAST, "sketch": 512}


@pytest.fixture(scope="module")
def xrays(shared_dir: Path) -> dict[str, Any]:
    root = shared_dir / "data"
    train = data.load("pneumoniamnist", root=root, split="train", image_size=SIZE)
    test = data.load("pneumoniamnist", root=root, split="test", image_size=SIZE)
    public = PublicData.from_tensors(
        train.float_images(slice(0, 1500)), train.labels[:1500], "1500 train images"
    )
    reference = Reference.from_images(train.images[1500:], pool_size=256)
    torch.manual_seed(0)
    model = models.build("convnet", channels=1, classes=2, image_size=SIZE, width=8)
    return {"train": train, "test": test, "public": public, "ref": reference, "model": model}


def _observe(xrays: dict[str, Any], victim: int, batch: int = 1) -> tuple[Any, Any]:
    idx = list(range(victim * 37, victim * 37 + batch))
    test, train = xrays["test"], xrays["train"]
    return observe_client_step(
        xrays["model"],
        test.float_images(idx),
        test.labels[idx].long(),
        mean=train.mean,
        std=train.std,
    )


def _gains(xrays: dict[str, Any], attack: Any, resources: AttackerResources) -> list[float]:
    gains = []
    for v in range(VICTIMS):
        obs, truth = _observe(xrays, v)
        rec = attack.run(obs, AttackerCapabilities(), resources)
        s = score(rec, truth, lpips=False, reference=xrays["ref"])
        gains.append(float(s["prior_gain_mean"]))
    return gains


def test_a_learned_attack_without_public_data_is_refused(xrays) -> None:
    obs, _ = _observe(xrays, 0)
    with pytest.raises(ThreatModelError, match="public_data"):
        get_attack("learned_inversion", **SKETCHED).run(obs)
    with pytest.raises(ThreatModelError, match="public_data"):
        get_attack("inverting_gradients", init="learned", iterations=2).run(obs)


def test_the_prior_only_ablation_cannot_beat_the_mean_image(xrays) -> None:
    """Trained on noise instead of the update, the inverter can learn only the average."""
    attack = get_attack("learned_inversion", ablation="prior_only", **SKETCHED)
    gains = _gains(xrays, attack, AttackerResources(public=xrays["public"]))
    assert np.mean(gains) < 0.5
    assert max(gains) < 1.5


def test_the_feature_decoder_beats_the_mean_image_at_batch_1(xrays) -> None:
    """LeNet's 192 classifier inputs, exact at batch 1, decode to far better than the average
    X-ray (about +9 dB measured here; the BatchNorm ConvNet: the slow test below)."""
    torch.manual_seed(0)
    lenet = models.build("lenet", channels=1, classes=2, image_size=SIZE)
    attack = get_attack("feature_inversion", **FAST)
    gains = _gains({**xrays, "model": lenet}, attack, AttackerResources(public=xrays["public"]))
    assert np.mean(gains) > 3.0, gains
    assert sum(g > 0 for g in gains) >= VICTIMS - 1, gains


@pytest.mark.slow
def test_the_feature_decoder_beats_the_mean_image_on_the_batchnorm_convnet(
    shared_dir: Path,
) -> None:
    """The issue's probe: ConvNet width 16, BatchNorm in train mode, 32 px, 4,000 public
    training images, FedSGD at batch 1 (+4.9 dB over 16 victims measured here)."""
    root = shared_dir / "data"
    train = data.load("pneumoniamnist", root=root, split="train", image_size=32)
    test = data.load("pneumoniamnist", root=root, split="test", image_size=32)
    public = PublicData.from_tensors(train.float_images(slice(0, 4000)), train.labels[:4000])
    torch.manual_seed(0)
    convnet = models.build("convnet", channels=1, classes=2, image_size=32, width=16)
    cases = {
        "train": train,
        "test": test,
        "model": convnet,
        "ref": Reference.from_images(train.images[4000:], pool_size=256),
    }
    gains = _gains(cases, get_attack("feature_inversion"), AttackerResources(public=public))
    assert np.mean(gains) > 2.0, gains


def test_feature_inversion_needs_a_last_linear_layer_with_bias(xrays) -> None:
    torch.manual_seed(0)
    model = models.build("mlp", channels=1, classes=2, image_size=SIZE)
    model.last_layer().bias = None  # type: ignore[operator]
    x = xrays["test"].float_images([0])
    obs, _ = observe_client_step(model, x, xrays["test"].labels[[0]].long())
    with pytest.raises(ThreatModelError, match="bias"):
        get_attack("feature_inversion", **FAST).run(
            obs, resources=AttackerResources(public=xrays["public"])
        )


class _RecordingParams(DefenseParams):
    pass


class _Recording(Defense[_RecordingParams]):
    """A defense that adds nothing but counts each hook call (shared across instances)."""

    Params = _RecordingParams
    calls: ClassVar[dict[str, int]] = {}

    def transform_batch(
        self, images: torch.Tensor, labels: torch.Tensor, model: Any, ctx: ClientContext
    ) -> torch.Tensor:
        self.calls["transform_batch"] = self.calls.get("transform_batch", 0) + 1
        assert ctx.client == SURROGATE_CLIENT  # the attacker's own client, never a real one
        return images

    def process_update(
        self, update: dict[str, torch.Tensor], ctx: ClientContext
    ) -> dict[str, torch.Tensor]:
        self.calls["process_update"] = self.calls.get("process_update", 0) + 1
        return update


@pytest.mark.parametrize("adaptive", [True, False])
def test_training_a_defended_inverter_runs_the_defense_hooks(xrays, adaptive: bool) -> None:
    _Recording.calls = {}
    resources = AttackerResources(public=xrays["public"], defense=_Recording, defense_name="rec")
    params = {**SKETCHED, "examples": 40, "epochs": 1, "adaptive": adaptive}
    obs, _ = _observe(xrays, 0)
    get_attack("learned_inversion", **params).run(obs, resources=resources)
    expected = 40 if adaptive else 0
    assert _Recording.calls.get("transform_batch", 0) == expected
    assert _Recording.calls.get("process_update", 0) == expected


def test_public_data_overlapping_a_client_is_refused_by_index(xrays, shared_dir: Path) -> None:
    train = xrays["train"]
    config = FederationConfig(clients=4, clients_per_round=1, rounds=1)
    config.partition.holdout = 0.25
    model = models.build("convnet", channels=1, classes=2, image_size=SIZE, width=4)
    sim = Simulator(model, train, config, device="cpu", seed=3)
    assert sim.holdout.size == round(0.25 * len(train))
    spec = PublicDataSpec(split="holdout", count=500)
    kwargs = {"dataset": "pneumoniamnist", "root": str(shared_dir / "data"), "seed": 3}
    public = load_public_data(
        spec, image_size=SIZE, holdout=sim.holdout, clients=sim.partition, **kwargs
    )
    assert len(public) == 500
    for part in sim.partition:  # no public image is any client's
        assert np.intersect1d(public.indices, part).size == 0
    leaky = [*sim.partition[:-1], np.append(sim.partition[-1], public.indices[7])]
    with pytest.raises(PublicDataError, match="overlaps client 3"):
        load_public_data(spec, image_size=SIZE, holdout=sim.holdout, clients=leaky, **kwargs)
    with pytest.raises(PublicDataError, match="clients' data"):
        load_public_data(PublicDataSpec(split="train"), image_size=SIZE, **kwargs)
    with pytest.raises(PublicDataError, match="holdout > 0"):
        load_public_data(spec, image_size=SIZE, holdout=None, **kwargs)


@pytest.mark.parametrize("defense", sorted(BUILTIN_DEFENSES))
def test_the_adaptive_attack_simulates_every_built_in_defense(xrays, defense: str) -> None:
    """Each built-in defense, at its defaults (the shadow attack shortened to 5 iterations),
    runs inside the attacker's simulated clients (a fresh instance: its own noise draws,
    generator or maps) on a model it accepts."""
    options = {"shadow_iterations": 5} if defense == "shadow" else {}
    torch.manual_seed(0)
    norm = "group" if defense == "dp_sgd" else "batch"  # DP-SGD refuses BatchNorm
    model = models.build(
        "convnet", channels=1, classes=2, image_size=SIZE, width=4, norm=norm, groups=2
    )
    test = xrays["test"]
    obs, _ = observe_client_step(
        model,
        test.float_images([0]),
        test.labels[[0]].long(),
        mean=xrays["train"].mean,
        std=xrays["train"].std,
        hooks=get_defense(defense, **options),
    )
    resources = AttackerResources(
        public=xrays["public"],
        defense=lambda: get_defense(defense, **options),
        defense_name=defense,
    )
    params = {**SKETCHED, "examples": 16, "epochs": 1}
    rec = get_attack("learned_inversion", **params).run(obs, resources=resources)
    assert rec.images.shape == (1, 1, SIZE, SIZE) and torch.isfinite(rec.images).all()


def test_a_fedavg_update_is_simulated_with_the_granted_steps(xrays) -> None:
    """Weights messages: the attacker runs the client's local SGD (lr and steps granted);
    without the learning rate the attack says what it lacks."""
    test, train = xrays["test"], xrays["train"]
    obs, _ = observe_client_step(
        xrays["model"],
        test.float_images([0, 37]),
        test.labels[[0, 37]].long(),
        algorithm="fedavg",
        lr=0.05,
        local_steps=2,
        batch_size=1,
        mean=train.mean,
        std=train.std,
    )
    resources = AttackerResources(public=xrays["public"])
    attack = get_attack("feature_inversion", **{**FAST, "examples": 32, "epochs": 1})
    rec = attack.run(obs, resources=resources)
    assert rec.images.shape == (2, 1, SIZE, SIZE)
    with pytest.raises(ThreatModelError, match="learning rate"):
        attack.run(obs, AttackerCapabilities(knows_lr=False), resources)

"""Every registered defense: valid search space, defaults, and a few FedAvg rounds that train."""

from __future__ import annotations

import math

import pytest
import torch

from defenses import (
    Defense,
    DefenseConfigError,
    ParamSpec,
    UnknownDefenseError,
    available_defenses,
    defense_class,
    get_defense,
)
from fl import data, models
from fl.simulation import CaptureConfig, FederationConfig, PartitionConfig, Simulator

EXPECTED = {
    "none",
    "obscure",
    "precode",
    "shadow",
    "dp_sgd",
    "gradient_noise",
    "prune",
    "soteria",
    "weight_dp",
}


def test_all_mission_and_baseline_defenses_are_registered() -> None:
    assert set(available_defenses()) >= EXPECTED
    with pytest.raises(UnknownDefenseError, match=r"known defenses: .*precode"):
        get_defense("nope")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_search_space_is_valid_and_contains_the_defaults(name: str) -> None:
    cls = defense_class(name)
    defaults = cls.defaults()
    for key, spec in cls.search_space.items():
        assert isinstance(spec, ParamSpec)
        assert key in defaults
        assert spec.contains(defaults[key]), (name, key, defaults[key], spec)
    if name != "none":
        assert cls.search_space, f"{name} declares no tunable hyperparameter"
    assert cls.__doc__ and len(cls.__doc__) > 80


def test_unknown_hyperparameter_names_the_field() -> None:
    with pytest.raises(DefenseConfigError, match="betta"):
        get_defense("precode", betta=1.0)


def test_param_spec_rejects_inverted_and_bad_log_ranges() -> None:
    with pytest.raises(ValueError, match="must not exceed"):
        ParamSpec(type="float", low=2.0, high=1.0)
    with pytest.raises(ValueError, match="low > 0"):
        ParamSpec(type="float", low=0.0, high=1.0, log=True)
    with pytest.raises(ValueError, match="choices"):
        ParamSpec(type="categorical")


@pytest.fixture(scope="module")
def tiny_pneumonia(shared_dir):
    root = shared_dir / "data"
    train = data.load("pneumoniamnist", root=root, split="train", image_size=16)
    test = data.load("pneumoniamnist", root=root, split="test", image_size=16)
    return train.subset(range(64)), test.subset(range(64))


def _fast(name: str) -> dict[str, object]:
    """Keep the expensive inner loops short in CI; every other value is the default."""
    return {"shadow": {"shadow_iterations": 3}, "obscure": {"steps": 1}}.get(name, {})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_default_configuration_trains_fedavg_rounds(name: str, tiny_pneumonia) -> None:
    train, test = tiny_pneumonia
    torch.manual_seed(0)
    model = models.build("mlp", channels=1, classes=2, image_size=16, hidden=(32,))
    defense: Defense = get_defense(name, **_fast(name))
    cfg = FederationConfig(
        algorithm="fedavg",
        clients=2,
        clients_per_round=2,
        rounds=2,
        batch_size=8,
        lr=0.05,
        partition=PartitionConfig(max_per_client=16),
    )
    sim = Simulator(
        model,
        train,
        cfg,
        test=test,
        hooks=defense,
        device="cpu",
        capture=CaptureConfig(rounds=[1], victims=1),
    )
    result = sim.run()
    assert len(result.history) == 2
    assert all(math.isfinite(r.train_loss) for r in result.history)
    assert result.final_metrics["accuracy"] is not None
    for p in result.model.parameters():
        assert torch.isfinite(p).all()
    ((_, truth),) = result.captures
    assert truth.images.shape[1:] == (1, 16, 16)
    eps = defense.epsilon(1e-5)
    if name == "dp_sgd":
        assert eps is not None and math.isfinite(eps) and eps > 0
    else:
        assert eps is None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_run_resumed_from_a_round_checkpoint_equals_the_uninterrupted_run(
    name: str, tiny_pneumonia, tmp_path
) -> None:
    """Round-level checkpoints (issue 7): stop after round 1, save the simulator's state to a
    file, load it with ``weights_only=True`` into a fresh model, defense and simulator (as a
    retried Ray Tune trial does), finish the run: every weight, loss, capture and the privacy
    accounting equal the run that was never interrupted."""
    train, test = tiny_pneumonia
    cfg = FederationConfig(
        algorithm="fedavg",
        clients=3,
        clients_per_round=2,
        rounds=3,
        batch_size=8,
        lr=0.05,
        partition=PartitionConfig(max_per_client=16),
    )

    def simulator() -> Simulator:
        torch.manual_seed(0)
        model = models.build("mlp", channels=1, classes=2, image_size=16, hidden=(32,))
        return Simulator(
            model,
            train,
            cfg,
            test=test,
            hooks=get_defense(name, **_fast(name)),
            device="cpu",
            capture=CaptureConfig(rounds=[0, 2], victims=1),
            seed=3,
        )

    whole = simulator()
    expected = whole.run()

    first = simulator()
    first.run_round()
    path = tmp_path / "state.pt"
    torch.save(first.state_dict(), path)
    del first
    resumed = simulator()
    torch.manual_seed(12345)  # a retried trial's process starts with another random state
    resumed.load_state_dict(torch.load(path, weights_only=True))
    got = resumed.run()

    for (k, a), b in zip(
        expected.model.state_dict().items(), got.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), (name, k)
    assert [r.train_loss for r in got.history] == [r.train_loss for r in expected.history]
    assert [r.metrics for r in got.history] == [r.metrics for r in expected.history]
    assert len(got.captures) == len(expected.captures) == 2
    for (obs_a, truth_a), (obs_b, truth_b) in zip(expected.captures, got.captures, strict=True):
        assert (obs_a.round, obs_a.client) == (obs_b.round, obs_b.client)
        for key, value in obs_a.message.items():
            assert torch.equal(value, obs_b.message[key]), (name, key)
        assert torch.equal(truth_a.images, truth_b.images)
        model_a, model_b = obs_a.model.state_dict(), obs_b.model.state_dict()
        assert model_a.keys() == model_b.keys()
        assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
        assert all(p.requires_grad for p in obs_b.model.parameters())
    assert whole.hooks.epsilon(1e-5) == resumed.hooks.epsilon(1e-5)


def test_a_checkpoint_from_another_version_is_refused(tiny_pneumonia) -> None:
    train, _ = tiny_pneumonia
    model = models.build("mlp", channels=1, classes=2, image_size=16, hidden=(8,))
    cfg = FederationConfig(clients=2, clients_per_round=2, rounds=1, batch_size=8)
    sim = Simulator(model, train, cfg, device="cpu")
    state = sim.state_dict()
    state["version"] = 0
    with pytest.raises(ValueError, match="version 0"):
        sim.load_state_dict(state)

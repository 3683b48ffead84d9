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

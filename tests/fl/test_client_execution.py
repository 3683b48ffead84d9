"""How sampled clients run: one after another, in threads (``parallel_clients``) or as one
vectorised model (``vectorize_clients``); the fast paths give the sequential loop's run."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from defenses import get_defense
from fl import models
from fl.simulation import (
    CaptureConfig,
    ClientHooks,
    FederationConfig,
    PartitionConfig,
    RunResult,
    Simulator,
)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Run the test's main thread with one torch thread (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(**changes: object) -> FederationConfig:
    base: dict[str, object] = dict(
        algorithm="fedavg",
        clients=4,
        clients_per_round=4,
        rounds=2,
        batch_size=8,
        lr=0.05,
        partition=PartitionConfig(scheme="iid"),
    )
    base.update(changes)
    return FederationConfig(**base)


def _run(
    train: object,
    test: object | None,
    cfg: FederationConfig,
    hooks: ClientHooks,
    dtype: torch.dtype = torch.float32,
) -> RunResult:
    torch.manual_seed(0)
    model = models.build("convnet", channels=1, classes=2, image_size=28, width=4).to(dtype)
    sim = Simulator(
        model,
        train,
        cfg,
        test=test,
        hooks=hooks,
        capture=CaptureConfig(rounds=[0, 1], victims=2),
        device="cpu",
        seed=3,
    )
    sim.train_images = sim.train_images.to(dtype)
    return sim.run()


def _assert_same_run(a: RunResult, b: RunResult, atol: float) -> None:
    for ra, rb in zip(a.history, b.history, strict=True):
        assert ra.clients == rb.clients
        assert rb.train_loss == pytest.approx(ra.train_loss, abs=atol)
    state_b = b.model.state_dict()
    for name, pa in a.model.state_dict().items():
        pb = state_b[name]
        assert torch.allclose(pa.float(), pb.float(), atol=atol, rtol=0), name
    assert len(a.captures) == len(b.captures) == 4
    for (oa, ta), (ob, tb) in zip(a.captures, b.captures, strict=True):
        assert (ta.round, ta.client) == (tb.round, tb.client)
        assert torch.equal(ta.images, tb.images) and torch.equal(ta.labels, tb.labels)
        for name, value in oa.message.items():
            assert torch.allclose(value, ob.message[name], atol=atol, rtol=0), name
        for name, value in oa.buffers.items():
            assert torch.allclose(value.float(), ob.buffers[name].float(), atol=atol), name


@pytest.mark.parametrize("defense", ["none", "gradient_noise"])
def test_parallel_clients_give_the_sequential_run(
    pneumonia_train, pneumonia_test, one_thread: None, defense: str
) -> None:
    """Two client threads of one torch thread each == clients one after another on one torch
    thread, bit for bit (weights, losses, captured messages), also with a defense that draws
    noise from the clients' generators."""
    train, test = pneumonia_train.subset(range(90)), pneumonia_test.subset(range(32))
    params = {"scale": 0.01} if defense == "gradient_noise" else {}
    sequential = _run(train, test, _config(), get_defense(defense, **params))
    torch.set_num_threads(2)  # two workers share the two threads: one each
    parallel = _run(train, test, _config(parallel_clients=2), get_defense(defense, **params))
    _assert_same_run(sequential, parallel, atol=0.0)


def test_parallel_clients_fall_back_for_hooks_with_shared_state(
    pneumonia_train, caplog: pytest.LogCaptureFixture
) -> None:
    """A defense that is not declared safe for concurrent clients runs them one by one, and
    says so."""
    hooks = get_defense("obscure")
    assert not type(hooks).concurrent_clients
    model = models.build("convnet", channels=1, classes=2, image_size=28, width=4)
    with caplog.at_level(logging.WARNING):
        sim = Simulator(
            model,
            pneumonia_train.subset(range(40)),
            _config(parallel_clients=2),
            hooks=hooks,
            device="cpu",
        )
    assert sim.workers == 1
    assert "parallel_clients=2 ignored" in caplog.text and "Obscure" in caplog.text


@pytest.mark.parametrize(
    ("algorithm", "defense"), [("fedavg", "none"), ("fedavg", "gradient_noise"), ("fedsgd", "none")]
)
def test_vectorised_clients_give_the_sequential_run(
    pneumonia_train, pneumonia_test, algorithm: str, defense: str
) -> None:
    """Clients trained as one vmapped model == one after another: 90 examples over 4 clients
    gives 23, 23, 22, 22 examples, so the last local step runs in two groups of different batch
    sizes; BatchNorm running statistics are per client. Compared in float64, where the two are
    equal to 1e-9 (in float32 a grouped convolution's other summation order is amplified by
    near-constant BatchNorm channels of this width-4 model to ~1e-3 within two steps)."""
    train = pneumonia_train.subset(range(90))
    params = {"scale": 0.01} if defense == "gradient_noise" else {}
    runs = [
        _run(
            train,
            None,
            _config(algorithm=algorithm, vectorize_clients=mode),
            get_defense(defense, **params),
            dtype=torch.float64,
        )
        for mode in ("off", "on")
    ]
    _assert_same_run(runs[0], runs[1], atol=1e-9)


def test_vectorised_clients_fall_back_where_not_exact(
    pneumonia_train, caplog: pytest.LogCaptureFixture
) -> None:
    """PRECODE's stochastic bottleneck and DP-SGD's per-example gradients cannot be
    vectorised: the simulator says why and runs clients one by one; 'auto' is off on CPU."""
    train = pneumonia_train.subset(range(40))
    for name, norm in (("precode", "batch"), ("dp_sgd", "group")):
        hooks = get_defense(name)
        model = models.build("convnet", channels=1, classes=2, image_size=28, width=32, norm=norm)
        with caplog.at_level(logging.WARNING):
            sim = Simulator(
                model, train, _config(vectorize_clients="on"), hooks=hooks, device="cpu"
            )
        assert not sim.vectorized
    assert "bottleneck adds a stochastic loss term" in caplog.text
    assert "override compute_gradients()" in caplog.text
    model = models.build("convnet", channels=1, classes=2, image_size=28, width=4)
    sim = Simulator(model, train, _config(vectorize_clients="auto"), device="cpu")
    assert not sim.vectorized


def test_vectorised_clients_on_cuda_are_an_opt_in_with_a_warning(
    pneumonia_train, caplog: pytest.LogCaptureFixture
) -> None:
    """Not yet run on a GPU: the default stays off on CUDA, and 'auto'/'on' there say that
    the path is unverified (the device is only inspected: no GPU is needed)."""
    model = models.build("convnet", channels=1, classes=2, image_size=28, width=4)
    train = pneumonia_train.subset(range(40))
    for mode, expected in (("off", False), ("auto", True), ("on", True)):
        sim = Simulator(model, train, _config(vectorize_clients=mode), device="cpu")
        sim.device = torch.device("cuda:0")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert sim._use_vectorized() is expected
        assert ("not yet verified" in caplog.text) is expected

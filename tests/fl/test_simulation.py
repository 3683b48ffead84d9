"""The federated simulator: learning, messages, capture, hooks, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata
from skimage.transform import resize

from fl import data, models
from fl.simulation import (
    CaptureConfig,
    ClientContext,
    ClientHooks,
    FederationConfig,
    GroundTruth,
    Observation,
    PartitionConfig,
    Simulator,
    classification_metrics,
    normalize,
    observe_client_step,
    resolve_device,
)


def real_images(size: int = 16) -> torch.Tensor:
    """Four real RGB images from scikit-image, resized to ``size`` px, in [0, 1]."""
    pics = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    arr = np.stack([resize(p, (size, size), anti_aliasing=True) for p in pics])
    return torch.as_tensor(arr, dtype=torch.float32).permute(0, 3, 1, 2).clamp(0, 1)


def small_config(**changes: object) -> FederationConfig:
    base = dict(
        algorithm="fedavg",
        clients=4,
        clients_per_round=2,
        rounds=2,
        batch_size=16,
        lr=0.05,
        partition=PartitionConfig(scheme="iid", max_per_client=32),
    )
    base.update(changes)
    return FederationConfig(**base)


def test_fedavg_beats_majority_on_real_pneumonia(pneumonia_train, pneumonia_test) -> None:
    torch.manual_seed(0)
    model = models.build("convnet", channels=1, classes=2, image_size=28, width=8)
    cfg = FederationConfig(
        algorithm="fedavg",
        clients=5,
        clients_per_round=5,
        rounds=4,
        batch_size=16,
        lr=0.02,
        partition=PartitionConfig(scheme="iid", max_per_client=600),
    )
    result = Simulator(model, pneumonia_train, cfg, test=pneumonia_test, device="cpu").run()
    majority = float(np.bincount(pneumonia_test.labels.numpy()).max() / len(pneumonia_test))
    acc = result.final_metrics["accuracy"]
    assert acc is not None and acc > majority + 0.05, (acc, majority)
    assert len(result.history) == 4
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "loss"):
        assert result.history[-1].metrics[key] is not None
    assert all(np.isfinite(r.train_loss) for r in result.history)


def test_fedsgd_message_is_the_batch_gradient() -> None:
    torch.manual_seed(1)
    model = models.build("lenet", channels=3, classes=10, image_size=16)
    images, labels = real_images(), torch.tensor([1, 2, 3, 4])
    obs, _ = observe_client_step(model, images, labels, algorithm="fedsgd")
    assert obs.kind == "gradient" and obs.num_examples == 4 and obs.local_steps == 1
    loss = F.cross_entropy(model(images), labels)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(obs.message[name], g)
    assert set(obs.message) == {n for n, _ in model.named_parameters()}


def test_fedavg_one_step_message_is_weights_minus_lr_gradient() -> None:
    torch.manual_seed(2)
    model = models.build("lenet", channels=3, classes=10, image_size=16)
    images, labels = real_images(), torch.tensor([0, 5, 7, 9])
    lr = 0.1
    grad_obs, _ = observe_client_step(model, images, labels, algorithm="fedsgd")
    obs, _ = observe_client_step(model, images, labels, algorithm="fedavg", lr=lr, local_steps=1)
    assert obs.kind == "weights" and obs.lr == lr and obs.local_steps == 1
    update = obs.weight_update()
    for name, g in grad_obs.message.items():
        torch.testing.assert_close(update[name], lr * g, rtol=1e-4, atol=1e-6)
    # several local steps move further than one
    obs3, _ = observe_client_step(model, images, labels, algorithm="fedavg", lr=lr, local_steps=3)
    assert obs3.local_steps == 3
    n1 = sum(float(u.norm()) for u in update.values())
    n3 = sum(float(u.norm()) for u in obs3.weight_update().values())
    assert n3 > n1


def test_fedavg_minibatches_cover_the_client_data() -> None:
    torch.manual_seed(3)
    model = models.build("mlp", channels=3, classes=4, image_size=16)
    images, labels = real_images(), torch.tensor([0, 1, 2, 3])
    obs, truth = observe_client_step(
        model, images, labels, algorithm="fedavg", lr=0.1, local_steps=2, batch_size=2
    )
    assert obs.num_examples == 4 and obs.batch_size == 2 and obs.local_steps == 2
    torch.testing.assert_close(truth.images, images)


def _tensors(obj: object) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            out.extend(_tensors(v))
    elif isinstance(obj, torch.nn.Module):
        out.extend(obj.state_dict().values())
    return out


def test_observation_never_contains_the_ground_truth() -> None:
    torch.manual_seed(4)
    model = models.build("lenet", channels=3, classes=10, image_size=16)
    images, labels = real_images(), torch.tensor([3, 1, 4, 1])
    for algorithm in ("fedsgd", "fedavg"):
        obs, truth = observe_client_step(model, images, labels, algorithm=algorithm)
        assert isinstance(truth, GroundTruth)
        field_names = {f.name for f in dataclasses.fields(Observation)}
        assert not field_names & {"images", "trained_images", "truth", "ground_truth"}
        assert obs.labels is None
        for value in (getattr(obs, f) for f in field_names):
            for t in _tensors(value):
                assert t.shape != images.shape
                assert not (t.numel() == labels.numel() and torch.equal(t.flatten().long(), labels))
        torch.testing.assert_close(truth.images, images)
        assert torch.equal(truth.labels, labels)
    obs, _ = observe_client_step(model, images, labels, reveal_labels=True)
    assert torch.equal(obs.labels, labels)


def test_observation_is_a_copy_the_attack_cannot_leak_into_the_run() -> None:
    model = models.build("lenet", channels=3, classes=10, image_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obs, _ = observe_client_step(model, real_images(), torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():
        for p in obs.model.parameters():
            p.add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in obs.global_state.items():
        assert torch.equal(v, before[k])


def test_simulator_is_deterministic_for_a_seed(pneumonia_train, pneumonia_test) -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = models.build("convnet", channels=1, classes=2, image_size=28, width=4)
        sim = Simulator(
            model, pneumonia_train, small_config(), test=pneumonia_test, device="cpu", seed=seed
        )
        return sim.run().model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_capture_rounds_victims_and_pairs(pneumonia_train) -> None:
    torch.manual_seed(0)
    model = models.build("mlp", channels=1, classes=2, image_size=28)
    cfg = small_config(rounds=3, clients_per_round=3)
    capture = CaptureConfig(rounds=[0, 2], victims=2, pairs=[(1, 0), (1, 1), (1, 2), (1, 3)])
    sim = Simulator(model, pneumonia_train, cfg, capture=capture, device="cpu")
    result = sim.run()
    by_round: dict[int, list[int]] = {}
    for obs, truth in result.captures:
        assert (obs.round, obs.client) == (truth.round, truth.client)
        by_round.setdefault(obs.round, []).append(obs.client)
        assert obs.kind == "weights" and obs.num_examples == truth.images.shape[0]
        assert truth.images.shape[1:] == (1, 28, 28)
        assert float(truth.images.min()) >= 0.0 and float(truth.images.max()) <= 1.0
    assert by_round[0] == result.history[0].clients[:2]
    assert by_round[2] == result.history[2].clients[:2]
    assert sorted(by_round[1]) == sorted(result.history[1].clients)


def test_captured_message_matches_global_state_at_round_start(pneumonia_train) -> None:
    torch.manual_seed(0)
    model = models.build("mlp", channels=1, classes=2, image_size=28)
    cfg = small_config(algorithm="fedsgd", rounds=2, batch_size=4)
    sim = Simulator(model, pneumonia_train, cfg, capture=CaptureConfig(rounds=[1]), device="cpu")
    sim.run_round()
    start = {k: v.clone() for k, v in sim.global_model.state_dict().items()}
    sim.run_round()
    ((obs, truth),) = sim.captures
    assert obs.num_examples == 4 and obs.kind == "gradient"
    for k, v in start.items():
        assert torch.equal(obs.global_state[k], v)
    # re-computing the gradient on the ground truth gives the message
    x = normalize(truth.images, obs.mean, obs.std)
    loss = F.cross_entropy(obs.model(x), truth.labels)
    grads = torch.autograd.grad(loss, list(obs.model.parameters()))
    for (name, _), g in zip(obs.model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(obs.message[name], g, rtol=1e-4, atol=1e-6)


class _Recorder(ClientHooks):
    """A test defense: inverts images, zeroes updates, adds a loss term; counts calls."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {"model": 0, "batch": 0, "loss": 0, "update": 0}

    def prepare_model(self, model):
        self.calls["model"] += 1
        return model

    def transform_batch(self, images, labels, model, ctx: ClientContext):
        self.calls["batch"] += 1
        return 1.0 - images

    def extra_loss(self, model, inputs, labels, logits, ctx):
        self.calls["loss"] += 1
        return logits.pow(2).mean() * 0.0

    def process_update(self, update, ctx):
        self.calls["update"] += 1
        return {k: torch.zeros_like(v) for k, v in update.items()}


def test_hooks_act_where_they_claim(pneumonia_train) -> None:
    torch.manual_seed(0)
    model = models.build("mlp", channels=1, classes=2, image_size=28)
    hooks = _Recorder()
    cfg = small_config(rounds=1, clients_per_round=2, batch_size=16)
    sim = Simulator(
        model,
        pneumonia_train,
        cfg,
        hooks=hooks,
        device="cpu",
        capture=CaptureConfig(rounds=[0], victims=1),
    )
    before = {k: v.clone() for k, v in sim.global_model.state_dict().items()}
    sim.run()
    assert hooks.calls["model"] == 1
    assert hooks.calls["batch"] == hooks.calls["loss"] == 2 * 2  # 2 clients x 2 steps of 16
    assert hooks.calls["update"] == 2
    # zeroed updates leave the global weights unchanged
    for k, v in sim.global_model.named_parameters():
        assert torch.equal(v, before[k])
    ((obs, truth),) = sim.captures
    assert truth.trained_images is not None
    torch.testing.assert_close(truth.trained_images, 1.0 - truth.images)
    for k, w in obs.message.items():
        torch.testing.assert_close(w, obs.global_state[k])


def test_batchnorm_buffers_are_averaged(pneumonia_train) -> None:
    torch.manual_seed(0)
    model = models.build("convnet", channels=1, classes=2, image_size=28, width=4)
    sim = Simulator(model, pneumonia_train, small_config(rounds=1), device="cpu")
    sim.run()
    bn_means = [b for n, b in sim.global_model.named_buffers() if n.endswith("running_mean")]
    assert bn_means and any(float(b.abs().sum()) > 0 for b in bn_means)


def test_classification_metrics_match_definitions() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1, 0])
    m = classification_metrics(probs, labels, 2)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["auroc"] == pytest.approx(
        0.75
    )  # positives 0.8, 0.4 vs negatives 0.1, 0.7: 3 of 4 pairs
    assert m["macro_f1"] == pytest.approx(0.5)
    single = classification_metrics(probs[:2], torch.tensor([0, 0]), 2)
    assert single["auroc"] is None
    three = classification_metrics(
        torch.eye(3)[[0, 1, 2, 0]] * 0.9 + 0.033, torch.tensor([0, 1, 2, 0]), 3
    )
    assert three["auroc"] == pytest.approx(1.0) and three["balanced_accuracy"] == 1.0


def test_config_rejects_degenerate_settings() -> None:
    with pytest.raises(ValueError, match="clients_per_round"):
        FederationConfig(clients=2, clients_per_round=3)
    with pytest.raises(ValueError):
        FederationConfig(lr=0)


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_partition_used_by_simulator_is_nonempty(pneumonia_train) -> None:
    model = models.build("mlp", channels=1, classes=2, image_size=28)
    cfg = small_config(clients=6, partition=PartitionConfig(scheme="dirichlet", alpha=0.1))
    sim = Simulator(model, pneumonia_train, cfg, device="cpu")
    assert all(len(p) > 0 for p in sim.partition) and len(sim.partition) == 6
    assert data.label_skew(sim.partition, pneumonia_train.labels.numpy(), 2) > 0


def test_channels_last_gives_the_same_run_up_to_rounding(pneumonia_train, pneumonia_test) -> None:
    """The channels-last fast path (issue 8) computes the same client step as the default
    layout (messages equal to float tolerance on continuous-valued images); on uint8 images
    max-pool ties may be broken at other positions, so a whole run is compared by its
    losses and accuracy. Observations reach the attacks in the default layout."""
    torch.manual_seed(0)
    images = (real_images(16) + 0.01 * torch.randn(4, 3, 16, 16)).clamp(0, 1)
    labels = torch.tensor([0, 1, 1, 0])
    messages = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = models.build("convnet", channels=3, classes=2, image_size=16, width=8)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        obs, _ = observe_client_step(model, images, labels, algorithm="fedsgd")
        assert all(v.is_contiguous() for v in obs.message.values())
        assert all(p.is_contiguous() for p in obs.model.parameters())
        messages.append(obs.message)
    for name, value in messages[0].items():
        assert torch.allclose(value, messages[1][name], atol=1e-5, rtol=1e-4), name

    train, test = pneumonia_train.subset(range(96)), pneumonia_test.subset(range(64))
    runs = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = models.build("convnet", channels=1, classes=2, image_size=28, width=8)
        cfg = small_config(channels_last=channels_last, batch_size=8)
        runs[channels_last] = Simulator(model, train, cfg, test=test, device="cpu").run()
    for slow, fast in zip(runs[False].history, runs[True].history, strict=True):
        assert fast.train_loss == pytest.approx(slow.train_loss, rel=0.05)
        assert fast.metrics["accuracy"] == pytest.approx(slow.metrics["accuracy"], abs=0.05)
    assert (
        next(runs[True].model.parameters()).is_contiguous(memory_format=torch.channels_last)
        or next(runs[True].model.parameters()).ndim < 4
    )

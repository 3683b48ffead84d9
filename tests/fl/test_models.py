"""Tests for the model registry and the SplitModel contract of :mod:`fl.models`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fl import models
from fl.models import SplitModel

BUILTINS = ["convnet", "lenet", "mlp", "resnet18"]
SIZES = [16, 28, 32]
CHANNELS = [1, 3]
CLASSES = 7
BATCH = 2

# Options that keep the heavier models quick on CPU without changing their structure.
FAST_OPTIONS: dict[str, dict[str, object]] = {"convnet": {"width": 8, "groups": 4}}


def make(name: str, channels: int = 3, image_size: int = 16, **options: object) -> SplitModel:
    """Build a built-in model with CLASSES outputs, fast options merged in."""
    opts = {**FAST_OPTIONS.get(name, {}), **options}
    return models.build(name, channels=channels, classes=CLASSES, image_size=image_size, **opts)


def batch(channels: int, image_size: int, *, seed: int = 0) -> torch.Tensor:
    """A reproducible random image batch."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(BATCH, channels, image_size, image_size, generator=gen)


def n_params(model: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())


class ScaleBottleneck(nn.Module):
    """A stand-in for a PRECODE-like bottleneck: scales features and reports a loss."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.last: torch.Tensor | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        assert z.dim() == 2 and z.shape[1] == self.feature_dim
        self.last = z
        return z * self.scale

    def auxiliary_loss(self) -> torch.Tensor:
        assert self.last is not None
        return self.last.pow(2).mean()


@pytest.fixture
def scratch_registry() -> Iterator[None]:
    """Remove any model registered by a test afterwards."""
    before = set(models.available())
    yield
    for name in set(models.available()) - before:
        models.unregister(name)


# --------------------------------------------------------------------------- registry


def test_available_lists_builtins_sorted() -> None:
    names = models.available()
    assert names == sorted(names)
    assert set(BUILTINS) <= set(names)


def test_options_report_defaults() -> None:
    assert models.options("lenet") == {"init": "uniform"}
    assert models.options("convnet") == {"width": 32, "norm": "batch", "groups": 32}
    assert models.options("resnet18") == {"small_stem": True, "norm": "batch", "groups": 32}
    assert models.options("mlp") == {"hidden": (32,), "activation": "relu", "init": "default"}


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(models.UnknownModelError) as info:
        models.build("alexnet", channels=3, classes=10, image_size=32)
    assert isinstance(info.value, ValueError)
    for name in BUILTINS:
        assert name in str(info.value)
    with pytest.raises(models.UnknownModelError, match="lenet"):
        models.options("alexnet")


def test_unknown_option_names_option_and_accepted_ones() -> None:
    with pytest.raises(TypeError) as info:
        models.build("convnet", channels=3, classes=10, image_size=32, depth=3)
    message = str(info.value)
    assert "depth" in message
    for accepted in ("width", "norm", "groups"):
        assert accepted in message
    assert isinstance(info.value, ValueError)  # catchable either way


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("lenet", {"init": "xavier"}, "init"),
        ("convnet", {"norm": "layer"}, "norm"),
        ("convnet", {"width": 0}, "width"),
        ("convnet", {"norm": "group", "groups": 3}, "groups"),
        ("resnet18", {"norm": "none"}, "norm"),
        ("resnet18", {"norm": "group", "groups": 3}, "groups"),
        ("resnet18", {"small_stem": "yes"}, "small_stem"),
        ("mlp", {"activation": "gelu"}, "activation"),
        ("mlp", {"hidden": (32, -1)}, "hidden"),
        ("mlp", {"hidden": 32}, "hidden"),
    ],
)
def test_bad_option_values_raise_value_error(
    name: str, options: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        make(name, **options)


@pytest.mark.parametrize("argument", ["channels", "classes", "image_size"])
def test_bad_sizes_raise_value_error(argument: str) -> None:
    kwargs: dict[str, int] = {"channels": 3, "classes": 10, "image_size": 32, argument: 0}
    with pytest.raises(ValueError, match=argument):
        models.build("lenet", **kwargs)


def test_register_user_model(scratch_registry: None) -> None:
    @models.register("tiny")
    def build_tiny(channels: int, classes: int, image_size: int, *, hidden: int = 5) -> SplitModel:
        features = nn.Sequential(nn.Flatten(), nn.Linear(channels * image_size**2, hidden))
        return SplitModel(
            features, nn.Linear(hidden, classes), in_channels=channels, image_size=image_size
        )

    assert "tiny" in models.available()
    assert models.options("tiny") == {"hidden": 5}
    model = models.build("tiny", channels=1, classes=3, image_size=8, hidden=4)
    assert model.feature_dim == 4 and model.num_classes == 3
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(TypeError, match="hidden"):
        models.build("tiny", channels=1, classes=3, image_size=8, width=4)

    models.register("tiny")(build_tiny)  # same function again: no-op
    with pytest.raises(ValueError, match="already registered"):
        models.register("tiny")(
            lambda channels, classes, image_size: build_tiny(channels, classes, image_size)
        )
    models.register("tiny", replace=True)(build_tiny)
    with pytest.warns(DeprecationWarning, match="replace="):
        models.register("tiny", overwrite=True)(build_tiny)


def test_register_rejects_bad_builders(scratch_registry: None) -> None:
    def no_default(channels: int, classes: int, image_size: int, *, depth: int) -> SplitModel:
        raise AssertionError

    def too_few(channels: int) -> SplitModel:
        raise AssertionError

    with pytest.raises(TypeError, match="depth"):
        models.register("no_default")(no_default)
    with pytest.raises(TypeError, match="positional"):
        models.register("too_few")(too_few)

    @models.register("not_split")
    def not_split(channels: int, classes: int, image_size: int) -> SplitModel:
        return nn.Linear(1, 1)  # type: ignore[return-value]

    with pytest.raises(TypeError, match="SplitModel"):
        models.build("not_split", channels=1, classes=1, image_size=1)


# --------------------------------------------------------------------------- SplitModel contract


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("image_size", SIZES)
@pytest.mark.parametrize("name", BUILTINS)
def test_split_contract(name: str, image_size: int, channels: int) -> None:
    torch.manual_seed(0)
    model = make(name, channels=channels, image_size=image_size)
    x = batch(channels, image_size)

    assert isinstance(model, SplitModel)
    assert (model.in_channels, model.image_size, model.num_classes) == (
        channels,
        image_size,
        CLASSES,
    )
    assert isinstance(model.bottleneck, nn.Identity)
    assert model.last_layer() is model.classifier
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.in_features == model.feature_dim
    assert model.classifier.out_features == CLASSES
    assert model.auxiliary_loss() is None

    logits = model(x)
    feats = model.forward_features(x)
    assert logits.shape == (BATCH, CLASSES)
    assert feats.shape == (BATCH, model.feature_dim)
    torch.testing.assert_close(logits, model.classifier(feats))


@pytest.mark.parametrize(
    ("name", "image_size", "feature_dim"),
    [
        ("lenet", 16, 192),
        ("lenet", 28, 588),
        ("lenet", 32, 768),
        ("convnet", 16, 1 * 1 * 4 * 8),  # 16 -> 5 -> 1 px, 4w channels (w = 8)
        ("convnet", 28, 3 * 3 * 4 * 8),  # 28 -> 9 -> 3 px
        ("convnet", 32, 3 * 3 * 4 * 8),  # 32 -> 10 -> 3 px: the reference's 36·w
        ("resnet18", 16, 512),
        ("resnet18", 32, 512),
        ("mlp", 32, 32),
    ],
)
def test_feature_dims(name: str, image_size: int, feature_dim: int) -> None:
    assert make(name, image_size=image_size).feature_dim == feature_dim


@pytest.mark.parametrize("name", BUILTINS)
def test_bottleneck_replacement_changes_output_and_exposes_auxiliary_loss(name: str) -> None:
    torch.manual_seed(0)
    model = make(name).eval()
    x = batch(3, 16)
    with torch.no_grad():
        before = model(x)
    model.bottleneck = ScaleBottleneck(model.feature_dim)
    after = model(x)
    assert after.shape == before.shape
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, model.classifier(model.forward_features(x)))
    extra = model.auxiliary_loss()
    assert isinstance(extra, torch.Tensor) and extra.dim() == 0 and extra.item() > 0
    # The bottleneck's parameters belong to the model (optimisers and FedAvg see them).
    assert any(p is model.bottleneck.scale for p in model.parameters())


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("name", BUILTINS)
def test_gradients_reach_every_parameter(name: str, channels: int) -> None:
    torch.manual_seed(0)
    model = make(name, channels=channels)
    model.bottleneck = ScaleBottleneck(model.feature_dim)
    x = batch(channels, 16)
    y = torch.arange(BATCH) % CLASSES
    loss = F.cross_entropy(model(x), y) + model.auxiliary_loss()
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname
    assert model.classifier.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", BUILTINS)
def test_double_backward_through_input(name: str) -> None:
    """Gradient-inversion attacks differentiate a gradient-matching loss w.r.t. the input."""
    torch.manual_seed(0)
    model = make(name)
    x = batch(3, 16).requires_grad_(True)
    y = torch.arange(BATCH) % CLASSES
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    grad_norm = torch.stack([g.pow(2).sum() for g in grads]).sum()
    (dx,) = torch.autograd.grad(grad_norm, x)
    assert dx.shape == x.shape
    assert torch.isfinite(dx).all()
    assert dx.abs().sum() > 0


@pytest.mark.parametrize("name", BUILTINS)
def test_build_is_deterministic_under_seed(name: str) -> None:
    torch.manual_seed(123)
    first = make(name).state_dict()
    torch.manual_seed(123)
    second = make(name).state_dict()
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    torch.manual_seed(124)
    third = make(name).state_dict()
    assert any(not torch.equal(first[k], third[k]) for k in first if first[k].is_floating_point())


def test_building_does_not_touch_batchnorm_statistics() -> None:
    for name in ("convnet", "resnet18"):
        model = make(name)
        assert model.training
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert int(module.num_batches_tracked) == 0
                assert torch.count_nonzero(module.running_mean) == 0


# --------------------------------------------------------------------------- model specifics


def test_lenet_uniform_init() -> None:
    torch.manual_seed(0)
    model = make("lenet", image_size=32)
    assert model.feature_dim == 768
    for pname, param in model.named_parameters():
        assert param.min() >= -0.5 and param.max() <= 0.5, pname
    # U(-0.5, 0.5), not PyTorch's fan-in bound (1/sqrt(768) ≈ 0.036 for the classifier).
    assert model.classifier.weight.abs().max() > 0.4
    assert model.features[0].weight.abs().max() > 0.4

    default = make("lenet", image_size=32, init="default")
    assert default.classifier.weight.abs().max() < 0.05


def test_lenet_layout_matches_dlg() -> None:
    model = make("lenet", image_size=32)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (3, 12, (5, 5), (2, 2), (2, 2)),
        (12, 12, (5, 5), (2, 2), (2, 2)),
        (12, 12, (5, 5), (1, 1), (2, 2)),
    ]
    assert sum(isinstance(m, nn.Sigmoid) for m in model.features) == 3
    assert not model.has_batchnorm()


def test_convnet_width64_parameter_count() -> None:
    model = models.build("convnet", channels=3, classes=10, image_size=32, width=64)
    assert 2_800_000 <= n_params(model) <= 3_000_000
    assert model.feature_dim == 36 * 64


def test_convnet_layout_matches_inverting_gradients() -> None:
    model = make("convnet", image_size=32)
    kinds = [type(m).__name__ for m in model.features]
    convs = [i for i, k in enumerate(kinds) if k == "Conv2d"]
    pools = [i for i, k in enumerate(kinds) if k == "MaxPool2d"]
    assert len(convs) == 8 and len(pools) == 2
    # pool0 right after conv5's BN+ReLU, pool1 right after conv7's.
    assert pools == [convs[5] + 3, convs[7] + 3]
    widths = [(m.in_channels, m.out_channels) for m in model.features if isinstance(m, nn.Conv2d)]
    w = 8
    assert widths == [(3, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w)] + [(4 * w, 4 * w)] * 4
    assert model.has_batchnorm()


@pytest.mark.parametrize("norm", ["group", "none"])
def test_convnet_without_batchnorm(norm: str) -> None:
    model = make("convnet", norm=norm)
    assert not model.has_batchnorm()
    assert model(batch(3, 16)).shape == (BATCH, CLASSES)
    if norm == "group":
        assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


def test_convnet_tiny_images_fall_back_to_ceil_mode() -> None:
    model = make("convnet", image_size=8)
    assert model(batch(3, 8)).shape == (BATCH, CLASSES)


def test_resnet18_norms() -> None:
    bn = make("resnet18")
    gn = make("resnet18", norm="group")
    assert bn.has_batchnorm()
    assert not gn.has_batchnorm()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gn.modules())
    assert any(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for m in gn.modules())
    assert n_params(bn) == n_params(gn)  # same affine parameters, different normalisation
    assert gn(batch(3, 16)).shape == (BATCH, CLASSES)


@pytest.mark.parametrize("channels", CHANNELS)
def test_resnet18_stems(channels: int) -> None:
    small = make("resnet18", channels=channels)
    assert small.features.conv1.in_channels == channels
    assert small.features.conv1.kernel_size == (3, 3) and small.features.conv1.stride == (1, 1)
    assert isinstance(small.features.maxpool, nn.Identity)

    imagenet = make("resnet18", channels=channels, image_size=32, small_stem=False)
    assert imagenet.features.conv1.kernel_size == (7, 7)
    assert isinstance(imagenet.features.maxpool, nn.MaxPool2d)
    assert imagenet(batch(channels, 32)).shape == (BATCH, CLASSES)
    assert imagenet.feature_dim == 512


def test_mlp_configurations() -> None:
    precode = make("mlp", image_size=32, hidden=(1024, 1024))
    linears = [m for m in precode.features if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3072, 1024), (1024, 1024)]
    assert precode.feature_dim == 1024

    from_list = make("mlp", hidden=[16, 8], activation="tanh")  # config files give lists
    assert from_list.feature_dim == 8
    assert sum(isinstance(m, nn.Tanh) for m in from_list.features) == 2

    logistic = make("mlp", channels=1, image_size=16, hidden=())
    assert logistic.feature_dim == 256
    assert logistic(batch(1, 16)).shape == (BATCH, CLASSES)


def test_mlp_uniform_init() -> None:
    torch.manual_seed(0)
    model = make("mlp", image_size=32, init="uniform", activation="sigmoid")
    for pname, param in model.named_parameters():
        assert param.min() >= -0.5 and param.max() <= 0.5, pname
    assert model.features[1].weight.abs().max() > 0.4
    assert make("mlp", image_size=32).features[1].weight.abs().max() < 0.05

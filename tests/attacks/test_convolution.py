"""attacks._machinery.convolution: bit-identical values to F.conv2d, without the unused
double-backward weight products."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from attacks import AttackConfigError, get_attack
from attacks._machinery.convolution import (
    Conv2dForInversion,
    ExactInversionConvolutions,
    exact_convolutions,
    inversion_convolutions,
    uses_exact_convolutions,
)
from attacks._machinery.objectives import cosine_distance, dummy_gradients, l2_distance
from fl import models
from fl.simulation import observe_client_step

Distance = Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]


def _mode(exact_mode: bool) -> contextlib.AbstractContextManager[Any]:
    """The exact convolution mode, or PyTorch's plain path to compare it with."""
    return ExactInversionConvolutions() if exact_mode else contextlib.nullcontext()


def _objective(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, exact_mode: bool, distance: Distance
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The dummy gradient and d/dx of a gradient-matching distance to a fixed target."""
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    target = [torch.randn(p.shape, generator=gen) for p in params]
    if exact_mode:
        grads = list(dummy_gradients(model, params, x, y))
    else:
        loss = F.cross_entropy(model(x), y)
        grads = list(torch.autograd.grad(loss, params, create_graph=True))
    (gx,) = torch.autograd.grad(distance(grads, target), [x])
    return [g.detach() for g in grads], gx


@pytest.mark.parametrize("distance", [cosine_distance, l2_distance])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    ("name", "size", "extra"),
    [("convnet", 16, {"width": 8}), ("lenet", 32, {})],  # LeNet: strides 2, output padding
)
def test_gradients_and_image_gradient_are_bit_identical(
    name: str, size: int, extra: dict[str, int], train: bool, distance: Distance
) -> None:
    torch.manual_seed(0)
    model = models.build(name, channels=3, classes=3, image_size=size, **extra)
    model.train(train)
    x = torch.randn(2, 3, size, size, requires_grad=True)
    y = torch.tensor([1, 0])
    plain_grads, plain_gx = _objective(model, x, y, False, distance)
    grads, gx = _objective(model, x, y, True, distance)
    assert plain_gx.abs().max() > 0
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, grads, strict=True))
    assert torch.equal(plain_gx, gx)


def test_unrolled_local_steps_are_bit_identical() -> None:
    """DLM's case: weights after a differentiable step depend on the dummy data and the
    learning rate, so their double backward keeps the weight product (PyTorch's own)."""
    torch.manual_seed(0)
    model = models.build("lenet", channels=3, classes=3, image_size=32)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    lr = torch.tensor(0.1, requires_grad=True)
    y = torch.tensor([1, 0])

    def unroll(exact_mode: bool) -> tuple[torch.Tensor, ...]:
        start = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        current = dict(start)
        for _ in range(2):
            with _mode(exact_mode):
                logits = functional_call(model, current, (x,))
            grads = torch.autograd.grad(
                F.cross_entropy(logits, y), list(current.values()), create_graph=True
            )
            current = {n: w - lr * g for (n, w), g in zip(current.items(), grads, strict=True)}
        distance = sum(((current[n] - start[n] - 0.01) ** 2).sum() for n in current)
        return torch.autograd.grad(distance, [x, lr])

    plain, exact = unroll(False), unroll(True)
    assert plain[0].abs().max() > 0
    assert torch.equal(plain[0], exact[0]) and torch.equal(plain[1], exact[1])


class _SharedConv(torch.nn.Module):
    """One convolution applied three times: its weight's gradient sums three contributions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.head = torch.nn.Linear(3 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = torch.tanh(self.conv(x))
        return self.head(x.flatten(1))


def test_shared_weights_and_second_order_weight_gradients_are_bit_identical() -> None:
    """A weight used three times accumulates in PyTorch's order; a second-order gradient asked
    for the leaf weights themselves gets PyTorch's full double backward."""
    torch.manual_seed(0)
    model = _SharedConv()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = torch.tensor([1, 0])
    params = list(model.parameters())

    def run(exact_mode: bool) -> tuple[torch.Tensor, ...]:
        with _mode(exact_mode):
            loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum((g**2).sum() for g in grads)
        return (*grads, *torch.autograd.grad(penalty, [x, *params]))

    plain, exact = run(False), run(True)
    assert len(plain) == len(exact) == 2 * len(params) + 1
    assert all(torch.equal(a, b) for a, b in zip(plain, exact, strict=True))


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups", "bias"),
    [(1, 1, 1, 1, True), (2, 1, 1, 2, False), (2, 0, 2, 1, True), (3, 2, 1, 1, True)],
)
def test_derivatives_of_every_order_are_exact(
    stride: int, padding: int, dilation: int, groups: int, bias: bool
) -> None:
    """gradcheck and gradgradcheck in float64 (strides whose transposed convolution needs
    output padding, groups, dilation), and the image gradient of a weight-gradient norm equal
    to plain autograd's in float32."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True) if bias else None

    def f(x: torch.Tensor, w: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        with ExactInversionConvolutions():
            return F.conv2d(x, w, rest[0] if rest else None, stride, padding, dilation, groups)

    inputs = (x, w, b) if b is not None else (x, w)
    assert torch.equal(f(*inputs), F.conv2d(x, w, b, stride, padding, dilation, groups))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)

    def image_gradient(exact_mode: bool) -> torch.Tensor:
        xs, ws = x.float().detach().requires_grad_(), w.float().detach().requires_grad_()
        bs = None if b is None else b.float().detach().requires_grad_()
        if exact_mode:
            out = f(xs, ws, *(() if bs is None else (bs,)))
        else:
            out = F.conv2d(xs, ws, bs, stride, padding, dilation, groups)
        wanted = [ws] if bs is None else [ws, bs]
        grads = torch.autograd.grad(torch.sin(out).sum(), wanted, create_graph=True)
        (gx,) = torch.autograd.grad(sum((g**2).sum() for g in grads), [xs])
        return gx

    assert torch.equal(image_gradient(True), image_gradient(False))


class _WholeImageKernels(TorchDispatchMode):
    """Counts the convolutions that compute a weight product the way PyTorch's conv double
    backward does: batch and channels swapped, the kernel as large as the image."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket is torch.ops.aten.convolution:
            x, w = args[0], args[1]
            if x.dim() == 4 and tuple(w.shape[-2:]) == tuple(x.shape[-2:]) and x.shape[-1] > 3:
                self.count += 1
        return func(*args, **(kwargs or {}))


def test_double_backward_skips_the_unused_weight_products() -> None:
    """One objective-gradient evaluation on the ConvNet: plain autograd computes the weight
    product of each of the seven layers whose input gradient is taken, though nothing asks for
    it; the exact mode computes none."""
    torch.manual_seed(0)
    model = models.build("convnet", channels=3, classes=3, image_size=16, width=8).train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    y = torch.tensor([1, 0])
    counts = {}
    for exact_mode in (False, True):
        with _WholeImageKernels() as counter:
            _objective(model, x, y, exact_mode, cosine_distance)
        counts[exact_mode] = counter.count
    assert counts == {False: 7, True: 0}


def test_mode_leaves_other_calls_alone() -> None:
    """String padding and unbatched inputs go to F.conv2d unchanged; outside the context
    nothing is rerouted."""
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    w = torch.randn(3, 2, 3, 3)
    with ExactInversionConvolutions():
        same = F.conv2d(x, w, padding="same")
        unbatched = F.conv2d(x[0], w, padding=1)
        routed = F.conv2d(x, w, padding=1)
    name = Conv2dForInversion.__name__
    assert same.grad_fn is not None and name not in type(same.grad_fn).__name__
    assert name not in type(unbatched.grad_fn).__name__
    assert name in type(routed.grad_fn).__name__
    assert name not in type(F.conv2d(x, w).grad_fn).__name__


def test_only_models_with_convolutions_enter_the_mode() -> None:
    """The mode intercepts every torch call: models without Conv2d layers (the medical study's
    MLP) keep plain PyTorch."""
    convnet = models.build("convnet", channels=1, classes=2, image_size=16, width=4)
    mlp = models.build("mlp", channels=1, classes=2, image_size=16, hidden=[8])
    assert isinstance(inversion_convolutions(convnet), ExactInversionConvolutions)
    assert not isinstance(inversion_convolutions(mlp), ExactInversionConvolutions)


def test_the_mode_is_off_on_cuda_unless_opted_in(caplog: pytest.LogCaptureFixture) -> None:
    """Not yet run against PyTorch's own path on a GPU, the mode is used on CPUs only by
    default; ``"on"`` opts in on CUDA (with one warning), ``"off"`` keeps PyTorch's path
    everywhere. (The device is only inspected: no GPU is needed.)"""
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    assert uses_exact_convolutions(cpu) and not uses_exact_convolutions(cuda)
    with exact_convolutions("off"):
        assert not uses_exact_convolutions(cpu) and not uses_exact_convolutions(cuda)
    logger = "attacks._machinery.convolution"
    with caplog.at_level("WARNING", logger=logger), exact_convolutions("on"):
        assert uses_exact_convolutions(cpu) and uses_exact_convolutions(cuda)
        assert uses_exact_convolutions(cuda)
    assert caplog.text.count("not yet verified") == 1
    off_cpu = models.build("convnet", channels=1, classes=2, image_size=16, width=4).to("meta")
    assert not isinstance(inversion_convolutions(off_cpu), ExactInversionConvolutions)
    with exact_convolutions("on"):
        assert isinstance(inversion_convolutions(off_cpu), ExactInversionConvolutions)
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"), exact_convolutions("yes"):  # type: ignore[arg-type]
        pass


def test_attacks_choose_the_mode_by_their_parameter() -> None:
    """``exact_convolutions`` of an attack: 'off' runs PyTorch's own double backward (its
    seven weight products per evaluation), the default skips them, with the same images."""
    torch.manual_seed(0)
    model = models.build("convnet", channels=3, classes=3, image_size=16, width=8)
    obs, _ = observe_client_step(model, torch.rand(1, 3, 16, 16), torch.tensor([1]))
    images, counts = {}, {}
    for mode in ("auto", "off"):
        attack = get_attack("inverting_gradients", iterations=2, exact_convolutions=mode)
        with _WholeImageKernels() as counter:
            images[mode] = attack.run(obs).images
        counts[mode] = counter.count
    assert counts["auto"] == 0 and counts["off"] >= 7
    assert torch.equal(images["auto"], images["off"])
    with pytest.raises(AttackConfigError, match="exact_convolutions"):
        get_attack("idlg", exact_convolutions="maybe")


@pytest.mark.parametrize("how", ["backward", "grad_of_image_and_weights"])
def test_every_way_of_asking_for_gradients_is_bit_identical(how: str) -> None:
    """``.backward()`` (the engine then runs every node, nothing to ask) and ``autograd.grad``
    for the image and some weights at once."""
    torch.manual_seed(0)
    model = models.build("convnet", channels=3, classes=3, image_size=16, width=8).train()
    x0 = torch.randn(2, 3, 16, 16)
    y = torch.tensor([1, 0])
    params = list(model.parameters())

    def run(exact_mode: bool) -> list[torch.Tensor]:
        x = x0.clone().requires_grad_(True)
        with _mode(exact_mode):
            loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum((g**2).sum() for g in grads)
        if how == "backward":
            model.zero_grad(set_to_none=True)
            penalty.backward()
            out = [x.grad, *(p.grad for p in params)]
            model.zero_grad(set_to_none=True)
            return out  # type: ignore[return-value]
        return list(torch.autograd.grad(penalty, [x, *params[:3]]))

    plain, exact = run(False), run(True)
    assert all(t is not None for t in plain)
    assert all(torch.equal(a, b) for a, b in zip(plain, exact, strict=True))


def test_weight_first_seen_without_grad_keeps_its_gradient() -> None:
    """A no-grad forward inside the context (e.g. a probe) must not cache a view that cuts the
    weight off from later gradients."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 5, 5)

    def run(exact_mode: bool) -> tuple[torch.Tensor, ...]:
        with _mode(exact_mode):
            with torch.no_grad():
                conv(x)
            loss = conv(x).square().sum()
        return torch.autograd.grad(loss, [conv.weight, conv.bias])

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True), strict=True))


class _StopGradient(torch.autograd.Function):
    """The identity, whose backward sends no gradient (an undefined one) upstream."""

    @staticmethod
    def forward(ctx, t):  # type: ignore[no-untyped-def, override]
        return t.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        return None


def test_undefined_incoming_gradient_stays_undefined() -> None:
    """As in ATen: no zeros are invented for a gradient nobody sent."""
    conv = torch.nn.Conv2d(2, 3, 3)
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    with ExactInversionConvolutions():
        out = _StopGradient.apply(conv(x))
    grads = torch.autograd.grad(out.sum(), [x, conv.weight], allow_unused=True)
    assert grads == (None, None)


def test_calls_it_cannot_serve_exactly_keep_pytorchs_path() -> None:
    """Autocast, complex inputs, forward-mode AD, torch.func transforms and sizes given as
    anything but ints go to F.conv2d (same values, same errors)."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    name = Conv2dForInversion.__name__

    def routed(out: torch.Tensor) -> bool:
        return out.grad_fn is not None and name in type(out.grad_fn).__name__

    with ExactInversionConvolutions():
        assert routed(F.conv2d(x, w, padding=1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = F.conv2d(x, w)
        assert cast.dtype == torch.bfloat16 and not routed(cast)
        assert not routed(F.conv2d(x.to(torch.complex64), w.to(torch.complex64)))
        assert not routed(F.conv2d(x, w, stride=torch.tensor(2)))
        with pytest.raises(RuntimeError, match="stride"):
            F.conv2d(x, w, stride=(1, 2, 2))  # ATen's own check, not a silent truncation
        with fwAD.dual_level():
            dual = fwAD.make_dual(x.detach(), torch.ones_like(x))
            tangent = fwAD.unpack_dual(F.conv2d(dual, w.detach())).tangent
        assert torch.equal(tangent, F.conv2d(torch.ones_like(x), w.detach()))
        gx = torch.func.grad(lambda t: F.conv2d(t, w.detach()).square().sum())(x.detach())
    expected = torch.func.grad(lambda t: F.conv2d(t, w.detach()).square().sum())(x.detach())
    assert torch.equal(gx, expected)

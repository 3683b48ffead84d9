"""The leaner conv2d double backward of attacks.convolution: same values, fewer convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from attacks.convolution import Conv2dForInversion, InversionConvolutions, conv2d_for_inversion
from attacks.objectives import cosine_distance, dummy_gradients
from fl import models


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups", "bias"),
    [(1, 1, 1, 1, True), (2, 1, 1, 2, False), (2, 0, 2, 1, True), (3, 2, 1, 1, True)],
)
def test_first_and_second_derivatives_are_exact(
    stride: int, padding: int, dilation: int, groups: int, bias: bool
) -> None:
    """gradcheck and gradgradcheck in float64, including strides whose transposed convolution
    needs output padding (7 px input, stride 2 and 3)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True) if bias else None

    def f(x: torch.Tensor, w: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return conv2d_for_inversion(
            x, w, rest[0] if rest else None, stride, padding, dilation, groups
        )

    inputs = (x, w, b) if b is not None else (x, w)
    expected = F.conv2d(x, w, b, stride, padding, dilation, groups)
    assert torch.allclose(f(*inputs), expected, atol=1e-12)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def _objective_gradient(model: torch.nn.Module, x: torch.Tensor, lean: bool) -> torch.Tensor:
    """d/dx of the Inverting Gradients cosine between the dummy and a fixed target gradient."""
    params = list(model.parameters())
    y = torch.tensor([1, 0])
    torch.manual_seed(1)
    target = [torch.randn_like(p) for p in params]
    if lean:
        grads = dummy_gradients(model, params, x, F.one_hot(y, 3).float())
    else:
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
    (gx,) = torch.autograd.grad(cosine_distance(list(grads), target), [x])
    return gx


def test_inversion_objective_gradient_is_unchanged() -> None:
    """The image gradient of the cosine objective on the ConvNet (BatchNorm, pooling) equals
    plain autograd's."""
    torch.manual_seed(0)
    model = models.build("convnet", channels=3, classes=3, image_size=16, width=8).train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    plain = _objective_gradient(model, x, lean=False)
    lean = _objective_gradient(model, x, lean=True)
    assert plain.abs().max() > 0
    assert torch.allclose(lean, plain, rtol=1e-4, atol=1e-6 * float(plain.abs().max()))


class _WeightGradientConvolutions(TorchDispatchMode):
    """Counts the convolutions that compute a weight gradient the way PyTorch's conv double
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


def test_double_backward_skips_the_unused_weight_gradients() -> None:
    """One objective-gradient evaluation on the ConvNet: plain autograd also computes the
    weight gradient of each of the seven layers whose input gradient is taken, in the double
    backward, though nothing asks for it; the lean path computes none."""
    torch.manual_seed(0)
    model = models.build("convnet", channels=3, classes=3, image_size=16, width=8).train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    counts = {}
    for lean in (False, True):
        with _WeightGradientConvolutions() as counter:
            _objective_gradient(model, x, lean)
        counts[lean] = counter.count
    assert counts == {False: 7, True: 0}


def test_mode_leaves_other_calls_alone() -> None:
    """String padding and unbatched inputs go to F.conv2d unchanged; outside the context
    nothing is rerouted."""
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    w = torch.randn(3, 2, 3, 3)
    with InversionConvolutions():
        same = F.conv2d(x, w, padding="same")
        unbatched = F.conv2d(x[0], w, padding=1)
        routed = F.conv2d(x, w, padding=1)
    assert same.grad_fn is not None and "Conv2dForInversion" not in type(same.grad_fn).__name__
    assert "Conv2dForInversion" not in type(unbatched.grad_fn).__name__
    assert "Conv2dForInversion" in type(routed.grad_fn).__name__
    assert "Conv2dForInversion" not in type(F.conv2d(x, w).grad_fn).__name__
    assert Conv2dForInversion is not None

"""2-D convolutions whose double backward computes only what a gradient-inversion attack uses.

Gradient matching (DLG, iDLG, Inverting Gradients, DLM) differentiates the model's weight
gradient ``g(x) = dL/dW`` with respect to the dummy images ``x``: a double backward. PyTorch's
double backward of a convolution (``_convolution_double_backward``) also computes the gradient
with respect to the convolution's weight whenever the input-gradient branch carries a gradient,
whether or not anything asked for it; the attack never does (it optimises ``x`` only). On the
Inverting Gradients ConvNet that unused weight gradient is one extra convolution per layer, run
as a slow "batch and channels swapped" convolution, about a fifth of an attack iteration.

:class:`InversionConvolutions` is a ``TorchFunctionMode`` that routes every ``conv2d`` call made
under it to :class:`Conv2dForInversion`: the same forward, and a backward written as two
separately differentiable operations -- the input gradient as a transposed convolution and the
weight gradient as ``convolution_backward`` asked for the weight alone -- so that autograd's
per-operation masks drop every product nobody needs. The values are those of ``F.conv2d`` and
its gradients, up to float rounding (another summation order); first-order training is not
affected (the mode is entered only around an attack's dummy-gradient computation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_Pair = tuple[int, int]


def _pair(value: int | tuple[int, ...] | list[int]) -> _Pair:
    if isinstance(value, int):
        return (value, value)
    if len(value) == 1:
        return (int(value[0]), int(value[0]))
    return (int(value[0]), int(value[1]))


class Conv2dForInversion(torch.autograd.Function):
    """``F.conv2d`` with a backward made of differentiable operations whose own backward skips
    unused products (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: _Pair,
        padding: _Pair,
        dilation: _Pair,
        groups: int,
    ) -> torch.Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # the transposed convolution's output size is ambiguous for strides > 1: pad it to
            # the input's size
            kernel = weight.shape[-2:]
            extra = [
                x.shape[2 + i]
                - (
                    (grad_out.shape[2 + i] - 1) * stride[i]
                    - 2 * padding[i]
                    + dilation[i] * (kernel[i] - 1)
                    + 1
                )
                for i in range(2)
            ]
            grad_x = F.conv_transpose2d(
                grad_out, weight, None, stride, padding, tuple(extra), groups, dilation
            )
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                grad_out,
                x,
                weight,
                None,
                list(stride),
                list(padding),
                list(dilation),
                False,
                [0, 0],
                groups,
                [False, True, False],
            )[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


def conv2d_for_inversion(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d`` for 4-D inputs and numeric padding, through :class:`Conv2dForInversion`."""
    return Conv2dForInversion.apply(  # type: ignore[no-any-return]
        x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), int(groups)
    )


_CONV2D: tuple[Callable[..., torch.Tensor], ...] = (torch.conv2d, F.conv2d)
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


class InversionConvolutions(TorchFunctionMode):
    """Within this context every ``conv2d`` on a 4-D input with numeric padding runs through
    :class:`Conv2dForInversion`; anything else (string padding such as ``"same"``, unbatched
    inputs, other operators) is left alone."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _CONV2D:
            bound = dict(zip(_ARGS, args, strict=False))
            bound.update(kwargs)
            x = bound.get("input")
            padding = bound.get("padding", 0)
            if isinstance(x, torch.Tensor) and x.dim() == 4 and not isinstance(padding, str):
                return conv2d_for_inversion(
                    x,
                    bound["weight"],
                    bound.get("bias"),
                    bound.get("stride", 1),
                    padding,
                    bound.get("dilation", 1),
                    bound.get("groups", 1),
                )
        return func(*args, **kwargs)

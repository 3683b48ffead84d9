"""2-D convolutions whose double backward skips the products nobody asked for, with
bit-identical results.

Gradient matching (DLG, iDLG, Inverting Gradients, DLM) differentiates the model's weight
gradient ``g(x) = dL/dW`` with respect to the dummy images ``x``: a double backward. PyTorch's
convolution double backward (``_convolution_double_backward``) also computes a weight product
that such an attack never uses (on the Inverting Gradients ConvNet, a whole-image-kernel
convolution per layer, about a sixth of an iteration). :class:`ExactInversionConvolutions`
routes ``conv2d`` calls through :class:`Conv2dForInversion`, whose nodes call the same ATen
operators with the same arguments in the same order (so every value is bit-identical,
``tests/attacks/test_convolution.py``) and compute a product only when the autograd engine will
use it. How it works, its one documented limit (a leaf weight also used outside one context's
convolutions) and the dropped variants: ``docs/performance.md`` §2.

On CUDA the mode has not yet been run against PyTorch's own path, so by default
(:func:`exact_convolutions` ``"auto"``, the attacks' ``exact_convolutions`` parameter) it is
used on CPUs only; ``"on"`` opts in on CUDA, where ``benchmarks/gpu_check.py`` checks it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Literal

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

_Pair = tuple[int, int]
_ZERO_PAD: list[int] = [0, 0]

ExactConvolutions = Literal["auto", "on", "off"]
_POLICY: ContextVar[ExactConvolutions] = ContextVar("exact_convolutions", default="auto")
_warned_devices: set[str] = set()
log = logging.getLogger(__name__)


def _pair(value: int | tuple[int, ...] | list[int]) -> _Pair:
    if isinstance(value, int):
        return (value, value)
    if len(value) == 1:
        return (int(value[0]), int(value[0]))
    return (int(value[0]), int(value[1]))


def _engine_needs(t: torch.Tensor) -> bool:
    """Whether the running backward pass will use a gradient for ``t``: the information
    PyTorch's own nodes read as ``should_compute_output``. Falls back to ``requires_grad``
    (compute, never skip) where this PyTorch lacks the engine query."""
    if not t.requires_grad:
        return False
    query = getattr(torch._C, "_will_engine_execute_node", None)
    if query is None or t.grad_fn is None:  # the engine cannot be asked about leaves
        return True
    return bool(query(get_gradient_edge(t).node))


class _Conv2dBackward(torch.autograd.Function):
    """The first backward of a convolution as one node: ``convolution_backward``, as
    PyTorch's ``ConvolutionBackward0`` calls it. Its own backward is ATen's
    ``_convolution_double_backward`` when the weight product is needed and otherwise the
    same formulas without it."""

    @staticmethod
    def forward(
        ctx: Any,
        grad_out: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias_size: int | None,
        conf: tuple[_Pair, _Pair, _Pair, int],
        mask: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor, ...]:
        stride, padding, dilation, groups = conf
        grads = torch.ops.aten.convolution_backward(
            grad_out,
            x,
            weight,
            None if bias_size is None else [bias_size],
            list(stride),
            list(padding),
            list(dilation),
            False,
            _ZERO_PAD,
            groups,
            list(mask),
        )
        ctx.save_for_backward(grad_out, x, weight)
        ctx.conf = conf
        ctx.mask = mask
        ctx.set_materialize_grads(False)  # undefined incoming gradients stay None, as in ATen
        return tuple(g for g, wanted in zip(grads, mask, strict=True) if wanted)

    @staticmethod
    def backward(ctx: Any, *incoming: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        grad_out, x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        slots = iter(incoming)
        ggi, ggw, ggb = (next(slots) if wanted else None for wanted in ctx.mask)
        need_out, need_x, need_weight = (_engine_needs(t) for t in (grad_out, x, weight))
        if need_weight:
            gg_out, g_x, g_weight = torch.ops.aten._convolution_double_backward(
                ggi, ggw, ggb, grad_out, weight, x,
                list(stride), list(padding), list(dilation), False, _ZERO_PAD, groups,
                [need_out, need_x, need_weight],
            )  # fmt: skip
            return gg_out, g_x, g_weight, None, None, None
        # ATen's formulas without the weight product gW = conv(ggI^T, gO^T)^T
        if x.is_cuda:  # ATen makes these contiguous on CUDA
            weight = weight.contiguous()
            ggw = None if ggw is None else ggw.contiguous()
            grad_out = grad_out.contiguous()
        # ggO = conv(ggI, W) + conv(x, ggW) + ggb, in ATen's order
        gg_out = None
        if x.numel() != 0:
            if ggi is not None:
                gg_out = torch.ops.aten.convolution(
                    ggi, weight, None, list(stride), list(padding), list(dilation), False,
                    _ZERO_PAD, groups,
                )  # fmt: skip
            if ggw is not None:
                term = torch.ops.aten.convolution(
                    x, ggw, None, list(stride), list(padding), list(dilation), False,
                    _ZERO_PAD, groups,
                )  # fmt: skip
                gg_out = term if gg_out is None else gg_out + term
        if ggb is not None:
            shape = [1] * grad_out.dim()
            shape[1] = ggb.shape[0]
            expanded = ggb.contiguous().view(shape).expand(grad_out.shape)
            gg_out = expanded if gg_out is None else gg_out + expanded
        # gI = convT(gO, ggW), with the output padding that restores x's size
        g_x = None
        if x.numel() != 0 and ggw is not None:
            output_padding = list(_ZERO_PAD)
            for i in range(2):
                expected = (
                    (weight.shape[2 + i] - 1) * dilation[i]
                    - 2 * padding[i]
                    + (stride[i] * (grad_out.shape[2 + i] - 1) + 1)
                )
                if expected != x.shape[2 + i]:
                    output_padding[i] = x.shape[2 + i] - expected
            g_x = torch.ops.aten.convolution(
                grad_out, ggw, None, list(stride), list(padding), list(dilation), True,
                output_padding, groups,
            )  # fmt: skip
        return gg_out, g_x, None, None, None, None


class Conv2dForInversion(torch.autograd.Function):
    """``F.conv2d`` (the same ATen ``convolution`` call) whose backward is
    :class:`_Conv2dBackward`."""

    @staticmethod
    def forward(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: _Pair,
        padding: _Pair,
        dilation: _Pair,
        groups: int,
    ) -> torch.Tensor:
        out: torch.Tensor = torch.ops.aten.convolution(
            x, weight, bias, list(stride), list(padding), list(dilation), False, _ZERO_PAD, groups
        )
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.bias_size = None if bias is None else int(bias.shape[0])
        ctx.bias = bias
        ctx.set_materialize_grads(False)  # an undefined gradient stays undefined, as in ATen

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if grad_out is None:
            return None, None, None, None, None, None, None
        x, weight = ctx.saved_tensors
        mask = (
            _engine_needs(x),
            _engine_needs(weight),
            ctx.bias_size is not None and ctx.needs_input_grad[2] and _engine_needs(ctx.bias),
        )
        if not any(mask):
            return None, None, None, None, None, None, None
        grads = iter(_Conv2dBackward.apply(grad_out, x, weight, ctx.bias_size, ctx.conf, mask))
        g_x, g_weight, g_bias = (next(grads) if wanted else None for wanted in mask)
        return g_x, g_weight, g_bias, None, None, None, None


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
    out: torch.Tensor = Conv2dForInversion.apply(
        x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), int(groups)
    )
    return out


def _is_size(value: Any) -> bool:
    """A stride, padding or dilation ``_pair`` reads as ATen would: an int, or 1 or 2 ints."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return (
        isinstance(value, (tuple, list))
        and len(value) in (1, 2)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def _routable(bound: dict[str, Any]) -> bool:
    """Whether a ``conv2d`` call goes through :class:`Conv2dForInversion`. Everything this
    function does not cover keeps PyTorch's own path: unbatched or complex inputs, string
    padding (``"same"``), sizes given other than as ints, autocast (which ``F.conv2d`` applies
    and ``aten.convolution`` would not), forward-mode AD and ``torch.func`` transforms (the
    custom functions define neither ``jvp`` nor ``vmap``)."""
    x, weight = bound.get("input"), bound.get("weight")
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    if x.dim() != 4 or weight.dim() != 4 or not x.is_floating_point():
        return False
    sizes = (bound.get("stride", 1), bound.get("padding", 0), bound.get("dilation", 1))
    groups = bound.get("groups", 1)
    if not all(_is_size(v) for v in sizes) or isinstance(groups, bool):
        return False
    if not isinstance(groups, int):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return False
    transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return not (transforms_active is None or transforms_active())


_CONV2D: tuple[Callable[..., torch.Tensor], ...] = (torch.conv2d, torch.nn.functional.conv2d)
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


class ExactInversionConvolutions(TorchFunctionMode):
    """Within this context every ``conv2d`` on a 4-D input with numeric padding runs through
    :class:`Conv2dForInversion` (bit-identical values, fewer products; see the module
    docstring); anything else (string padding such as ``"same"``, unbatched inputs, other
    operators) is left alone. Enter it afresh for each graph: it keeps one view per leaf
    weight."""

    def __init__(self) -> None:
        super().__init__()
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _askable(self, t: torch.Tensor) -> torch.Tensor:
        """A leaf weight that requires a gradient enters through one identity view per context
        (same storage and strides, so the same kernels run): the engine can say whether a
        gradient reaches a non-leaf tensor's node, but not a leaf's during
        ``torch.autograd.grad``. One view per context, so that several uses of a shared weight
        still accumulate in one place, in the order PyTorch would."""
        if not t.requires_grad or t.grad_fn is not None or not torch.is_grad_enabled():
            return t
        cached = self._views.get(id(t))
        if cached is None or cached[0] is not t:
            cached = (t, t.view_as(t))
            self._views[id(t)] = cached
        return cached[1]

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
            if _routable(bound):
                bias = bound.get("bias")
                return conv2d_for_inversion(
                    bound["input"],
                    self._askable(bound["weight"]),
                    None if bias is None else self._askable(bias),
                    bound.get("stride", 1),
                    bound.get("padding", 0),
                    bound.get("dilation", 1),
                    bound.get("groups", 1),
                )
        return func(*args, **kwargs)


@contextlib.contextmanager
def exact_convolutions(mode: ExactConvolutions) -> Iterator[None]:
    """Inversions run inside use the exact convolution mode per ``mode``.

    Args:
        mode: ``"auto"`` (the default outside any such context): on CPUs only, the mode not
            being verified on CUDA yet; ``"on"``: on every device (an opt-in on CUDA);
            ``"off"``: PyTorch's own double backward everywhere.

    Raises:
        ValueError: ``mode`` is none of the three.

    Example:
        >>> with exact_convolutions("off"):
        ...     pass  # dummy gradients computed here use PyTorch's own path
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"exact_convolutions must be 'auto', 'on' or 'off', not {mode!r}")
    token = _POLICY.set(mode)
    try:
        yield
    finally:
        _POLICY.reset(token)


def uses_exact_convolutions(device: torch.device) -> bool:
    """Whether inversions on ``device`` use the exact mode under the current policy
    (:func:`exact_convolutions`); says once per device when CUDA is opted in unverified."""
    mode = _POLICY.get()
    if mode == "off" or (mode == "auto" and device.type != "cpu"):
        return False
    if device.type != "cpu" and str(device) not in _warned_devices:
        _warned_devices.add(str(device))
        log.warning(
            "exact_convolutions='on' on %s: not yet verified against PyTorch's own path on "
            "this kind of device (benchmarks/gpu_check.py checks it)",
            device,
        )
    return True


def inversion_convolutions(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """:class:`ExactInversionConvolutions` for a model with ``nn.Conv2d`` layers where the
    policy allows it (:func:`uses_exact_convolutions`), otherwise a no-op context: the mode
    intercepts every torch call made under it, which costs an MLP about 5 % of an attack
    iteration for nothing. (A model that calls ``F.conv2d`` without an ``nn.Conv2d`` module
    simply keeps PyTorch's own double backward.)"""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    if any(isinstance(m, nn.Conv2d) for m in model.modules()) and uses_exact_convolutions(device):
        return ExactInversionConvolutions()
    return contextlib.nullcontext()

"""Fused CPU kernels (oneDNN) with a plain-PyTorch fallback, and weights derived on demand.

oneDNN runs a convolution with its activation (or a residual addition) in one pass over
channels-last memory: on this project's reference CPU a 1x1 convolution + GELU at 256 x 256 took
less than half the time of ``F.gelu(F.conv2d(x))`` in NCHW. These ops are PyTorch internals (the
ones ``torch.compile`` emits), so every call site checks :func:`fused_conv_available` and falls
back to the plain ops, which also serve CUDA and MPS.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.speed.twin import FastTwin

if TYPE_CHECKING:
    from napari_sam.speed.int8 import DynamicInt8Linear

__all__ = [
    "DerivedWeights",
    "FusedLinear",
    "LinearFactory",
    "autocast",
    "conv2d",
    "fold_batch_norm",
    "fused_conv_available",
    "fused_linear_available",
]

Activation = str | None  # "gelu" or None
# float Linear -> its twin (``X.from_exact``); both twins share the layer's weight and bias.
LinearFactory = Callable[[nn.Linear], "FusedLinear | DynamicInt8Linear"]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@functools.cache
def fused_conv_available() -> bool:
    """Whether oneDNN's fused convolution ops exist and compute what the plain ops compute."""
    try:
        op = torch.ops.mkldnn._convolution_pointwise
        x = torch.linspace(-2, 2, 2 * 4 * 3 * 3).reshape(1, 8, 3, 3)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.linspace(-1, 1, 8 * 8).reshape(8, 8, 1, 1)
        b = torch.linspace(-0.5, 0.5, 8)
        with torch.no_grad():
            y = op(x, w, b, [0, 0], [1, 1], [1, 1], 1, "gelu", [], "none")
            z = op.binary(x, x, w, b, [0, 0], [1, 1], [1, 1], 1, "add", None, None, [], None)
        ok_act = torch.allclose(y, F.gelu(F.conv2d(x, w, b)), atol=1e-5)
        ok_add = torch.allclose(z, x + F.conv2d(x, w, b), atol=1e-5)
        return bool(torch.backends.mkldnn.is_available() and ok_act and ok_add)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def fused_linear_available() -> bool:
    """Whether oneDNN's fused linear op exists and computes what ``F.linear`` computes."""
    try:
        x = torch.linspace(-2, 2, 3 * 8).reshape(3, 8)
        w = torch.linspace(-1, 1, 5 * 8).reshape(5, 8)
        b = torch.linspace(-0.5, 0.5, 5)
        with torch.no_grad():
            y = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
        ok = torch.allclose(y, F.gelu(F.linear(x, w, b)), atol=1e-5)
        return bool(torch.backends.mkldnn.is_available() and ok)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class FusedLinear(FastTwin):
    """``act(x W^T + b)``: oneDNN adds the bias (and GELU) inside the GEMM on a CPU.

    ``F.linear`` first copies the bias into every row of the output and then accumulates the
    product onto it; for the narrow layers of TinyViT that copy cost as much as the product.
    Made with ``FusedLinear.from_exact(linear)``: shares ``weight`` and ``bias`` with it.
    """

    exact_type = nn.Linear
    # Shared with the exact layer by from_exact; declared for type checkers.
    weight: torch.Tensor
    bias: torch.Tensor | None
    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor, activation: Activation = None) -> torch.Tensor:
        """``x W^T + b``, then the optional ``"gelu"``."""
        if x.device.type == "cpu" and x.dtype == torch.float32 and fused_linear_available():
            attr = "gelu" if activation == "gelu" else "none"
            return torch.ops.mkldnn._linear_pointwise(
                x, self.weight, self.bias, attr, [], "none" if attr == "gelu" else ""
            )
        y = F.linear(x, self.weight, self.bias)
        return torch.ops.aten.gelu_(y) if activation == "gelu" else y

    def extra_repr(self) -> str:
        """What ``print(module)`` shows."""
        return f"in_features={self.in_features}, out_features={self.out_features}, fused"


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    activation: Activation = None,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(conv(x) + add)`` in one oneDNN call where possible (CPU, float32, channels-last).

    ``add`` and ``activation`` are not fused together (oneDNN's binary-then-unary path is not
    exposed); with both, the activation runs as a separate op.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and fused_conv_available():
        op = torch.ops.mkldnn._convolution_pointwise
        geometry = ([padding] * 2, [stride] * 2, [1, 1], groups)
        x = x.contiguous(memory_format=torch.channels_last)
        if add is not None:
            add = add.contiguous(memory_format=torch.channels_last)
            y = op.binary(x, add, weight, bias, *geometry, "add", None, None, [], None)
            return F.gelu(y) if activation == "gelu" else y
        attr = "gelu" if activation == "gelu" else "none"
        return op(x, weight, bias, *geometry, attr, [], "none" if attr == "gelu" else "")
    y = F.conv2d(x, weight, bias, stride=stride, padding=padding, groups=groups)
    if add is not None:
        y = y + add
    return F.gelu(y) if activation == "gelu" else y


def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equal to ``bn(conv(x))`` in eval mode."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ValueError("a batch norm without running statistics cannot be folded")
    scale = bn.weight / torch.sqrt(var + bn.eps)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias - mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight.detach(), bias.detach()


class DerivedWeights:
    """Tensors computed from a module's parameters and buffers, recomputed when they change.

    The key is every source tensor's storage pointer and in-place version counter, so loading
    a state dict (in place) or moving the model invalidates the derived copy. Inference tensors
    (parameters made under ``torch.inference_mode``) have no version counter: for them only a
    new storage (moving the model, or assigning new parameters) invalidates it.

    Parameters
    ----------
    sources : callable
        Returns the tensors the result depends on (None for an absent one, e.g. no bias).
    compute : callable
        Computes the derived tensors from nothing (reads the module itself).
    """

    def __init__(
        self,
        sources: Callable[[], Sequence[torch.Tensor | None]],
        compute: Callable[[], tuple[torch.Tensor, ...]],
    ) -> None:
        self._sources = sources
        self._compute = compute
        self._key: tuple | None = None
        self._value: tuple[torch.Tensor, ...] | None = None

    def get(self) -> tuple[torch.Tensor, ...]:
        """The derived tensors, recomputed first if a source changed since the last call."""
        key = tuple(
            (t.data_ptr(), None if t.is_inference() else t._version, t.device)
            for t in self._sources()
            if t is not None
        )
        if self._value is None or key != self._key:
            with torch.no_grad():
                self._value = self._compute()
            self._key = key
        return self._value

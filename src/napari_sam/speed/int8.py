"""Linear layers with int8 weights and activations quantised on the fly (dynamic quantisation).

On a CPU with VNNI (``vpdpbusd``) an int8 matrix product does four times the work of a float32
one per instruction; with the quantisation of the activations included, a ``Linear`` of the ViT
runs about twice as fast. Weights are quantised symmetrically per output channel, activations
per tensor at every call (asymmetric, 8 bits), accumulation is exact in int32.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from napari_sam.speed.kernels import DerivedWeights
from napari_sam.speed.twin import FastTwin

__all__ = ["DynamicInt8Linear", "int8_available"]


@functools.cache
def int8_available() -> bool:
    """Whether this torch build runs :class:`DynamicInt8Linear` (CPU int8 kernels) correctly."""
    try:
        # Outside inference mode, so that a first call made under it does not fail (and cache
        # False) for a reason that has nothing to do with the kernels.
        with torch.inference_mode(False):
            return _int8_probe()
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _int8_probe() -> bool:
    """A 16 -> 8 layer in int8 agrees with its float32 self (raises where the kernels fail)."""
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight.copy_(torch.linspace(-1, 1, 128).reshape(8, 16))
        linear.bias.copy_(torch.linspace(-0.5, 0.5, 8))
        x = torch.linspace(-3, 3, 48).reshape(3, 16)
        y = DynamicInt8Linear.from_exact(linear)(x)
        return bool(torch.allclose(y, linear(x), atol=0.05))


def _pack_engine() -> str:
    # oneDNN's dynamic int8 GEMM measured ~20 % faster than fbgemm's on AVX-512 VNNI here.
    engines = torch.backends.quantized.supported_engines
    for engine in ("onednn", "x86", "fbgemm"):
        if engine in engines:
            return engine
    raise RuntimeError("this torch build has no CPU int8 engine (onednn, x86 or fbgemm)")


@contextlib.contextmanager
def _quantized_engine(engine: str) -> Iterator[None]:
    # The engine is global torch state, read only while packing (the packed weights remember
    # their kernel), so it is restored right away.
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def has_vnni() -> bool:
    """Whether the CPU multiplies int8 without int16 saturation (AVX-512 VNNI / AVX-VNNI)."""
    try:
        return bool(torch.cpu._is_vnni_supported())
    except (AttributeError, RuntimeError):
        return False


class DynamicInt8Linear(FastTwin):
    """``y = x W^T + b`` with ``W`` in int8 (per output channel) and ``x`` quantised per call.

    Made with ``DynamicInt8Linear.from_exact(linear, reduce_range=None)`` from a float
    ``nn.Linear`` on the CPU. Shares ``weight`` and ``bias`` with it, so its state dict is that
    layer's; the packed int8 copy is rebuilt when the float weights change in place.
    """

    exact_type = nn.Linear
    # Shared with the exact layer by from_exact; declared for type checkers.
    weight: torch.Tensor
    bias: torch.Tensor | None
    in_features: int
    out_features: int

    def speed_up(self, exact: nn.Linear, reduce_range: bool | None = None) -> None:
        """Pack the int8 weights.

        Parameters
        ----------
        exact : nn.Linear
            The float layer (CPU).
        reduce_range : bool or None
            Quantise activations to 7 bits, which CPUs without VNNI need (their 8-bit
            multiply-add saturates in int16). None: decide from the CPU.
        """
        self.reduce_range = (not has_vnni()) if reduce_range is None else bool(reduce_range)
        sources = (
            (lambda: (self.weight,)) if self.bias is None else (lambda: (self.weight, self.bias))
        )
        self._packed = DerivedWeights(sources, self._pack)
        self._packed.get()

    def _pack(self) -> tuple:
        w = self.weight.detach().float().cpu()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        bias = None if self.bias is None else self.bias.detach().float().cpu()
        with warnings.catch_warnings(), _quantized_engine(_pack_engine()):
            # Quantised tensors are deprecated in recent torch, but they are still the only
            # public route to its CPU int8 GEMM kernels; int8_available() guards their removal.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
            return (torch.ops.quantized.linear_prepack(qweight, bias),)

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """``x W^T + b`` in int8 arithmetic, then the optional ``"gelu"``."""
        (packed,) = self._packed.get()
        y = torch.ops.quantized.linear_dynamic(x.float(), packed, self.reduce_range)
        # In place: a fresh tensor of this size costs more in page faults than the GELU.
        return torch.ops.aten.gelu_(y) if activation == "gelu" else y

    def extra_repr(self) -> str:
        """What ``print(module)`` shows."""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"

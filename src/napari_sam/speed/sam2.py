"""The bfloat16 fast path of SAM 2 (:class:`FastSam2`): tracking at bf16 GEMM rates.

SAM 2's time on a CPU is GEMMs (the Hiera trunk's and the memory attention's Linear layers,
57 % of a tracking step) and flash attention (25 %), both float32 in the exact model and
both about 3x faster in bfloat16 on CPUs with AMX (see docs/performance.md). The twin runs
its two heavy parts under ``torch.autocast(bfloat16)``:

- the image encoder (Hiera trunk + FPN neck, and the decoder's two high-resolution
  projections that :meth:`~napari_sam.models.sam2.sam2.Sam2.forward_image` applies);
- the memory attention.

The prompt encoder + mask decoder and the memory encoder stay float32: together they are
under 10 % of a step, and in bf16 the decoder measured 1.06x (512 px) to 1.2x (1024 px) and the
memory encoder 0.9x (slower: small convolutions, where the casts cost more than the products
gain), so the mask logits are computed in float32 from the (bf16-computed) features.

Autocast puts only the matrix products (linear, convolution, matmul, SDPA) in bfloat16:
normalisations, softmax statistics, sigmoid and the residual sums stay float32 (a bf16
product added to a float32 residual is float32). Every tensor a part returns is cast back to
float32, so everything the caller keeps (features in a cache, memories, object pointers, mask
logits) is float32 as with the exact model; memories are then stored in bfloat16 by the
tracker as SAM 2 itself does, whatever the precision.

The twin shares the exact model's parameters (:mod:`napari_sam.speed.twin`) and names its
numerics in :attr:`FastSam2.encoder_settings`, which joins every feature-cache key (memory and
disk), so features of the two precisions never mix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from napari_sam.models.sam2.sam2 import Sam2
from napari_sam.speed.twin import FastTwin

__all__ = ["SAM2_FAST_PATH_VERSION", "FastSam2"]

# Part of the cache key of bf16 features: bump it when this module's numerics change.
SAM2_FAST_PATH_VERSION = 1


def _to_float(value: Any) -> Any:
    """``value`` with every floating tensor in it (nested lists, tuples, dicts) as float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _to_float(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float(v) for v in value)
    return value


class FastSam2(FastTwin, Sam2):
    """A :class:`~napari_sam.models.sam2.sam2.Sam2` whose heavy parts run in bfloat16.

    Made by :func:`napari_sam.speed.optimize_sam2` (or ``with_precision(model, "bf16")``),
    or ``FastSam2.from_exact(model)`` (which does not check the CPU's flags). Same interface,
    same state dict (the exact model's parameters), float32 outputs.

    Attributes
    ----------
    precision : str
        ``"bf16"``.
    encoder_settings : str
        ``"sam2-fast-v1-bf16"``: joins feature-cache keys.
    """

    exact_type = Sam2
    precision: str
    encoder_settings: str

    def speed_up(self, exact: Sam2, precision: str = "bf16") -> None:
        """Set the precision (only ``"bf16"``: float32 is the exact model itself)."""
        if precision != "bf16":
            raise ValueError(f"FastSam2 runs bfloat16 only, got {precision!r}")
        self.precision = precision
        self.encoder_settings = f"sam2-fast-v{SAM2_FAST_PATH_VERSION}-{precision}"

    @contextlib.contextmanager
    def _lower(self) -> Iterator[None]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            yield

    def forward_image(self, img_batch: torch.Tensor) -> dict[str, Any]:
        """As :meth:`Sam2.forward_image`, encoded in bfloat16; float32 outputs."""
        with self._lower():
            out = super().forward_image(img_batch)
        return _to_float(out)

    def _prepare_memory_conditioned_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # The memory attention; the memories come in as stored (bfloat16) or float32 and
        # autocast casts them for the products either way.
        with self._lower():
            out = super()._prepare_memory_conditioned_features(*args, **kwargs)
        return out.float()

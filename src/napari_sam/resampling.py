"""Separable linear resampling as sparse taps: each output sample reads a few input samples.

A bilinear (or antialiased) resize, a crop, a pad or a block average along one axis is a linear
operator, an ``n_out x n_in`` matrix with a narrow band of non-zeros. Stored as per-output
``(index, weight)`` taps, applying it picks whole rows (memory copies) instead of multiplying
by a mostly-zero matrix. Used for masks and logits, never for images.
"""

from __future__ import annotations

import torch

__all__ = ["apply_rows", "operator_taps"]


def operator_taps(operator: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-zeros of a banded ``n_out x n_in`` operator as taps.

    Returns
    -------
    index : Tensor, shape (n_out, T), int64
        Input positions read by each output position (``T`` = most non-zeros in a row).
    weight : Tensor, shape (n_out, T), float32
        Their weights (0 for padding taps).
    """
    nonzero = operator != 0
    taps = max(int(nonzero.sum(dim=1).max()), 1)
    # Non-zero columns first (stable), then zero columns as padding taps of weight 0.
    order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :taps]
    return order, torch.gather(operator.float(), 1, order)


def apply_rows(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Resample axis ``-2`` of ``x`` (``... x n_in x W``) with taps -> ``... x n_out x W``.

    Axis -2 is the one whose samples are whole contiguous rows; resample the last axis by
    applying this to the transposed (contiguous) array.
    """
    out = None
    for t in range(index.shape[1]):
        term = x.index_select(-2, index[:, t]).mul_(weight[:, t, None])
        out = term if out is None else out.add_(term)
    if out is None:
        raise ValueError("index has no taps (shape n_out x 0); use operator_taps to build it")
    return out

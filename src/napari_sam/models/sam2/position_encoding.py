"""Sine position encodings of SAM 2: 2-D for feature maps, 1-D for object-pointer distances.

Unlike SAM's random Fourier features these are fixed (no weights): the transformer-style
geometric frequency ladder applied to normalised row and column indices.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "sine_encoding_1d"]


def _frequencies(n: int, temperature: float, device: torch.device) -> torch.Tensor:
    """Divisors ``temperature ** (2 floor(i / 2) / n)`` for ``i < n``, equal in pairs."""
    i = torch.arange(n, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / n)


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine encoding of a feature map's grid.

    Half of the channels encode the row, half the column; within each half, even channels
    are sines and odd channels cosines of the position over a geometric ladder of
    wavelengths. Positions are 1-based and, with ``normalize``, scaled to ``(0, scale]``.

    Parameters
    ----------
    num_pos_feats : int
        Channels of the encoding (even).
    temperature : float
        Longest wavelength factor.
    normalize : bool
        Divide positions by the grid side before scaling.
    scale : float or None
        Range of normalised positions (``2 pi`` when None).
    """

    def __init__(
        self,
        num_pos_feats: int,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("a scale needs normalize=True")
        self.num_pos_feats = num_pos_feats // 2
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        # Memoised per grid: the encoding depends on the grid size only. Not a buffer, so it
        # never enters the state dict.
        self._cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def _axis(self, n: int, device: torch.device) -> torch.Tensor:
        """Encoding of positions ``1..n`` along one axis: ``n x num_pos_feats``."""
        pos = torch.arange(1, n + 1, dtype=torch.float32, device=device)
        if self.normalize:
            pos = pos / (n + 1e-6) * self.scale
        angles = pos[:, None] / _frequencies(self.num_pos_feats, self.temperature, device)
        out = torch.empty_like(angles)
        out[:, 0::2] = angles[:, 0::2].sin()
        out[:, 1::2] = angles[:, 1::2].cos()
        return out

    def encoding(self, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ``2 num_pos_feats x h x w`` encoding (rows first, then columns)."""
        device = torch.device(device)
        key = (h, w, device)
        pe = self._cache.get(key)
        if pe is None:
            ys = self._axis(h, device)  # h x F
            xs = self._axis(w, device)  # w x F
            f = self.num_pos_feats
            pe = torch.cat(
                [ys.T[:, :, None].expand(f, h, w), xs.T[:, None, :].expand(f, h, w)], dim=0
            ).contiguous()
            self._cache[key] = pe
        return pe

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encoding for a ``B x C x h x w`` map: ``B x 2 num_pos_feats x h x w`` float32."""
        b, _, h, w = x.shape
        return self.encoding(h, w, x.device).unsqueeze(0).expand(b, -1, -1, -1)


def sine_encoding_1d(positions: torch.Tensor, dim: int, temperature: float = 10000) -> torch.Tensor:
    """Sine encoding of scalar positions: ``N`` -> ``N x dim``, sines then cosines.

    Parameters
    ----------
    positions : Tensor
        ``N`` positions (SAM 2: frame distances over the pointer window).
    dim : int
        Output channels (even).
    temperature : float
        Longest wavelength factor.
    """
    half = dim // 2
    angles = positions.to(torch.float32)[:, None] / _frequencies(
        half, temperature, positions.device
    )
    return torch.cat([angles.sin(), angles.cos()], dim=-1)

"""Attention with 2-D axial rotary position encoding (RoPE), as in SAM 2's memory attention.

Query and key channels are taken in adjacent pairs (complex numbers) and each pair is rotated
by an angle proportional to the token's column (first half of the pairs) or row (second
half), over a geometric ladder of frequencies. Rotations make the dot product depend on
relative position. Memory keys cover several frames of the same grid: the rotation repeats
for each frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from napari_sam.models.transformer import Attention

__all__ = ["RoPEAttention", "axial_rope_angles", "rotate_pairs"]

_Key = tuple[int, int, torch.device]


def axial_rope_angles(
    head_dim: int, side_x: int, side_y: int, theta: float = 10000.0
) -> torch.Tensor:
    """Rotation angles of a ``side_y x side_x`` grid (row-major tokens).

    Returns
    -------
    Tensor
        ``(side_x side_y) x head_dim / 2``: per token, ``head_dim / 4`` column angles then
        ``head_dim / 4`` row angles.
    """
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head width divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 4)[:quarter].float() / head_dim)
    t = torch.arange(side_x * side_y, dtype=torch.float32)
    t_x = t % side_x
    t_y = torch.div(t, side_x, rounding_mode="floor")
    return torch.cat([torch.outer(t_x, freqs), torch.outer(t_y, freqs)], dim=-1)


def rotate_pairs(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` (``... x N x D``) by ``rotation``.

    ``rotation`` holds unit complex numbers (``N x D/2``); pair (a, b) is the complex a + ib,
    multiplied. In float32, returned in ``x``'s dtype; one complex product is ~20x faster
    than the four real ones.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


class RoPEAttention(Attention):
    """:class:`~napari_sam.models.transformer.Attention` with axial RoPE on queries and keys.

    The query grid must be square (SAM 2's feature maps are). Keys are either the same grid
    (self-attention) or, with ``rope_k_repeat``, several frames of it followed by
    ``num_k_exclude_rope`` tokens that are not rotated (object pointers).

    Parameters
    ----------
    embedding_dim, num_heads, downsample_rate, kv_in_dim :
        As for :class:`~napari_sam.models.transformer.Attention`.
    dropout : float
        Attention dropout while training.
    rope_theta : float
        Base of the frequency ladder.
    rope_k_repeat : bool
        Keys hold whole frames of the query grid, rotated alike frame by frame.
    feat_sizes : (int, int)
        Expected ``(width, height)`` of the query grid; a grid of another token count is
        taken as square.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        dropout: float = 0.0,
        kv_in_dim: int | None = None,
        rope_theta: float = 10000.0,
        rope_k_repeat: bool = False,
        feat_sizes: tuple[int, int] = (64, 64),
    ) -> None:
        super().__init__(embedding_dim, num_heads, downsample_rate, kv_in_dim=kv_in_dim)
        self.dropout_p = dropout
        self.rope_theta = rope_theta
        self.rope_k_repeat = rope_k_repeat
        self._head_dim = self.internal_dim // num_heads
        self.feat_sizes = tuple(feat_sizes)
        # Rotations per (token count, frames, device), computed on first use; not a buffer,
        # so never in the state dict.
        self._rotations: dict[_Key, torch.Tensor] = {}

    def _rotation(self, n: int, device: torch.device, frames: int = 1) -> torch.Tensor:
        """Unit complex rotations of ``frames`` copies of an ``n``-token grid.

        Shape ``(frames n) x head_dim / 2``.
        """
        key = (n, frames, device)
        if key not in self._rotations:
            if frames > 1:
                self._rotations[key] = self._rotation(n, device).repeat(frames, 1)
                return self._rotations[key]
            if n == self.feat_sizes[0] * self.feat_sizes[1]:
                side_x, side_y = self.feat_sizes
            else:
                side_x = side_y = math.isqrt(n)
                if side_x * side_y != n:
                    raise ValueError(f"RoPE attention needs a square token grid, got {n} tokens")
            angles = axial_rope_angles(self._head_dim, side_x, side_y, self.rope_theta)
            self._rotations[key] = torch.polar(torch.ones_like(angles), angles).to(device)
        return self._rotations[key]

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0
    ) -> torch.Tensor:
        """Attend ``q`` (``B x N x C``, a square grid) over ``k`` / ``v`` (``B x M x C_kv``).

        The last ``num_k_exclude_rope`` keys are not rotated.
        """
        q = self._split_heads(self.q_proj(q))
        k = self._split_heads(self.k_proj(k))
        v = self._split_heads(self.v_proj(v))
        n = q.shape[-2]
        q = rotate_pairs(q, self._rotation(n, q.device))
        num_rope = k.shape[-2] - num_k_exclude_rope
        if num_rope > 0:
            if num_rope != n and not (self.rope_k_repeat and num_rope % n == 0):
                raise ValueError(
                    f"{num_rope} rotated keys for {n} queries: keys must be whole frames of "
                    "the query grid (rope_k_repeat) or the grid itself"
                )
            rotation = self._rotation(n, q.device, frames=num_rope // n)
            rotated = rotate_pairs(k[:, :, :num_rope], rotation)
            k = torch.cat([rotated, k[:, :, num_rope:]], dim=2) if num_k_exclude_rope else rotated
        dropout = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        b, _, tokens, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, tokens, self.internal_dim))

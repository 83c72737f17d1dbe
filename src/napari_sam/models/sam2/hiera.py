"""Hiera trunk of SAM 2's image encoder: a four-stage windowed transformer, stride 4 to 32.

Each stage halves the token grid (max-pooled queries in its first block) and doubles width and
heads; most blocks attend within windows, a few globally. The windowed absolute position
embedding is a coarse background grid interpolated to the token grid plus one tiled window.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.models.mask_decoder import MLP

__all__ = ["Hiera", "MultiScaleAttention", "MultiScaleBlock", "PatchEmbed"]


class Hiera(nn.Module):
    """Hierarchical vision transformer returning one feature map per stage.

    Parameters
    ----------
    embed_dim : int
        Width of the first stage (96 for hiera tiny / small, 112 base+, 144 large).
    num_heads : int
        Heads of the first stage.
    stages : sequence of int
        Blocks per stage.
    global_att_blocks : sequence of int
        Indices (over all blocks) of the blocks with global attention.
    window_spec : sequence of int
        Attention window of each stage, in tokens.
    window_pos_embed_bkg_spatial_size : (int, int)
        Grid of the background position embedding.
    q_pool : int
        Number of stage transitions that pool (3: every one).
    q_stride : (int, int)
        Pooling stride at a stage transition.
    dim_mul, head_mul : float
        Width and head multipliers at a stage transition.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        stages: Sequence[int] = (2, 3, 16, 3),
        global_att_blocks: Sequence[int] = (12, 16, 20),
        window_spec: Sequence[int] = (8, 4, 14, 7),
        window_pos_embed_bkg_spatial_size: Sequence[int] = (14, 14),
        q_pool: int = 3,
        q_stride: tuple[int, int] = (2, 2),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
    ) -> None:
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError(
                f"window_spec needs one window per stage: {len(stages)} stages, "
                f"{len(window_spec)} windows"
            )
        if not 0 <= q_pool < len(stages):
            raise ValueError(f"q_pool must be in 0..{len(stages) - 1}, got {q_pool}")
        self.window_spec = tuple(window_spec)
        self.global_att_blocks = tuple(global_att_blocks)
        self.q_stride = (int(q_stride[0]), int(q_stride[1]))
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]

        self.patch_embed = PatchEmbed(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(
            torch.zeros(1, embed_dim, self.window_spec[0], self.window_spec[0])
        )

        self.blocks = nn.ModuleList()
        widths = []
        dim, heads, stage = embed_dim, num_heads, 0
        for i in range(sum(stages)):
            # A stage's first block still uses the previous stage's window: its queries are
            # pooled inside those windows.
            window = 0 if i in self.global_att_blocks else self.window_spec[stage]
            dim_out = dim
            if i - 1 in self.stage_ends:
                dim_out = int(dim * dim_mul)
                heads = int(heads * head_mul)
                stage += 1
            self.blocks.append(
                MultiScaleBlock(
                    dim=dim,
                    dim_out=dim_out,
                    num_heads=heads,
                    q_stride=self.q_stride if i in pool_blocks else None,
                    window_size=window,
                )
            )
            dim = dim_out
            widths.append(dim)
        # Widths of the outputs, lowest resolution first (the FPN neck's order).
        self.channel_list = [widths[i] for i in self.stage_ends[::-1]]
        # The interpolated position embedding of the last grid (its bicubic upsampling is
        # ~2 % of an encoder pass at 512 px), valid while both parameters are unchanged:
        # their version counters move with every in-place update (optimiser, load_state_dict).
        self._pos_cache: tuple[tuple, torch.Tensor] | None = None

    def _get_pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        h, w = hw
        window = self.pos_embed_window
        wh, ww = window.shape[-2:]
        if h % wh or w % ww:
            raise ValueError(
                f"the stride-4 token grid {h} x {w} must be a multiple of the {wh} x {ww} "
                "position-embedding window: use an image size that is a multiple of "
                f"{4 * wh}"
            )
        # Training needs the graph through the parameters: no cache then.
        cacheable = not (
            torch.is_grad_enabled() and (window.requires_grad or self.pos_embed.requires_grad)
        )
        key = (h, w, window.device, window.dtype, self.pos_embed._version, window._version)
        if cacheable and self._pos_cache is not None and self._pos_cache[0] == key:
            return self._pos_cache[1]
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")
        pos = (pos + window.tile(1, 1, h // wh, w // ww)).permute(0, 2, 3, 1)
        if cacheable:
            self._pos_cache = (key, pos)
        return pos

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode ``B x 3 x S x S`` images: one ``B x C x h x w`` map per stage.

        Highest resolution first (strides 4, 8, 16, 32; widths ``channel_list`` reversed).
        """
        x = self.patch_embed(x)
        x = x + self._get_pos_embed((int(x.shape[1]), int(x.shape[2])))
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


class PatchEmbed(nn.Module):
    """7 x 7 convolution with stride 4: image to a channels-last token grid.

    Parameters
    ----------
    embed_dim : int
        Output width.
    in_chans : int
        Image channels.
    """

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x S x S`` -> ``B x S/4 x S/4 x embed_dim``."""
        return self.proj(x).permute(0, 2, 3, 1)


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block, optionally windowed and optionally pooling its queries.

    Parameters
    ----------
    dim, dim_out : int
        Input and output width; they differ only in a stage's first block, whose shortcut is
        then projected and pooled too.
    num_heads : int
        Attention heads.
    mlp_ratio : float
        MLP hidden width over ``dim_out``.
    q_stride : (int, int) or None
        Max-pool stride of the queries (stage transitions), None for none.
    window_size : int
        Attention window in tokens; 0 for global attention.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        q_stride: tuple[int, int] | None = None,
        window_size: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.dim_out = dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.pool = nn.MaxPool2d(kernel_size=q_stride, stride=q_stride) if q_stride else None
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_pool=self.pool)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, 2, activation=nn.GELU)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x dim`` -> ``B x H' x W' x dim_out`` (halved grid when pooling)."""
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = _pool(self.proj(x), self.pool)
        h, w = shortcut.shape[1:3]
        window = self.window_size
        if window > 0:
            x, padded = _window_partition(x, window)
        x = self.attn(x)
        if window > 0:
            if self.q_stride:
                # Each window shrank with its pooled queries; the window count is unchanged.
                n_h, n_w = padded[0] // window, padded[1] // window
                window //= self.q_stride[0]
                padded = (n_h * window, n_w * window)
            x = _window_unpartition(x, window, padded, (h, w))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class MultiScaleAttention(nn.Module):
    """Multi-head attention over a ``B x H x W x C`` grid, queries optionally max-pooled.

    Parameters
    ----------
    dim, dim_out : int
        Input width and the width of queries, keys, values and output.
    num_heads : int
        Heads.
    q_pool : nn.Module or None
        Pooling applied to the query grid (the output takes its size).
    """

    def __init__(
        self, dim: int, dim_out: int, num_heads: int, q_pool: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.dim = dim
        self.dim_out = dim_out
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x dim`` -> ``B x H' x W' x dim_out`` (pooled size with ``q_pool``)."""
        b, h, w, _ = x.shape
        heads = self.num_heads
        # B x HW x 3 x heads x d -> 3 x B x heads x HW x d
        qkv = self.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.q_pool is not None:
            q = q.transpose(1, 2).reshape(b, h, w, -1)
            q = _pool(q, self.q_pool)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)


def _pool(x: torch.Tensor, pool: nn.Module | None) -> torch.Tensor:
    """Apply a 2-D pooling to a channels-last ``B x H x W x C`` tensor."""
    if pool is None:
        return x
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split ``B x H x W x C`` into ``(B n) x window x window x C`` windows.

    The grid is zero-padded at the bottom and right to whole windows; the padded size is
    returned too.
    """
    b, h, w, c = x.shape
    pad_h, pad_w = -h % window, -w % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def _window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`_window_partition`: windows back to ``B x H x W x C``, unpadded."""
    hp, wp = padded
    h, w = hw
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w] if (hp > h or wp > w) else x

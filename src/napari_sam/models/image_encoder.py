"""The ViT image encoder of SAM (vit_b, vit_l, vit_h).

A plain ViT with 16 x 16 patches, an absolute position embedding, windowed attention in most
blocks and global attention in a few, decomposed relative-position terms in every attention,
and a convolutional neck down to 256 channels. Attention runs through
:func:`torch.nn.functional.scaled_dot_product_attention`; the relative-position terms enter it
as an additive float mask, which is mathematically the reference's "add to the logits".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.models.common import LayerNorm2d, MLPBlock

# Largest relative-position bias built at once, in elements (128 MB in float32).
MAX_BIAS_ELEMENTS = 2**25

__all__ = [
    "Attention",
    "Block",
    "ImageEncoderViT",
    "PatchEmbed",
    "decomposed_rel_pos_bias",
    "relative_position_table",
    "window_partition",
    "window_unpartition",
]


class ImageEncoderViT(nn.Module):
    """ViT backbone plus neck: ``B x 3 x S x S`` image -> ``B x out_chans x S/16 x S/16``.

    Parameters
    ----------
    img_size : int
        Side ``S`` of the square input in pixels; a multiple of ``patch_size``.
    patch_size : int
        Side of the square patches (and stride of the patch embedding).
    in_chans : int
        Input channels.
    embed_dim, depth, num_heads : int
        Width, number of blocks and attention heads of the ViT.
    mlp_ratio : float
        Hidden width of each block's MLP relative to ``embed_dim``.
    out_chans : int
        Channels of the output embedding.
    qkv_bias : bool
        Whether the query/key/value projection has a bias.
    norm_layer, act_layer : type of nn.Module
        Normalisation and activation classes of the blocks.
    use_abs_pos : bool
        Add a learned absolute position embedding (``pos_embed``, ``1 x S/16 x S/16 x C``).
    use_rel_pos : bool
        Add decomposed relative-position terms to every attention.
    rel_pos_zero_init : bool
        Kept for signature compatibility; relative-position tables start at zero either way.
    window_size : int
        Side of the attention windows in patches, for the blocks not listed in
        ``global_attn_indexes``.
    global_attn_indexes : sequence of int
        Indexes of the blocks that attend over the whole ``S/16 x S/16`` grid.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        rel_pos_zero_init: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(
                f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})"
            )
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} are outside the {depth} blocks")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))

        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``B x in_chans x img_size x img_size``."""
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"image encoder expects a B x {expected[0]} x {expected[1]} x {expected[2]} "
                f"tensor (preprocess the image with Sam.preprocess first), got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode normalised ``B x in_chans x S x S`` input to ``B x out_chans x S/16 x S/16``."""
        self.check_input(x)
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: ``B x C x H x W`` -> ``B x H/p x W/p x embed_dim``."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` image -> ``B x H/p x W/p x embed_dim`` tokens."""
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block on a ``B x H x W x C`` grid, windowed when ``window_size > 0``.

    Parameters
    ----------
    dim, num_heads : int
        Width and attention heads.
    mlp_ratio : float
        MLP hidden width relative to ``dim``.
    qkv_bias : bool
        Bias in the query/key/value projection.
    norm_layer, act_layer : type of nn.Module
        Normalisation and activation classes.
    use_rel_pos : bool
        Add decomposed relative-position terms.
    window_size : int
        Window side in tokens; 0 means global attention over ``input_size``.
    input_size : (int, int)
        Token grid of the whole image, which sizes the relative-position tables of a global
        block.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] = (64, 64),
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x dim`` tokens -> the same shape."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            x, padded_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded_hw, hw)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention on a ``B x H x W x C`` grid with decomposed relative positions.

    Parameters
    ----------
    dim, num_heads : int
        Width and number of heads (``dim`` divisible by ``num_heads``).
    qkv_bias : bool
        Bias in the joint query/key/value projection.
    use_rel_pos : bool
        Learn ``rel_pos_h`` (``2 * H - 1 x head_dim``) and ``rel_pos_w`` tables.
    input_size : (int, int)
        Grid ``(H, W)`` the tables are sized for.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] = (14, 14),
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over all ``H x W`` tokens of ``B x H x W x dim``; same shape out."""
        b, h, w, c = x.shape
        # b x n x (3 heads head_dim) -> 3 x b x heads x n x head_dim
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # SDPA's fused CPU kernels take 4-D (batch x heads x N x head_dim) inputs only; 3-D
        # inputs fall back to the unfused path, 3-6x slower. So heads stay a separate axis.
        q, k, v = qkv.reshape(3, 1, b * self.num_heads, h * w, -1).unbind(0)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # The bias is (heads x N x N) per image: 1 GB for a ViT-H global block at 1024 px.
            # Building it for a few heads at a time bounds the peak memory, for any batch size.
            n = h * w
            step = max(1, MAX_BIAS_ELEMENTS // (n * n))
            chunks = []
            for start in range(0, b * self.num_heads, step):
                sl = slice(start, start + step)
                qs, ks, vs = q[:, sl], k[:, sl], v[:, sl]
                bias = decomposed_rel_pos_bias(qs, self.rel_pos_h, self.rel_pos_w, (h, w))
                chunks.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias))
            out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
        out = out.reshape(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        return self.proj(out)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cut a ``B x H x W x C`` grid into ``window_size`` squares, zero-padding bottom/right.

    Returns
    -------
    windows : Tensor
        ``(B * n_windows) x window_size x window_size x C``, row-major over the windows.
    padded_hw : (int, int)
        Grid size after padding, needed by :func:`window_unpartition`.
    """
    b, h, w, c = x.shape
    pad_h = -h % window_size
    pad_w = -w % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor,
    window_size: int,
    padded_hw: tuple[int, int],
    hw: tuple[int, int],
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: reassemble windows and drop the padding."""
    hp, wp = padded_hw
    h, w = hw
    nh, nw = hp // window_size, wp // window_size
    b = windows.shape[0] // (nh * nw)
    x = windows.view(b, nh, nw, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def relative_position_table(rel_pos: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """Look up the embedding of every (query, key) offset along one axis.

    Parameters
    ----------
    rel_pos : Tensor
        ``L x C`` table indexed by offset; resampled linearly when ``L`` is not
        ``2 * max(q_size, k_size) - 1``.
    q_size, k_size : int
        Number of query and key positions along the axis.

    Returns
    -------
    Tensor
        ``q_size x k_size x C``.
    """
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.T[None], size=length, mode="linear")[0].T
    # Offsets in the frame of the longer axis, so queries and keys of unequal counts align.
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    offsets = q_coords - k_coords + (k_size - 1) * k_scale
    return rel_pos[offsets.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """Additive attention bias of decomposed relative positions (MViTv2), for SDPA.

    The logit between query ``(i, j)`` and key ``(k, l)`` gains ``q_ij . Rh[i, k]`` plus
    ``q_ij . Rw[j, l]``, computed with the unscaled query as in SAM.

    Parameters
    ----------
    q : Tensor
        Queries, ``... x (H * W) x head_dim`` (any leading batch/head axes).
    rel_pos_h, rel_pos_w : Tensor
        Relative-position tables of the height and width axes.
    size : (int, int)
        Grid ``(H, W)`` of queries and keys.

    Returns
    -------
    Tensor
        ``... x (H * W) x (H * W)``, dtype of ``q``.
    """
    h, w = size
    rh = relative_position_table(rel_pos_h, h, h).to(q.dtype)
    rw = relative_position_table(rel_pos_w, w, w).to(q.dtype)
    lead = q.shape[:-2]
    grid_q = q.reshape(*lead, h, w, q.shape[-1])
    rel_h = torch.einsum("...hwc,hkc->...hwk", grid_q, rh)
    rel_w = torch.einsum("...hwc,wkc->...hwk", grid_q, rw)
    bias = rel_h[..., :, None] + rel_w[..., None, :]
    return bias.reshape(*lead, h * w, h * w)

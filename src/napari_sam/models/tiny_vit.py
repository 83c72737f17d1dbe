"""TinyViT image encoder of MobileSAM (``vit_t``).

A convolutional stem and an MBConv stage at 1/4 resolution, then three stages of windowed
self-attention with learned relative-position biases and a depthwise "local" convolution. Patch
merging halves the grid between stages except into the last one (stride 1), so the output grid is
``img_size // 16`` on a side, the same as SAM's ViT encoders, and the same neck maps it to 256
channels.

Attribute names are the keys of MobileSAM's checkpoint (``mobile_sam.pt``, prefix
``image_encoder.``). That checkpoint also holds an ImageNet classifier head (``norm_head``,
``head``) that SAM never uses; it is not built here and the weight loader drops those keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d

__all__ = ["TinyViT"]


class DropPath(nn.Module):
    """Stochastic depth: zero a whole residual branch per sample while training.

    Parameters
    ----------
    drop_prob : float
        Probability of dropping the branch for one sample; kept samples are scaled by
        ``1 / (1 - drop_prob)`` so that the expectation is unchanged.
    """

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def _drop_path(prob: float) -> nn.Module:
    # Identity when disabled keeps the module tree identical to MobileSAM's.
    return DropPath(prob) if prob > 0.0 else nn.Identity()


class Conv2dBN(nn.Module):
    """Convolution without bias followed by BatchNorm (checkpoint keys ``c`` and ``bn``).

    Parameters
    ----------
    in_chans, out_chans : int
        Channels in and out.
    kernel_size, stride, padding, groups : int
        As for :class:`torch.nn.Conv2d`.
    bn_weight_init : float
        Initial BatchNorm scale; 0 makes a residual branch start as the identity.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(
            in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x))


class PatchEmbed(nn.Module):
    """Stem: two stride-2 3x3 convolutions, ``B x in_chans x S x S -> B x C x S/4 x S/4``."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, 3, 2, 1),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU.

    Works on ``B x C x H x W``.
    """

    def __init__(self, dim: int, expand_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden, 1)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, dim, 1, bn_weight_init=0.0)
        self.act3 = nn.GELU()
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(x + self.drop_path(y))


class PatchMerging(nn.Module):
    """Change width and (optionally) halve the grid between stages, ``B x C x H x W`` in and out.

    Parameters
    ----------
    dim, out_dim : int
        Channels in and out.
    stride : int
        2 halves the grid; MobileSAM uses 1 into its last stage to keep a 1/16 output grid.
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim, 1)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x)


class ConvLayer(nn.Module):
    """First stage: MBConv blocks, then patch merging. ``B x C x H x W`` in and out."""

    def __init__(
        self,
        dim: int,
        depth: int,
        drop_path: Sequence[float],
        expand_ratio: float,
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio, drop_path[i]) for i in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


def relative_offset_index(window_size: int) -> torch.Tensor:
    """Index of the attention bias shared by each pair of positions in a square window.

    Pairs with the same absolute offset ``(|dy|, |dx|)`` share one bias; offset ``(dy, dx)`` has
    index ``dy * window_size + dx``, which is the order in which MobileSAM's checkpoint stores
    them (first occurrence, scanning pairs row-major).

    Parameters
    ----------
    window_size : int
        Side ``w`` of the window.

    Returns
    -------
    torch.Tensor
        ``w*w x w*w`` int64 indices into the ``w*w`` biases of one head.
    """
    coords = torch.arange(window_size)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return dy * window_size + dx


class Attention(nn.Module):
    """Multi-head self-attention within one window, with learned relative-position biases.

    Parameters
    ----------
    dim : int
        Token width; also the total width of queries, keys and values.
    num_heads : int
        Number of heads; ``dim`` must be divisible by it.
    window_size : int
        Side of the square window; the biases are ``num_heads x window_size**2``.

    Notes
    -----
    The normalisation of the block lives here (``norm``), as in the checkpoint. ``qkv`` lays out
    its output per head as ``[q, k, v]``, not as ``[all q, all k, all v]``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        # Derived from the window size, so not stored in checkpoints (nor in MobileSAM's).
        self.register_buffer(
            "attention_bias_idxs", relative_offset_index(window_size), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x N x dim -> B x N x dim`` with ``N = window_size**2``."""
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).chunk(3, dim=-1)
        # Gathered on every call rather than cached: a cache would go stale when weights are
        # loaded or trained, and the gather is tiny next to the attention itself.
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        # A 4-D mask keeps SDPA on its fused CPU kernel; a 3-D one falls back (2.5x slower).
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    """Pre-norm feed-forward block: LayerNorm, Linear, GELU, Linear (dropout after each)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(self.norm(x))))
        return self.drop(self.fc2(x))


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, int, int]:
    """Split ``B x H x W x C`` into windows, zero-padding bottom and right.

    Returns
    -------
    windows : torch.Tensor
        ``B*nH*nW x window_size**2 x C``.
    nh, nw : int
        Number of windows down and across.
    """
    b, h, w, c = x.shape
    pad_b = -h % window_size
    pad_r = -w % window_size
    if pad_b or pad_r:
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    nh, nw = (h + pad_b) // window_size, (w + pad_r) // window_size
    x = x.view(b, nh, window_size, nw, window_size, c).transpose(2, 3)
    return x.reshape(b * nh * nw, window_size * window_size, c), nh, nw


def window_unpartition(
    windows: torch.Tensor, window_size: int, nh: int, nw: int, h: int, w: int
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``B*nH*nW x ws**2 x C -> B x h x w x C``."""
    c = windows.shape[-1]
    x = windows.view(-1, nh, nw, window_size, window_size, c).transpose(2, 3)
    x = x.reshape(-1, nh * window_size, nw * window_size, c)
    return x[:, :h, :w]


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise local convolution, MLP. ``B x H x W x C`` in and out.

    Parameters
    ----------
    dim : int
        Token width.
    num_heads : int
        Attention heads.
    window_size : int
        Side of the attention windows; the grid is zero-padded to a multiple of it and the
        padded tokens take part in attention (as in MobileSAM, whose weights expect it).
    mlp_ratio : float
        Hidden width of the MLP relative to ``dim``.
    drop : float
        Dropout in the MLP.
    drop_path : float
        Stochastic-depth probability of both residual branches.
    local_conv_size : int
        Kernel side of the depthwise convolution between attention and MLP.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop: float,
        drop_path: float,
        local_conv_size: int,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.drop_path = _drop_path(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        windows, nh, nw = window_partition(x, self.window_size)
        windows = self.attn(windows)
        x = x + self.drop_path(window_unpartition(windows, self.window_size, nh, nw, h, w))
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.mlp(x))


class BasicLayer(nn.Module):
    """Attention stage: TinyViT blocks, then optional patch merging; ``B x C x H x W`` in, out."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop: float,
        drop_path: Sequence[float],
        local_conv_size: int,
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(
                dim, num_heads, window_size, mlp_ratio, drop, drop_path[i], local_conv_size
            )
            for i in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class TinyViT(nn.Module):
    """MobileSAM's image encoder: ``B x in_chans x S x S -> B x 256 x S/16 x S/16``.

    Parameters
    ----------
    img_size : int
        Side ``S`` of the square input in pixels; a multiple of 16.
    in_chans : int
        Input channels.
    embed_dims, depths, num_heads, window_sizes : sequence of int, length 4
        Per stage: width, number of blocks, attention heads and attention window side (the
        heads and window of stage 0, which is convolutional, are unused).
    mlp_ratio : float
        MLP hidden width relative to the stage width.
    drop_rate : float
        Dropout in the MLPs.
    drop_path_rate : float
        Stochastic depth, rising linearly from 0 at the first block to this at the last.
    mbconv_expand_ratio : float
        Hidden width of the MBConv blocks relative to the stage-0 width.
    local_conv_size : int
        Kernel side of the depthwise convolution in the attention blocks.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
    ) -> None:
        super().__init__()
        _check_config(img_size, embed_dims, depths, num_heads, window_sizes)
        self.img_size = img_size
        self.in_chans = in_chans
        out_chans = 256

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])

        # On the CPU even under ``with torch.device("meta")``, which builds a model's skeleton.
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        starts = [sum(depths[:i]) for i in range(len(depths) + 1)]
        last = len(depths) - 1
        self.layers = nn.ModuleList()
        for i in range(len(depths)):
            downsample = None
            if i < last:
                # Stride 1 into the last stage keeps the 1/16 grid the SAM decoder expects.
                stride = 1 if i + 1 == last else 2
                downsample = PatchMerging(embed_dims[i], embed_dims[i + 1], stride)
            stage_dpr = dpr[starts[i] : starts[i + 1]]
            if i == 0:
                layer = ConvLayer(
                    embed_dims[0], depths[0], stage_dpr, mbconv_expand_ratio, downsample
                )
            else:
                layer = BasicLayer(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    drop_rate,
                    stage_dpr,
                    local_conv_size,
                    downsample,
                )
            self.layers.append(layer)
        self.apply(_init_weights)

        # Created after the init above, so the neck keeps PyTorch's default initialisation.
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``B x in_chans x img_size x img_size``."""
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"TinyViT expects a B x {expected[0]} x {expected[1]} x {expected[2]} tensor, "
                f"got shape {tuple(x.shape)}; resize and pad images to img_size first "
                "(Sam.preprocess does this)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``B x in_chans x img_size x img_size`` (normalised, padded) images.

        Returns
        -------
        torch.Tensor
            ``B x 256 x img_size/16 x img_size/16`` image embeddings.
        """
        self.check_input(x)
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


def _check_config(
    img_size: int,
    embed_dims: Sequence[int],
    depths: Sequence[int],
    num_heads: Sequence[int],
    window_sizes: Sequence[int],
) -> None:
    if img_size <= 0 or img_size % 16:
        raise ValueError(f"img_size must be a positive multiple of 16, got {img_size}")
    lengths = {len(embed_dims), len(depths), len(num_heads), len(window_sizes)}
    if lengths != {4}:
        raise ValueError(
            "embed_dims, depths, num_heads and window_sizes must each have 4 entries (one per "
            f"stage), got {list(embed_dims)}, {list(depths)}, {list(num_heads)}, "
            f"{list(window_sizes)}"
        )
    for i in range(1, 4):
        if embed_dims[i] % num_heads[i]:
            raise ValueError(
                f"stage {i}: embed_dim {embed_dims[i]} is not divisible by num_heads {num_heads[i]}"
            )
        if window_sizes[i] <= 0:
            raise ValueError(f"stage {i}: window size must be positive, got {window_sizes[i]}")
    if embed_dims[0] % 2:
        raise ValueError(f"embed_dims[0] must be even (the stem halves it), got {embed_dims[0]}")


def _init_weights(module: nn.Module) -> None:
    # MobileSAM's initialisation for training from scratch; loaded checkpoints overwrite it.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

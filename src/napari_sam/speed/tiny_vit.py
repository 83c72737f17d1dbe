"""A faster forward pass for MobileSAM's TinyViT encoder, sharing the exact model's weights.

Same mathematics as :class:`~napari_sam.models.tiny_vit.TinyViT`, arranged for a CPU:

- every convolution has its BatchNorm folded in and runs in channels-last memory with its GELU
  (or the MBConv residual addition) fused by oneDNN; the attention stages keep their
  ``B x H x W x C`` tokens, which *are* channels-last, so no layout copies are made;
- attention runs in PyTorch's fused (flash) SDPA kernel with the bias as a 4-D mask;
- query/key/value are projected for the image's tokens only; the padding tokens of the windows
  (zeros before the block's norm) all get the same projection, computed once;
- optionally the ``Linear`` layers run in int8.

Submodules keep the exact model's names and parameters, so the state dict is the exact model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.models import tiny_vit as tv
from napari_sam.speed.kernels import (
    DerivedWeights,
    FusedLinear,
    LinearFactory,
    autocast,
    conv2d,
    fold_batch_norm,
)
from napari_sam.speed.twin import FastTwin
from napari_sam.speed.windows import from_windows, to_windows

__all__ = ["FastTinyViT"]


class FastConvBN(FastTwin):
    """A :class:`~napari_sam.models.tiny_vit.Conv2dBN` as one convolution (BatchNorm folded)."""

    exact_type = tv.Conv2dBN

    def speed_up(self, exact: tv.Conv2dBN) -> None:
        bn = self.bn
        self._folded = DerivedWeights(
            lambda: (self.c.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var),
            lambda: fold_batch_norm(self.c, self.bn),
        )

    def forward(
        self, x: torch.Tensor, activation: str | None = None, add: torch.Tensor | None = None
    ) -> torch.Tensor:
        weight, bias = self._folded.get()
        c = self.c
        return conv2d(
            x,
            weight,
            bias,
            stride=c.stride[0],
            padding=c.padding[0],
            groups=c.groups,
            activation=activation,
            add=add,
        )


class FastTinyViT(FastTwin):
    """Fast twin of a :class:`~napari_sam.models.tiny_vit.TinyViT` (same input and output).

    Made with ``FastTinyViT.from_exact(encoder, linear=..., autocast_dtype=...)`` (see
    :meth:`speed_up`).
    """

    exact_type = tv.TinyViT

    def speed_up(
        self,
        exact: tv.TinyViT,
        linear: LinearFactory = FusedLinear.from_exact,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        """Fast stem and stages.

        Parameters
        ----------
        exact : TinyViT
            The exact encoder; its parameters are shared, not copied.
        linear : callable
            Turns each ``nn.Linear`` of the attention stages into the module to use.
        autocast_dtype : torch.dtype, optional
            Run under ``torch.autocast`` to this dtype; the output is float32 either way.
        """
        self.autocast_dtype = autocast_dtype
        self.patch_embed = FastPatchEmbed.from_exact(exact.patch_embed)
        self.layers = nn.ModuleList(
            FastConvLayer.from_exact(layer)
            if FastConvLayer.accepts(layer)
            else FastBasicLayer.from_exact(layer, linear=linear)
            for layer in exact.layers
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x S x S`` images -> ``B x 256 x S/16 x S/16`` embeddings (float32)."""
        tv.TinyViT.check_input(self, x)  # reads only in_chans and img_size
        with autocast(x.device, self.autocast_dtype):
            x = self.patch_embed(x.float().contiguous(memory_format=torch.channels_last))
            for layer in self.layers:
                x = layer(x)
            return _neck(self.neck, x).float().contiguous()


def _neck(neck: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The shared neck (conv 1x1, LayerNorm2d, conv 3x3, LayerNorm2d) in channels-last."""
    conv1, norm1, conv2, norm2 = neck
    x = conv2d(x, conv1.weight, None)
    x = _layer_norm_2d(x, norm1)
    x = conv2d(x, conv2.weight, None, padding=conv2.padding[0])
    return _layer_norm_2d(x, norm2)


def _layer_norm_2d(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    # Channels-last NCHW is NHWC in memory: normalise the last axis of that view.
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps)
    return y.permute(0, 3, 1, 2)


class FastPatchEmbed(FastTwin):
    exact_type = tv.PatchEmbed

    def speed_up(self, exact: tv.PatchEmbed) -> None:
        conv1, act, conv2 = exact.seq
        # (its GELU runs inside the first convolution)
        self.seq = nn.ModuleList([FastConvBN.from_exact(conv1), act, FastConvBN.from_exact(conv2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq[2](self.seq[0](x, "gelu"))


class FastMBConv(FastTwin):
    exact_type = tv.MBConv

    def speed_up(self, exact: tv.MBConv) -> None:
        _fast_convolutions(self, exact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x, "gelu"), "gelu")
        return self.conv3(y, "gelu", add=x)


class FastPatchMerging(FastTwin):
    exact_type = tv.PatchMerging

    def speed_up(self, exact: tv.PatchMerging) -> None:
        _fast_convolutions(self, exact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x, "gelu"), "gelu"))


def _fast_convolutions(twin: nn.Module, exact: nn.Module) -> None:
    """``conv1``..``conv3`` of an MBConv or a patch merging as :class:`FastConvBN`."""
    for name in ("conv1", "conv2", "conv3"):
        setattr(twin, name, FastConvBN.from_exact(getattr(exact, name)))


def _fast_downsample(layer: tv.ConvLayer | tv.BasicLayer) -> FastPatchMerging | None:
    return None if layer.downsample is None else FastPatchMerging.from_exact(layer.downsample)


class FastConvLayer(FastTwin):
    exact_type = tv.ConvLayer

    def speed_up(self, exact: tv.ConvLayer) -> None:
        self.blocks = nn.ModuleList(FastMBConv.from_exact(b) for b in exact.blocks)
        self.downsample = _fast_downsample(exact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class FastBasicLayer(FastTwin):
    exact_type = tv.BasicLayer

    def speed_up(self, exact: tv.BasicLayer, linear: LinearFactory) -> None:
        self.blocks = nn.ModuleList(
            FastTinyViTBlock.from_exact(b, linear=linear) for b in exact.blocks
        )
        self.downsample = _fast_downsample(exact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last B x C x H x W is a contiguous B x H x W x C: a view, not a copy.
        x = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return self.downsample(x) if self.downsample is not None else x


class FastTinyViTBlock(FastTwin):
    exact_type = tv.TinyViTBlock

    def speed_up(self, exact: tv.TinyViTBlock, linear: LinearFactory) -> None:
        self.attn = FastWindowAttention.from_exact(exact.attn, linear=linear)
        self.mlp = FastMlp.from_exact(exact.mlp, linear=linear)
        self.local_conv = FastConvBN.from_exact(exact.local_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        ws = self.window_size
        (fill,) = self.attn.padding_qkv.get()
        windows, nh, nw = to_windows(self.attn.project(x), ws, fill)
        out = from_windows(self.attn.attend(windows), ws, nh, nw, h, w)
        x = self.attn.proj(out).add_(x)
        # B x H x W x C is channels-last B x C x H x W: the depthwise conv reads it in place.
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.mlp(x).add_(x)


class FastWindowAttention(FastTwin):
    exact_type = tv.Attention

    def speed_up(self, exact: tv.Attention, linear: LinearFactory) -> None:
        self.qkv = linear(exact.qkv)
        self.proj = linear(exact.proj)
        # Window padding is zeros before the norm: one projection serves every padding token.
        self.padding_qkv = DerivedWeights(
            lambda: (self.norm.weight, self.norm.bias, self.qkv.weight, self.qkv.bias),
            lambda: (self.project(self.norm.weight.new_zeros(1, self.norm.weight.shape[0]))[0],),
        )

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(self.norm(x))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """``B x N x (heads * 3d)`` -> ``B x N x (heads * d)``, before the output projection."""
        b, n, _ = qkv.shape
        # Per head the layout is [q, k, v] (MobileSAM's), hence heads before the 3.
        q, k, v = qkv.view(b, n, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        # A 4-D mask (broadcast over windows) keeps SDPA on its fused kernel.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        return out.transpose(1, 2).reshape(b, n, -1)


class FastMlp(FastTwin):
    exact_type = tv.Mlp

    def speed_up(self, exact: tv.Mlp, linear: LinearFactory) -> None:
        self.fc1 = linear(exact.fc1)
        self.fc2 = linear(exact.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(self.norm(x), activation="gelu"))

"""SAM 2's memory encoder: a frame's features fused with its predicted mask into a memory.

The mask (high resolution, as probabilities) is downsampled to the stride-16 grid by strided
convolutions, added to the projected image features, mixed by ConvNeXt blocks and narrowed
to the memory width (64 channels).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from napari_sam.models.common import LayerNorm2d
from napari_sam.models.sam2.position_encoding import PositionEmbeddingSine

__all__ = ["CXBlock", "Fuser", "MaskDownSampler", "MemoryEncoder"]


class MaskDownSampler(nn.Module):
    """Strided convolutions from a 1-channel mask to ``embed_dim`` channels at 1/total_stride.

    Each step divides the side by ``stride`` and multiplies the channels by ``stride ** 2``
    (conv, channel LayerNorm, activation); a 1 x 1 convolution ends.

    Parameters
    ----------
    embed_dim : int
        Output channels.
    kernel_size, stride, padding : int
        Of every strided convolution.
    total_stride : int
        Overall downsampling; a power of ``stride``.
    activation : type of nn.Module
        Between steps.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        kernel_size: int = 4,
        stride: int = 4,
        padding: int = 0,
        total_stride: int = 16,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        num_layers = round(math.log(total_stride, stride))
        if stride**num_layers != total_stride:
            raise ValueError(f"total_stride {total_stride} is not a power of stride {stride}")
        self.encoder = nn.Sequential()
        chans = 1
        for _ in range(num_layers):
            out = chans * stride**2
            self.encoder.append(
                nn.Conv2d(chans, out, kernel_size=kernel_size, stride=stride, padding=padding)
            )
            self.encoder.append(LayerNorm2d(out))
            self.encoder.append(activation())
            chans = out
        self.encoder.append(nn.Conv2d(chans, embed_dim, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 1 x H x W`` mask -> ``B x embed_dim x H/total_stride x W/total_stride``."""
        return self.encoder(x)


class CXBlock(nn.Module):
    """ConvNeXt block: depth-wise conv, LayerNorm, pointwise MLP (x4), layer scale, residual.

    Parameters
    ----------
    dim : int
        Channels.
    kernel_size, padding : int
        Of the depth-wise convolution.
    layer_scale_init_value : float
        Initial per-channel scale of the residual branch; 0 disables it.
    use_dwconv : bool
        Depth-wise (grouped) rather than full convolution.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        padding: int = 3,
        layer_scale_init_value: float = 1e-6,
        use_dwconv: bool = True,
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(
            dim, dim, kernel_size=kernel_size, padding=padding, groups=dim if use_dwconv else 1
        )
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (
            nn.Parameter(layer_scale_init_value * torch.ones(dim))
            if layer_scale_init_value > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x dim x H x W`` -> same shape."""
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)  # channels last for the Linear layers
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


class Fuser(nn.Module):
    """A stack of identical blocks (copies of ``layer``), optionally after a 1 x 1 projection.

    Parameters
    ----------
    layer : nn.Module
        Block to repeat (deep-copied ``num_layers`` times).
    num_layers : int
        Copies.
    dim : int or None
        Channels, needed for ``input_projection``.
    input_projection : bool
        Start with a 1 x 1 convolution.
    """

    def __init__(
        self,
        layer: nn.Module,
        num_layers: int,
        dim: int | None = None,
        input_projection: bool = False,
    ) -> None:
        super().__init__()
        self.proj: nn.Module = nn.Identity()
        if input_projection:
            if dim is None:
                raise ValueError("input_projection needs dim")
            self.proj = nn.Conv2d(dim, dim, kernel_size=1)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` through the projection and the blocks, same shape."""
        x = self.proj(x)
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Image features + mask -> memory features and their position encoding.

    Parameters
    ----------
    out_dim : int
        Memory width (64 in SAM 2).
    mask_downsampler : MaskDownSampler
        Mask to the feature grid, ``in_dim`` channels.
    fuser : Fuser
        Mixes the sum of features and mask embedding.
    position_encoding : PositionEmbeddingSine
        Encodes the memory grid.
    in_dim : int
        Width of the image features.
    """

    def __init__(
        self,
        out_dim: int,
        mask_downsampler: MaskDownSampler,
        fuser: Fuser,
        position_encoding: PositionEmbeddingSine,
        in_dim: int = 256,
    ) -> None:
        super().__init__()
        self.mask_downsampler = mask_downsampler
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = fuser
        self.position_encoding = position_encoding
        self.out_proj: nn.Module = (
            nn.Conv2d(in_dim, out_dim, kernel_size=1) if out_dim != in_dim else nn.Identity()
        )

    def forward(
        self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = False
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Encode a memory.

        Parameters
        ----------
        pix_feat : Tensor
            ``B x in_dim x h x w`` image features.
        masks : Tensor
            ``B x 1 x 16h x 16w`` mask logits, or already-squashed values with
            ``skip_mask_sigmoid``.
        skip_mask_sigmoid : bool
            The caller has applied its own sigmoid (and scaling).

        Returns
        -------
        dict
            ``"vision_features"``: ``B x out_dim x h x w``; ``"vision_pos_enc"``: a list of
            one ``B x out_dim x h x w`` encoding.
        """
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        masks = self.mask_downsampler(masks)
        x = self.pix_feat_proj(pix_feat.to(masks.device)) + masks
        x = self.out_proj(self.fuser(x))
        pos = self.position_encoding(x).to(x.dtype)
        return {"vision_features": x, "vision_pos_enc": [pos]}

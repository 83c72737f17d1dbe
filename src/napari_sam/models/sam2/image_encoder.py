"""SAM 2's image encoder: a Hiera trunk and an FPN neck with sine position encodings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.models.sam2.hiera import Hiera
from napari_sam.models.sam2.position_encoding import PositionEmbeddingSine

__all__ = ["FpnNeck", "ImageEncoder"]


class ImageEncoder(nn.Module):
    """Trunk + neck; the ``scalp`` lowest-resolution levels are dropped from the output.

    Parameters
    ----------
    trunk : Hiera
        Returns one map per stage, highest resolution first; ``channel_list`` has their
        widths, lowest resolution first.
    neck : FpnNeck
        Projects the maps to one width and adds top-down features.
    scalp : int
        Levels to drop at the low-resolution end (1 in SAM 2: stride 32 only feeds the
        stride-16 level).
    """

    def __init__(self, trunk: Hiera, neck: FpnNeck, scalp: int = 0) -> None:
        super().__init__()
        if list(trunk.channel_list) != list(neck.backbone_channel_list):
            raise ValueError(
                f"trunk widths {list(trunk.channel_list)} do not match the neck's "
                f"{list(neck.backbone_channel_list)}"
            )
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, sample: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Encode a normalised ``B x 3 x S x S`` batch.

        Returns
        -------
        dict
            ``"backbone_fpn"``: maps ``B x d_model x S/4 ...``, highest resolution first
            (strides 4, 8, 16 in SAM 2); ``"vision_pos_enc"``: their position encodings;
            ``"vision_features"``: the last (lowest-resolution) map.
        """
        features, pos = self.neck(self.trunk(sample), skip_low=self.scalp)
        if self.scalp > 0:
            features, pos = features[: -self.scalp], pos[: -self.scalp]
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}


class FpnNeck(nn.Module):
    """Feature pyramid without output convolutions: 1 x 1 lateral projections, top-down sums.

    Parameters
    ----------
    position_encoding : PositionEmbeddingSine
        Encodes every output level.
    d_model : int
        Output width.
    backbone_channel_list : sequence of int
        Trunk widths, lowest resolution first.
    fpn_top_down_levels : sequence of int or None
        Output levels (0 = highest resolution) that receive the upsampled coarser level;
        the others are lateral only. None means all.
    fpn_interp_model : str
        Upsampling mode of the top-down path (``"nearest"`` in SAM 2.1).
    fuse_type : {"sum", "avg"}
        How lateral and top-down features combine.
    """

    def __init__(
        self,
        position_encoding: PositionEmbeddingSine,
        d_model: int,
        backbone_channel_list: Sequence[int],
        fpn_top_down_levels: Sequence[int] | None = None,
        fpn_interp_model: str = "bilinear",
        fuse_type: str = "sum",
    ) -> None:
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        self.position_encoding = position_encoding
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        self.convs = nn.ModuleList()
        for dim in self.backbone_channel_list:
            lateral = nn.Sequential()
            lateral.add_module("conv", nn.Conv2d(dim, d_model, kernel_size=1))
            self.convs.append(lateral)
        n = len(self.convs)
        self.fpn_top_down_levels = list(
            range(n) if fpn_top_down_levels is None else fpn_top_down_levels
        )
        self.fpn_interp_model = fpn_interp_model
        self.fuse_type = fuse_type

    def forward(
        self, xs: Sequence[torch.Tensor], skip_low: int = 0
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Project trunk maps (highest resolution first) to ``d_model`` and fuse top-down.

        ``skip_low`` lowest-resolution levels get no position encoding (the caller drops
        them); their features are still computed, as finer levels may read them.
        """
        n = len(self.convs)
        if len(xs) != n:
            raise ValueError(f"the neck expects {n} trunk maps, got {len(xs)}")
        out: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        pos: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        prev = None
        # Coarse to fine: convs[0] projects the lowest-resolution map.
        for i in range(n - 1, -1, -1):
            lateral = self.convs[n - 1 - i](xs[i])
            if i in self.fpn_top_down_levels and prev is not None:
                align = None if self.fpn_interp_model == "nearest" else False
                top_down = F.interpolate(
                    prev.to(torch.float32),
                    scale_factor=2.0,
                    mode=self.fpn_interp_model,
                    align_corners=align,
                )
                prev = lateral + top_down
                if self.fuse_type == "avg":
                    prev = prev / 2
            else:
                prev = lateral
            out[i] = prev
            if i < n - skip_low:
                pos[i] = self.position_encoding(prev).to(prev.dtype)
        return out, pos

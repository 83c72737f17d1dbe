"""Prompt encoder of SAM: points and boxes to sparse tokens, a mask to a dense embedding."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from napari_sam.models.common import LayerNorm2d

__all__ = ["PositionEmbeddingRandom", "PromptEncoder"]

# Point labels: -1 padding ("not a point"), 0 background, 1 foreground, 2 / 3 box corners.
_MIN_LABEL, _MAX_LABEL = -1, 3


class PromptEncoder(nn.Module):
    """Embed point, box and mask prompts for the mask decoder.

    Parameters
    ----------
    embed_dim : int
        Width of the prompt tokens and of the dense embedding.
    image_embedding_size : (int, int)
        Grid ``(E, E)`` of the image embedding (``image_size // 16``).
    input_image_size : (int, int)
        Padded encoder input ``(S, S)`` in pixels; point and box coordinates are in this frame.
    mask_in_chans : int
        Hidden channels of the mask downscaling network.
    activation : type of nn.Module
        Activation of the mask downscaling network.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (1024, 1024),
        mask_in_chans: int = 16,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        # Unpacked (not tuple()) so that a list works too and the pair stays a pair.
        emb_h, emb_w = image_embedding_size
        in_h, in_w = input_image_size
        self.image_embedding_size = (emb_h, emb_w)
        self.input_image_size = (in_h, in_w)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0 background point, 1 foreground point, 2 box top-left, 3 box bottom-right.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the embedding grid, ``1 x embed_dim x E x E``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the prompts of a batch of ``B`` prompt sets.

        Parameters
        ----------
        points : (Tensor, Tensor) or None
            Coordinates ``B x N x 2`` as (x, y) pixels of the encoder input and labels
            ``B x N`` (1 foreground, 0 background, -1 padding, 2 / 3 box corners). Without a
            box, one padding point is appended, as SAM was trained.
        boxes : Tensor or None
            ``B x 4`` boxes (x0, y0, x1, y1) in the same frame.
        masks : Tensor or None
            ``B x 1 x 4E x 4E`` mask logits (the decoder's low-resolution output).

        Returns
        -------
        sparse : Tensor
            ``B x K x embed_dim`` tokens (K points, plus a padding point, plus 2 per box).
        dense : Tensor
            ``B x embed_dim x E x E``.
        """
        bs = self._batch_size(points, boxes, masks)
        weight = self.no_mask_embed.weight
        tokens = [weight.new_empty((bs, 0, self.embed_dim))]
        if points is not None:
            coords, labels = points
            tokens.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes))
        # Positions are encoded in float32; the tokens take the dtype of the weights.
        sparse = torch.cat(tokens, dim=1).to(self.no_mask_embed.weight.dtype)

        if masks is not None:
            dense = self._embed_masks(masks.to(self.no_mask_embed.weight.dtype))
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                bs, -1, *self.image_embedding_size
            )
        return sparse, dense

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """``B x 1 x 4E x 4E`` mask logits -> ``B x embed_dim x E x E``."""
        return self.mask_downscaling(masks)

    def _batch_size(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        sizes = {}
        if points is not None:
            if not isinstance(points, (tuple, list)) or len(points) != 2:
                raise ValueError("points must be a (coords B x N x 2, labels B x N) pair")
            coords, labels = points
            if coords.ndim != 3 or coords.shape[-1] != 2:
                raise ValueError(f"point coords must be B x N x 2, got {tuple(coords.shape)}")
            if tuple(labels.shape) != tuple(coords.shape[:2]):
                raise ValueError(
                    f"point labels must be B x N = {tuple(coords.shape[:2])}, "
                    f"got {tuple(labels.shape)}"
                )
            sizes["points"] = coords.shape[0]
        if boxes is not None:
            one_per_set = boxes.ndim == 2 or (boxes.ndim == 3 and boxes.shape[1] == 1)
            if not one_per_set or boxes.shape[-1] != 4:
                raise ValueError(
                    f"boxes must be B x 4 (x0, y0, x1, y1), one per prompt set, "
                    f"got {tuple(boxes.shape)}"
                )
            sizes["boxes"] = boxes.shape[0]
        if masks is not None:
            expected = (1, *self.mask_input_size)
            if masks.ndim != 4 or tuple(masks.shape[1:]) != expected:
                raise ValueError(
                    f"mask input must be B x 1 x {expected[1]} x {expected[2]} logits "
                    f"(a low-resolution mask from the decoder), got {tuple(masks.shape)}"
                )
            sizes["masks"] = masks.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError(f"prompt batch sizes disagree: {sizes}")
        return next(iter(sizes.values()), 1)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        coords = coords.to(torch.float32) + 0.5  # pixel centres
        labels = labels.to(torch.long)
        if pad:
            b = coords.shape[0]
            coords = torch.cat([coords, coords.new_zeros(b, 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((b, 1), -1)], dim=1)
        if labels.numel() and bool(((labels < _MIN_LABEL) | (labels > _MAX_LABEL)).any()):
            raise ValueError(
                "point labels must be 1 (foreground), 0 (background), -1 (padding) "
                "or 2 / 3 (box corners)"
            )
        pe = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        # Row i of the table is the learned embedding of label i - 1.
        table = torch.cat(
            [self.not_a_point_embed.weight] + [self.point_embedding(i) for i in range(4)], dim=0
        )
        # Padding points carry no position, only their own embedding.
        pe = pe * (labels != -1).unsqueeze(-1).to(pe.dtype)
        return pe + table[labels + 1]

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes.to(torch.float32) + 0.5).reshape(-1, 2, 2)
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.cat([self.point_embedding(2), self.point_embedding(3)])
        return pe + corner_embed

    def point_embedding(self, label: int) -> torch.Tensor:
        """The learned ``1 x embed_dim`` embedding of point label ``label``.

        Labels 0 (background), 1 (foreground), 2 and 3 (box corners); padding points (-1) use
        ``not_a_point_embed`` instead.
        """
        # ModuleList items are typed as Module; __init__ fills it with nn.Embedding only.
        return cast(nn.Embedding, self.point_embeddings[label]).weight


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of 2-D positions with random (Gaussian) frequencies.

    Parameters
    ----------
    num_pos_feats : int
        Number of frequencies; the encoding has twice as many channels (sine and cosine).
    scale : float or None
        Standard deviation of the frequencies (1 when None or not positive).
    """

    # Registered in __init__, declared for type checkers (nn.Module.__getattr__ is untyped).
    positional_encoding_gaussian_matrix: torch.Tensor

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        # Random at construction; a checkpoint supplies the trained matrix (persistent buffer).
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats)
        )

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode ``... x 2`` coordinates in [0, 1] to ``... x 2 num_pos_feats``."""
        # Always float32: half precision would blur the positions of a 1024 px frame.
        matrix = self.positional_encoding_gaussian_matrix
        projected = (2 * coords - 1) @ matrix.to(torch.float32)
        projected = 2 * math.pi * projected
        encoded = torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)
        return encoded.to(matrix.dtype)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encode the centres of an ``H x W`` grid: ``2 num_pos_feats x H x W``."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # H x W x (x, y)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(
        self, coords_input: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """Encode ``B x N x 2`` (x, y) pixel coordinates of an ``(H, W)`` image."""
        h, w = image_size
        size = torch.tensor([w, h], dtype=torch.float32, device=coords_input.device)
        return self._encode(coords_input.to(torch.float32) / size)

"""The Segment Anything model: image encoder, prompt encoder and mask decoder together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.models.mask_decoder import MaskDecoder
from napari_sam.models.prompt_encoder import PromptEncoder
from napari_sam.registry import ModelSpec

__all__ = ["Sam"]


class Sam(nn.Module):
    """SAM: predicts object masks from an image and prompts.

    Parameters
    ----------
    image_encoder : nn.Module
        Image to ``B x 256 x S/16 x S/16`` embedding; has an ``img_size`` attribute ``S``.
    prompt_encoder : PromptEncoder
        Points, boxes and masks to sparse and dense embeddings.
    mask_decoder : MaskDecoder
        Embeddings to mask logits and predicted IoUs.
    pixel_mean, pixel_std : sequence of float
        Per-channel normalisation of 0..255 RGB input (SAM preprocessing only).
    spec : ModelSpec or None
        What the model was built from; ``spec.preprocessing == "medsam"`` switches
        :meth:`preprocess` and :meth:`postprocess_masks` to MedSAM's pipeline.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"
    # Buffers registered in __init__, declared for type checkers (nn.Module.__getattr__ is untyped).
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        spec: ModelSpec | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.spec = spec
        # Constants of the preprocessing, not learned: kept out of the state dict.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters and buffers."""
        return self.pixel_mean.device

    @property
    def image_size(self) -> int:
        """Side ``S`` of the square encoder input in pixels."""
        size = self.image_encoder.img_size
        if not isinstance(size, int):
            raise TypeError(f"image_encoder.img_size must be an int (pixels), got {size!r}")
        return size

    @property
    def is_medsam(self) -> bool:
        """Whether the model uses MedSAM's preprocessing (see the class docstring)."""
        return self.spec is not None and self.spec.preprocessing == "medsam"

    @torch.no_grad()
    def forward(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """Predict masks end to end for a list of images, each with its own prompts.

        Parameters
        ----------
        batched_input : list of dict
            One dict per image with ``"image"`` (``3 x h x w`` float 0..255, already resized
            to the model's frame), ``"original_size"`` ``(H, W)`` and optionally
            ``"point_coords"`` (``B x N x 2``) with ``"point_labels"`` (``B x N``),
            ``"boxes"`` (``B x 4``), ``"mask_inputs"`` (``B x 1 x 4E x 4E``); coordinates in
            the resized frame.
        multimask_output : bool
            Three masks per prompt set instead of one.

        Returns
        -------
        list of dict
            Per image: ``"masks"`` (``B x M x H x W`` bool), ``"iou_predictions"``
            (``B x M``), ``"low_res_logits"`` (``B x M x 4E x 4E``).
        """
        if not batched_input:
            raise ValueError("batched_input is empty: pass one dict per image")
        images = torch.stack([self.preprocess(record["image"]) for record in batched_input])
        embeddings = self.image_encoder(images)
        outputs = []
        for record, embedding in zip(batched_input, embeddings, strict=True):
            points = None
            if "point_coords" in record:
                if "point_labels" not in record:
                    raise ValueError("'point_coords' given without 'point_labels'")
                points = (record["point_coords"], record["point_labels"])
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                image_embeddings=embedding.unsqueeze(0),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(
                low_res,
                input_size=tuple(record["image"].shape[-2:]),
                original_size=tuple(record["original_size"]),
            )
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Turn a resized 0..255 image (``3 x h x w`` or ``B x 3 x h x w``) into encoder input.

        SAM: normalise with the pixel mean/std, then zero-pad bottom/right to ``S x S``.
        MedSAM: the image is already stretched to ``S x S``; scale each image to [0, 1] by its
        own minimum and maximum.
        """
        s = self.image_size
        if x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(
                f"expected an image tensor 3 x h x w or B x 3 x h x w, got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        # float32 whatever the model's dtype: the encoder casts its input to its own.
        x = x.to(torch.float32)
        if self.is_medsam:
            if (h, w) != (s, s):
                raise ValueError(
                    f"MedSAM input must be stretched to {s} x {s} first, got {h} x {w}"
                )
            dims = (-3, -2, -1)
            lo = x.amin(dim=dims, keepdim=True)
            hi = x.amax(dim=dims, keepdim=True)
            return (x - lo) / (hi - lo).clamp(min=1e-8)
        if h > s or w > s:
            raise ValueError(
                f"image of {h} x {w} is larger than the model input {s} x {s}: resize its "
                "longest side to the model's image_size first"
            )
        x = (x - self.pixel_mean.float()) / self.pixel_std.float()
        return F.pad(x, (0, s - w, 0, s - h))

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """Upscale low-resolution logits ``B x M x 4E x 4E`` to ``B x M x H x W``.

        SAM: bilinear to ``S x S``, crop the padding (keep ``input_size``), bilinear to
        ``original_size``. MedSAM: bilinear straight to ``original_size``.
        """
        original_size = (int(original_size[0]), int(original_size[1]))
        if self.is_medsam:
            return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)
        s = self.image_size
        masks = F.interpolate(masks, (s, s), mode="bilinear", align_corners=False)
        masks = masks[..., : int(input_size[0]), : int(input_size[1])]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)

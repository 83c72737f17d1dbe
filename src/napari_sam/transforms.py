"""Geometric transforms between an image and the encoder's square input frame.

Two interchangeable transforms, chosen by the model's spec (:func:`transform_for`):

- :class:`ResizeLongestSide` (SAM, MobileSAM): scale so the long side is ``S`` pixels, keep the
  aspect ratio; the encoder input is then padded bottom/right to ``S x S``.
- :class:`StretchResize` (MedSAM): stretch to ``S x S`` regardless of aspect ratio.

Coordinates are ``(x, y)`` in pixels of the original image; the transforms map them into the
``S``-frame the prompt encoder expects.
"""

from __future__ import annotations

from copy import deepcopy
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

if TYPE_CHECKING:
    from napari_sam.registry import ModelSpec

__all__ = ["ResizeLongestSide", "StretchResize", "transform_for"]


class ResizeLongestSide:
    """Resize so the longest side is ``target_length``, keeping the aspect ratio.

    Matches segment_anything's transform exactly: uint8 images are resized with PIL's
    bilinear filter, output sizes are rounded half up.
    """

    def __init__(self, target_length: int) -> None:
        self.target_length = int(target_length)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """Size ``(h, w)`` of an ``oldh x oldw`` image scaled to a long side of the given length."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        return int(oldh * scale + 0.5), int(oldw * scale + 0.5)

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """Size ``(h, w)`` of the resized image before padding."""
        return self.get_preprocess_shape(original_size[0], original_size[1], self.target_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """Resize an ``H x W x 3`` uint8 image to :meth:`input_size`."""
        h, w = self.input_size((image.shape[0], image.shape[1]))
        return np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """Map ``... x 2`` coordinates ``(x, y)`` into the encoder frame."""
        old_h, old_w = original_size
        new_h, new_w = self.input_size(original_size)
        coords = deepcopy(coords).astype(float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """Map ``B x 4`` boxes ``(x0, y0, x1, y1)`` into the encoder frame."""
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """Resize a ``B x C x H x W`` float tensor (bilinear, antialiased)."""
        h, w = self.input_size((image.shape[-2], image.shape[-1]))
        return F.interpolate(image, (h, w), mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(
        self, coords: torch.Tensor, original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Map ``... x 2`` coordinates ``(x, y)`` into the encoder frame (float tensor)."""
        old_h, old_w = original_size
        new_h, new_w = self.input_size(original_size)
        coords = coords.clone().to(torch.float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes_torch(
        self, boxes: torch.Tensor, original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Map ``B x 4`` boxes ``(x0, y0, x1, y1)`` into the encoder frame (float tensor)."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)


class StretchResize(ResizeLongestSide):
    """Stretch to ``target_length x target_length`` (MedSAM's preprocessing).

    The image is resized with a cubic, anti-aliased filter as MedSAM does; values are clipped to
    0..255 before the cast back to uint8 (MedSAM's own cast wraps overshoots around).
    """

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """Always ``(target_length, target_length)``, whatever the original size."""
        return self.target_length, self.target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """Resize an ``H x W x C`` uint8 image to ``target_length x target_length``."""
        from skimage.transform import resize

        s = self.target_length
        out = resize(
            image,
            (s, s),
            order=3,
            preserve_range=True,
            mode="constant",
            anti_aliasing=True,
        )
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def transform_for(spec_or_model: ModelSpec | nn.Module | None) -> ResizeLongestSide:
    """Return the transform matching a :class:`~napari_sam.registry.ModelSpec` or a model.

    A model without a spec (e.g. built by hand) uses SAM's transform at its encoder's input size.
    """
    # Duck-typed: anything with a ``preprocessing`` and an ``image_size`` is a spec.
    spec: Any = getattr(spec_or_model, "spec", spec_or_model)
    if spec is not None and hasattr(spec, "preprocessing"):
        size = spec.image_size
        if spec.preprocessing == "medsam":
            return StretchResize(size)
        return ResizeLongestSide(size)
    size = getattr(getattr(spec_or_model, "image_encoder", None), "img_size", 1024)
    return ResizeLongestSide(size)

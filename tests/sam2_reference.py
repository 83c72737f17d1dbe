"""Meta's ``sam2==1.1.0`` predictors for parity tests (test-only).

:func:`build_reference_sam2` is ``reference_sam2``'s ``SAM2Base`` (sam2.1 hiera-tiny settings at
any input size, random weights) turned into a ``SAM2VideoPredictor`` with the options
``build_sam2_video_predictor`` applies. The image predictor's transforms import torchvision,
whose registry wheels cannot load beside a CPU torch; when it is missing, stand-ins reproduce
the three pieces used, with torchvision's documented tensor behaviour: ``ToTensor`` (HWC uint8
-> CHW float in [0, 1]), ``Resize`` (bilinear, antialiased, on the float tensor) and
``Normalize``.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import reference  # the torchvision ops stand-ins the predictors import
from napari_sam.registry import get_spec
from reference_sam2 import build_reference_sam2 as _build_base


class _ToTensor:
    def __call__(self, pic):
        array = np.asarray(pic)
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        return tensor.float().div(255.0)


class _Resize(nn.Module):
    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = [int(size[0]), int(size[1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.interpolate(
            x.unsqueeze(0), size=self.size, mode="bilinear", align_corners=False, antialias=True
        )
        return out.squeeze(0)


class _Normalize(nn.Module):
    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _ensure_transforms() -> None:
    transforms = sys.modules.get("torchvision.transforms")
    if transforms is None:
        transforms = types.ModuleType("torchvision.transforms")
        sys.modules["torchvision.transforms"] = transforms
    if not hasattr(transforms, "Resize"):
        transforms.ToTensor = _ToTensor
        transforms.Resize = _Resize
        transforms.Normalize = _Normalize


with reference.standins():
    _ensure_transforms()
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    from sam2.sam2_video_predictor import SAM2VideoPredictor

__all__ = ["SAM2ImagePredictor", "SAM2VideoPredictor", "build_reference_sam2", "image_predictor"]


def build_reference_sam2(image_size: int = 256, seed: int = 0) -> SAM2VideoPredictor:
    """sam2.1 hiera-tiny as ``build_sam2_video_predictor`` configures it, random weights, eval.

    The weights are the constructors' (seeded), as the released models' initialisation draws
    them; ``fill_hole_area`` is 0, which is what the video predictor does on a CPU without its
    CUDA extension.
    """
    torch.manual_seed(seed)
    hiera = dict(get_spec("sam2.1_hiera_tiny").encoder_kwargs)
    model = _build_base(image_size, hiera, binarize_mask_from_pts_for_mem_enc=True)
    # SAM2VideoPredictor is SAM2Base plus four options; give the built model its methods.
    model.__class__ = SAM2VideoPredictor
    model.fill_hole_area = 0
    model.non_overlap_masks = False
    model.clear_non_cond_mem_around_input = False
    model.add_all_frames_to_correct_as_cond = False
    return model.eval()


def image_predictor(model, **kwargs) -> SAM2ImagePredictor:
    """``SAM2ImagePredictor`` on ``model``, with its feature sizes set for ``model.image_size``
    (the reference hard-codes those of a 1024 input)."""
    predictor = SAM2ImagePredictor(model, **kwargs)
    s = model.image_size
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return predictor

"""Import Meta's ``segment_anything`` and MobileSAM's ``mobile_sam`` for parity tests.

Both import torchvision at module level, but the registry's torchvision wheels are CUDA builds
whose compiled ops fail to load next to a CPU-only torch. When the real torchvision cannot be
imported, a stand-in provides the only pieces the references use, with torchvision's documented
behaviour: PIL bilinear resizing of PIL images and greedy (batched) NMS.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image


def _install_torchvision_standin() -> None:
    def to_pil_image(pic):
        return Image.fromarray(np.asarray(pic))

    def resize(img, size, *args, **kwargs):
        # torchvision.transforms.functional.resize on a PIL image with size (h, w): PIL bilinear.
        h, w = size
        return img.resize((w, h), Image.BILINEAR)

    def box_area(b):
        return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

    def box_iou(a, b):
        area_a = box_area(a)
        area_b = box_area(b)
        lt = torch.max(a[:, None, :2], b[None, :, :2])
        rb = torch.min(a[:, None, 2:], b[None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[..., 0] * wh[..., 1]
        return inter / (area_a[:, None] + area_b[None, :] - inter)

    def nms(boxes, scores, iou_threshold):
        order = torch.argsort(scores, descending=True, stable=True)
        keep = []
        suppressed = torch.zeros(len(boxes), dtype=torch.bool)
        ious = box_iou(boxes.float(), boxes.float())
        for i in order.tolist():
            if suppressed[i]:
                continue
            keep.append(i)
            suppressed |= ious[i] > iou_threshold
        return torch.tensor(keep, dtype=torch.int64)

    def batched_nms(boxes, scores, idxs, iou_threshold):
        if boxes.numel() == 0:
            return torch.empty((0,), dtype=torch.int64)
        offsets = idxs.to(boxes) * (boxes.max() + 1)
        return nms(boxes + offsets[:, None], scores, iou_threshold)

    tv = types.ModuleType("torchvision")
    tv.__path__ = []
    transforms = types.ModuleType("torchvision.transforms")
    transforms.__path__ = []
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize = resize
    functional.to_pil_image = to_pil_image
    ops = types.ModuleType("torchvision.ops")
    ops.__path__ = []
    boxes_mod = types.ModuleType("torchvision.ops.boxes")
    boxes_mod.batched_nms = batched_nms
    boxes_mod.nms = nms
    boxes_mod.box_iou = box_iou
    boxes_mod.box_area = box_area
    ops.boxes = boxes_mod
    ops.batched_nms = batched_nms
    ops.nms = nms
    transforms.functional = functional
    tv.transforms = transforms
    tv.ops = ops
    sys.modules.update(
        {
            "torchvision": tv,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
            "torchvision.ops": ops,
            "torchvision.ops.boxes": boxes_mod,
        }
    )


def _ensure_torchvision() -> None:
    try:
        import torchvision.ops
        import torchvision.transforms.functional  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _install_torchvision_standin()


def _install_timm_standin() -> None:
    # mobile_sam takes DropPath, to_2tuple and trunc_normal_ from timm.models.layers; only
    # DropPath's identity-at-eval behaviour matters for parity (weights are loaded, not drawn).
    from torch import nn

    class DropPath(nn.Module):
        def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            if self.drop_prob == 0.0 or not self.training:
                return x
            keep = 1 - self.drop_prob
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
            return x * mask / keep

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    timm = types.ModuleType("timm")
    timm.__path__ = []
    models = types.ModuleType("timm.models")
    models.__path__ = []
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = DropPath
    layers.to_2tuple = to_2tuple
    layers.trunc_normal_ = nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    models.layers = layers
    models.registry = registry
    timm.models = models
    sys.modules.update(
        {
            "timm": timm,
            "timm.models": models,
            "timm.models.layers": layers,
            "timm.models.registry": registry,
        }
    )


def _ensure_timm() -> None:
    try:
        import timm.models.layers
        import timm.models.registry  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[name]
        _install_timm_standin()


_ensure_torchvision()
_ensure_timm()

import mobile_sam  # noqa: E402
import segment_anything  # noqa: E402
import segment_anything.automatic_mask_generator  # noqa: E402

STANDINS: dict[str, types.ModuleType] = {}
"""The stand-in modules the references were imported with (empty where the real ones load)."""


def _drop_standins() -> None:
    # The references hold the stand-ins they imported; leaving them in sys.modules (with no
    # __spec__) would make importlib.util.find_spec raise for every later availability probe
    # (transformers asks for torchvision and timm), so they leave once the references are in.
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
        if getattr(sys.modules[name], "__spec__", None) is None:
            STANDINS[name] = sys.modules.pop(name)


@contextlib.contextmanager
def standins() -> Iterator[None]:
    """Put the stand-ins back while more reference modules import (e.g. sam2's predictors)."""
    sys.modules.update(STANDINS)
    try:
        yield
    finally:
        _drop_standins()


def module(name: str) -> types.ModuleType:
    """A torchvision/timm module as the references see it: the real one or its stand-in."""
    return STANDINS.get(name) or sys.modules[name]


_drop_standins()

__all__ = ["mobile_sam", "segment_anything"]


def build_reference_sam(
    image_size: int,
    vit: dict,
    *,
    window_size: int = 14,
    state_dict: dict | None = None,
):
    """segment_anything's ``Sam`` at any encoder size, as its own builder composes it.

    ``vit`` holds ``embed_dim``, ``depth``, ``num_heads`` and ``global_attn_indexes``. With a
    ``state_dict`` the weights are loaded strictly; the model is returned in eval mode.
    """
    from functools import partial

    m = segment_anything.modeling
    grid = image_size // 16
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            img_size=image_size,
            patch_size=16,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            window_size=window_size,
            out_chans=256,
            **{**vit, "global_attn_indexes": list(vit["global_attn_indexes"])},
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=256,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    if state_dict is not None:
        sam.load_state_dict(state_dict, strict=True)
    return sam.eval()

"""Meta's ``sam2==1.1.0`` built without hydra or checkpoints, for parity tests (test-only).

:func:`build_reference_sam2` composes ``SAM2VideoPredictor`` (a ``SAM2Base``) from its classes
with the values of ``configs/sam2.1/sam2.1_hiera_t.yaml`` and the overrides that
``build_sam2_video_predictor`` applies, at any input size, with random weights. The image
predictor's transforms import torchvision, whose registry wheels cannot load beside a CPU torch;
when it is missing, stand-ins reproduce the three pieces used, with torchvision's documented
tensor behaviour: ``ToTensor`` (HWC uint8 -> CHW float in [0, 1]), ``Resize`` (bilinear,
antialiased, on the float tensor) and ``Normalize``.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import reference  # noqa: F401  (installs the torchvision ops stand-ins first)


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


_ensure_transforms()

from sam2.modeling.backbones.hieradet import Hiera  # noqa: E402
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder  # noqa: E402
from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer  # noqa: E402
from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder  # noqa: E402
from sam2.modeling.position_encoding import PositionEmbeddingSine  # noqa: E402
from sam2.modeling.sam.transformer import RoPEAttention  # noqa: E402
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402
from sam2.sam2_video_predictor import SAM2VideoPredictor  # noqa: E402

__all__ = ["SAM2ImagePredictor", "SAM2VideoPredictor", "build_reference_sam2", "image_predictor"]


def build_reference_sam2(image_size: int = 256, seed: int = 0, **overrides) -> SAM2VideoPredictor:
    """sam2.1 hiera-tiny as ``build_sam2_video_predictor`` configures it, random weights, eval.

    ``overrides`` replace ``SAM2VideoPredictor`` arguments (e.g. ``fill_hole_area=0``).
    """
    torch.manual_seed(seed)
    grid = image_size // 16
    encoder = ImageEncoder(
        trunk=Hiera(
            embed_dim=96,
            num_heads=1,
            stages=[1, 2, 7, 2],
            global_att_blocks=[5, 7, 9],
            window_pos_embed_bkg_spatial_size=[7, 7],
        ),
        neck=FpnNeck(
            position_encoding=PositionEmbeddingSine(
                num_pos_feats=256, normalize=True, scale=None, temperature=10000
            ),
            d_model=256,
            backbone_channel_list=[768, 384, 192, 96],
            fpn_top_down_levels=[2, 3],
            fpn_interp_model="nearest",
        ),
        scalp=1,
    )
    rope = dict(rope_theta=10000.0, feat_sizes=[grid, grid], embedding_dim=256, num_heads=1)
    attention = MemoryAttention(
        d_model=256,
        pos_enc_at_input=True,
        layer=MemoryAttentionLayer(
            activation="relu",
            dim_feedforward=2048,
            dropout=0.1,
            pos_enc_at_attn=False,
            self_attention=RoPEAttention(**rope, downsample_rate=1, dropout=0.1),
            d_model=256,
            pos_enc_at_cross_attn_keys=True,
            pos_enc_at_cross_attn_queries=False,
            cross_attention=RoPEAttention(
                **rope, rope_k_repeat=True, downsample_rate=1, dropout=0.1, kv_in_dim=64
            ),
        ),
        num_layers=4,
    )
    memory_encoder = MemoryEncoder(
        out_dim=64,
        position_encoding=PositionEmbeddingSine(
            num_pos_feats=64, normalize=True, scale=None, temperature=10000
        ),
        mask_downsampler=MaskDownSampler(kernel_size=3, stride=2, padding=1),
        fuser=Fuser(
            layer=CXBlock(
                dim=256, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True
            ),
            num_layers=2,
        ),
    )
    options = dict(
        num_maskmem=7,
        image_size=image_size,
        sigmoid_scale_for_mem_enc=20.0,
        sigmoid_bias_for_mem_enc=-10.0,
        use_mask_input_as_output_without_sam=True,
        directly_add_no_mem_embed=True,
        no_obj_embed_spatial=True,
        use_high_res_features_in_sam=True,
        multimask_output_in_sam=True,
        iou_prediction_use_sigmoid=True,
        use_obj_ptrs_in_encoder=True,
        add_tpos_enc_to_obj_ptrs=True,
        proj_tpos_enc_in_obj_ptrs=True,
        use_signed_tpos_enc_to_obj_ptrs=True,
        only_obj_ptrs_in_the_past_for_eval=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        fixed_no_obj_ptr=True,
        multimask_output_for_tracking=True,
        use_multimask_token_for_obj_ptr=True,
        multimask_min_pt_num=0,
        multimask_max_pt_num=1,
        use_mlp_for_obj_ptr_proj=True,
        compile_image_encoder=False,
        # build_sam2_video_predictor's post-processing overrides
        sam_mask_decoder_extra_args=dict(
            dynamic_multimask_via_stability=True,
            dynamic_multimask_stability_delta=0.05,
            dynamic_multimask_stability_thresh=0.98,
        ),
        binarize_mask_from_pts_for_mem_enc=True,
        fill_hole_area=0,
    )
    options.update(overrides)
    model = SAM2VideoPredictor(
        image_encoder=encoder,
        memory_attention=attention,
        memory_encoder=memory_encoder,
        **options,
    )
    return model.eval()


def image_predictor(model, **kwargs) -> SAM2ImagePredictor:
    """``SAM2ImagePredictor`` on ``model``, with its feature sizes set for ``model.image_size``
    (the reference hard-codes those of a 1024 input)."""
    predictor = SAM2ImagePredictor(model, **kwargs)
    s = model.image_size
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return predictor

"""Meta's ``sam2`` (1.1.0) for parity tests, built from its classes without hydra configs.

The package imports hydra (and iopath) when imported; the modelling modules used here do not
import torchvision, so no stand-in is needed (``tests/reference`` has one for the predictors).
"""

from __future__ import annotations

import torch
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam.transformer import RoPEAttention
from sam2.modeling.sam2_base import SAM2Base

__all__ = ["SAM2Base", "build_reference_sam2"]


def build_reference_sam2(image_size: int, hiera: dict, **overrides) -> SAM2Base:
    """``SAM2Base`` as ``configs/sam2.1/sam2.1_hiera_*.yaml`` composes it (with the builder's
    dynamic-multimask post-processing), at any image size, in eval mode.

    ``hiera`` holds the trunk's kwargs (``embed_dim``, ``num_heads``, ``stages``,
    ``global_att_blocks``, ``window_spec``, ``window_pos_embed_bkg_spatial_size``).
    """
    trunk = Hiera(**{k: list(v) if isinstance(v, tuple) else v for k, v in hiera.items()})
    grid = image_size // 16
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(
            num_pos_feats=256, normalize=True, scale=None, temperature=10000
        ),
        d_model=256,
        backbone_channel_list=trunk.channel_list,
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )

    def rope(**kwargs):
        return RoPEAttention(
            rope_theta=10000.0,
            feat_sizes=[grid, grid],
            embedding_dim=256,
            num_heads=1,
            downsample_rate=1,
            dropout=0.1,
            **kwargs,
        )

    memory_attention = MemoryAttention(
        d_model=256,
        pos_enc_at_input=True,
        layer=MemoryAttentionLayer(
            activation="relu",
            dim_feedforward=2048,
            dropout=0.1,
            pos_enc_at_attn=False,
            self_attention=rope(),
            d_model=256,
            pos_enc_at_cross_attn_keys=True,
            pos_enc_at_cross_attn_queries=False,
            cross_attention=rope(rope_k_repeat=True, kv_in_dim=64),
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
    settings = dict(
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
        sam_mask_decoder_extra_args={
            "dynamic_multimask_via_stability": True,
            "dynamic_multimask_stability_delta": 0.05,
            "dynamic_multimask_stability_thresh": 0.98,
        },
    )
    settings.update(overrides)
    model = SAM2Base(
        image_encoder=ImageEncoder(scalp=1, trunk=trunk, neck=neck),
        memory_attention=memory_attention,
        memory_encoder=memory_encoder,
        **settings,
    )
    return model.eval()


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter random values of a sensible scale (the constructors leave some
    at zero or one, which would hide mistakes): 1-D tensors near their init, others by fan-in."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1:
                base = (
                    1.0
                    if name.endswith(
                        (
                            "norm1.weight",
                            "norm2.weight",
                            "norm3.weight",
                            "norm4.weight",
                            "norm.weight",
                        )
                    )
                    else 0.0
                )
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)

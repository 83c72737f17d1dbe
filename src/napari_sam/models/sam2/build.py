"""Build a :class:`Sam2` from a :class:`~napari_sam.registry.ModelSpec` (SAM 2.1 layout).

Everything except the Hiera trunk is the same in the four official sizes and MedSAM2; the
values below are those of SAM 2.1's released configurations, and the head widths come
from ``spec.heads`` (SAM 2.1's unless ``spec.head_kwargs`` narrows them, as for the test
fixture). ``image_size`` comes from the spec (1024 officially, 512 for MedSAM2, any multiple
of 32 for tests).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from napari_sam.models.mask_decoder import MLP
from napari_sam.models.prompt_encoder import PromptEncoder
from napari_sam.models.sam2.detect import ATTENTION_KEYS
from napari_sam.models.sam2.hiera import Hiera
from napari_sam.models.sam2.image_encoder import FpnNeck, ImageEncoder
from napari_sam.models.sam2.mask_decoder import Sam2MaskDecoder
from napari_sam.models.sam2.memory_attention import MemoryAttention, MemoryAttentionLayer
from napari_sam.models.sam2.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from napari_sam.models.sam2.position_encoding import PositionEmbeddingSine
from napari_sam.models.sam2.rope import RoPEAttention
from napari_sam.models.sam2.sam2 import Sam2
from napari_sam.models.transformer import TwoWayTransformer
from napari_sam.registry import ModelSpec, get_spec

__all__ = ["build_sam2", "build_sam2_modules"]

MEM_DIM = 64  # width of the memories
BACKBONE_STRIDE = 16


def _two_layer_mlp(embedding_dim: int, mlp_dim: int, activation: type[nn.Module]) -> nn.Module:
    # SAM 2 names its decoder MLP's layers ``layers.0`` / ``layers.1`` (SAM: lin1 / lin2).
    return MLP(embedding_dim, mlp_dim, embedding_dim, 2, activation=activation)


def build_sam2_modules(
    spec: ModelSpec,
    *,
    dynamic_multimask_via_stability: bool = True,
    **sam2_kwargs: Any,
) -> Sam2:
    """The randomly initialised model of ``spec`` (SAM 2.1 settings unless overridden).

    Parameters
    ----------
    spec : ModelSpec
        ``family == "sam2"``; ``encoder_kwargs`` are :class:`Hiera`'s.
    dynamic_multimask_via_stability : bool
        The decoder's single-mask fallback (on in SAM 2's builders for inference).
    **sam2_kwargs
        Overrides of :class:`Sam2`'s settings (e.g. ``binarize_mask_from_pts_for_mem_enc``).
    """
    size = spec.image_size
    if size % 32:
        raise ValueError(f"SAM 2 needs an image size that is a multiple of 32, got {size}")
    grid = size // BACKBONE_STRIDE
    heads = spec.heads
    d_model = int(heads["d_model"])
    if d_model % MEM_DIM:
        # Object pointers (d_model wide) join the memory as d_model / 64 tokens of 64.
        raise ValueError(
            f"model spec {spec.name!r}: head_kwargs d_model must be a multiple of {MEM_DIM}, "
            f"got {d_model}"
        )
    hiera_kwargs = dict(spec.encoder_kwargs)
    unknown = [k for k in ATTENTION_KEYS if k not in hiera_kwargs]
    if unknown:
        raise ValueError(
            f"model spec {spec.name!r} lacks {', '.join(unknown)}: a SAM 2 checkpoint's "
            "attention layout is not stored in its weights. Load the file with the spec it was "
            "trained with (model_type=...), or save it with napari_sam.weights.save_checkpoint "
            "(which embeds the spec)"
        )
    trunk = Hiera(**hiera_kwargs)
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(d_model),
        d_model=d_model,
        backbone_channel_list=trunk.channel_list,
        fpn_top_down_levels=(2, 3),
        fpn_interp_model="nearest",
    )
    image_encoder = ImageEncoder(trunk, neck, scalp=1)

    def rope(**kwargs: Any) -> RoPEAttention:
        return RoPEAttention(
            d_model,
            1,
            downsample_rate=1,
            dropout=0.1,
            rope_theta=10000.0,
            feat_sizes=(grid, grid),
            **kwargs,
        )

    memory_attention = MemoryAttention(
        d_model=d_model,
        pos_enc_at_input=True,
        layer=MemoryAttentionLayer(
            activation="relu",
            cross_attention=rope(rope_k_repeat=True, kv_in_dim=MEM_DIM),
            d_model=d_model,
            dim_feedforward=int(heads["memory_mlp_dim"]),
            dropout=0.1,
            pos_enc_at_attn=False,
            pos_enc_at_cross_attn_keys=True,
            pos_enc_at_cross_attn_queries=False,
            self_attention=rope(),
        ),
        num_layers=int(heads["memory_layers"]),
    )
    memory_encoder = MemoryEncoder(
        out_dim=MEM_DIM,
        mask_downsampler=MaskDownSampler(embed_dim=d_model, kernel_size=3, stride=2, padding=1),
        fuser=Fuser(CXBlock(d_model, kernel_size=7, padding=3), num_layers=2),
        position_encoding=PositionEmbeddingSine(MEM_DIM),
        in_dim=d_model,
    )
    settings: dict[str, Any] = {
        "num_maskmem": 7,
        "image_size": size,
        "backbone_stride": BACKBONE_STRIDE,
        **sam2_kwargs,
    }
    prompt_encoder = PromptEncoder(
        embed_dim=d_model,
        image_embedding_size=(grid, grid),
        input_image_size=(size, size),
        mask_in_chans=16,
    )
    mask_decoder = Sam2MaskDecoder(
        transformer_dim=d_model,
        transformer=TwoWayTransformer(
            depth=2,
            embedding_dim=d_model,
            num_heads=8,
            mlp_dim=int(heads["decoder_mlp_dim"]),
            mlp_block=_two_layer_mlp,
        ),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=d_model,
        use_high_res_features=settings.get("use_high_res_features_in_sam", True),
        iou_prediction_use_sigmoid=settings.get("iou_prediction_use_sigmoid", True),
        pred_obj_scores=settings.get("pred_obj_scores", True),
        pred_obj_scores_mlp=settings.get("pred_obj_scores_mlp", True),
        use_multimask_token_for_obj_ptr=settings.get("use_multimask_token_for_obj_ptr", True),
        dynamic_multimask_via_stability=dynamic_multimask_via_stability,
    )
    return Sam2(
        image_encoder,
        memory_attention,
        memory_encoder,
        prompt_encoder,
        mask_decoder,
        spec=spec,
        **settings,
    )


def build_sam2(spec: ModelSpec | str, **kwargs: Any) -> Sam2:
    """Build the SAM 2 model of ``spec``, randomly initialised, eval mode, float32.

    On the CPU, or on the current default device (``with torch.device("meta"):`` builds it
    without allocating weights). Weights files are :mod:`napari_sam.weights`' concern:
    ``load_model("sam2.1_hiera_tiny")``, ``build_sam(spec, checkpoint)`` or
    ``sam_model_registry[name](checkpoint=path)`` there.

    Parameters
    ----------
    spec : ModelSpec or str
        A spec with ``family == "sam2"``, or a registry name (``"sam2.1_hiera_tiny"``, ...).
    **kwargs
        Passed to :func:`build_sam2_modules` (settings overrides, e.g.
        ``binarize_mask_from_pts_for_mem_enc=True`` as SAM 2's video predictor uses).

    Returns
    -------
    Sam2
        With ``model.spec`` set.
    """
    if isinstance(spec, str):
        spec = get_spec(spec)
    elif not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec or a registry name, got {type(spec).__name__}")
    if spec.family != "sam2":
        raise ValueError(f"model {spec.name!r} is not a SAM 2 model (family {spec.family!r})")
    try:
        model = build_sam2_modules(spec, **kwargs)
    except TypeError as err:
        raise ValueError(
            f"model spec {spec.name!r} has settings SAM 2 does not accept: {err}"
        ) from None
    return model.eval().to(dtype=torch.float32)

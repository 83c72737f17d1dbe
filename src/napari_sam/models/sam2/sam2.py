"""SAM 2: image encoder, memory attention, memory encoder and SAM heads, with tracking steps.

:class:`Sam2` holds the modules and the per-frame step of SAM 2's tracker. A frame is
encoded once (:meth:`Sam2.forward_image`, :meth:`Sam2._prepare_backbone_features`); then
:meth:`Sam2.track_step` conditions its lowest-resolution features on the memory bank (the
prompted frames and the last ``num_maskmem - 1`` tracked frames, plus object pointers),
decodes a mask with the SAM heads and encodes the result as a new memory. The memory bank
(``output_dict``) belongs to the caller: a video / volume predictor.

Method names, signatures and the dictionaries they exchange mirror Meta's ``SAM2Base`` so
that a predictor written against either drives both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.models.mask_decoder import MLP
from napari_sam.models.prompt_encoder import PromptEncoder
from napari_sam.models.sam2.image_encoder import ImageEncoder
from napari_sam.models.sam2.mask_decoder import Sam2MaskDecoder
from napari_sam.models.sam2.memory_attention import MemoryAttention
from napari_sam.models.sam2.memory_encoder import MemoryEncoder
from napari_sam.models.sam2.position_encoding import sine_encoding_1d

__all__ = ["NO_OBJ_SCORE", "Sam2"]

NO_OBJ_SCORE = -1024.0
"""Mask logit written over a frame where the object is predicted absent."""

_PIXEL_MEAN = (123.675, 116.28, 103.53)
_PIXEL_STD = (58.395, 57.12, 57.375)

# Logits standing for a given binary mask: sigmoid(+-10) is 1 - 4.5e-5 / 4.5e-5.
_MASK_OUT_SCALE, _MASK_OUT_BIAS = 20.0, -10.0

FrameOutput = dict[str, Any]
"""One frame's entry of the memory bank: ``maskmem_features``, ``maskmem_pos_enc``,
``obj_ptr``, ``pred_masks``, ``pred_masks_high_res``, ``object_score_logits``,
``point_inputs``, ``mask_inputs``."""


class Sam2(nn.Module):
    """SAM 2 (2.1 settings by default).

    Parameters
    ----------
    image_encoder : ImageEncoder
        Hiera trunk + FPN neck; ``image_encoder.neck.d_model`` is the model width.
    memory_attention : MemoryAttention
        Conditions a frame's features on the memory bank.
    memory_encoder : MemoryEncoder
        Frame features + mask -> memory (its ``out_proj`` sets the memory width).
    sam_prompt_encoder : PromptEncoder
        Points (boxes as two corner points) and masks to embeddings.
    sam_mask_decoder : Sam2MaskDecoder
        Embeddings to masks, IoUs, output tokens and object scores.
    num_maskmem : int
        Memories attended to: the prompted frames (temporal slot 0) plus the
        ``num_maskmem - 1`` latest tracked frames.
    image_size : int
        Side of the square encoder input.
    backbone_stride : int
        Stride of the lowest-resolution features used (16).
    sigmoid_scale_for_mem_enc, sigmoid_bias_for_mem_enc : float
        Mask probabilities are scaled and shifted before the memory encoder (20, -10).
    binarize_mask_from_pts_for_mem_enc : bool
        In eval, encode masks of clicked frames as hard 0/1 (SAM 2's video predictor sets it).
    use_mask_input_as_output_without_sam : bool
        A mask prompt on a frame is taken as that frame's output as is.
    max_cond_frames_in_attn : int
        Prompted frames attended to (the closest ones); -1 for all.
    directly_add_no_mem_embed : bool
        On a first prompted frame, add ``no_mem_embed`` instead of running memory attention.
    use_high_res_features_in_sam : bool
        Feed the stride-4 / stride-8 features to the decoder.
    multimask_output_in_sam, multimask_min_pt_num, multimask_max_pt_num,
    multimask_output_for_tracking : bool / int
        When the decoder returns three masks (the best is kept): first prompted frame (and
        tracked frames with ``multimask_output_for_tracking``) with a point count in the range.
    use_multimask_token_for_obj_ptr : bool
        The object pointer comes from the chosen multimask token.
    iou_prediction_use_sigmoid : bool
        IoU predictions in (0, 1).
    memory_temporal_stride_for_eval : int
        Stride between the tracked frames kept as memories in eval.
    non_overlap_masks_for_mem_enc : bool
        In eval, objects of a batch do not overlap in their encoded memories.
    use_obj_ptrs_in_encoder : bool
        Object pointers of earlier frames join the memory.
    max_obj_ptrs_in_encoder : int
        Frames whose pointers are attended to.
    add_tpos_enc_to_obj_ptrs, proj_tpos_enc_in_obj_ptrs, use_signed_tpos_enc_to_obj_ptrs : bool
        Temporal encoding of the pointers: added, projected by ``obj_ptr_tpos_proj``, signed
        frame distance.
    only_obj_ptrs_in_the_past_for_eval : bool
        In eval, pointers of prompted frames ahead of the current one are not used.
    pred_obj_scores, pred_obj_scores_mlp : bool
        The decoder predicts object presence (with an MLP).
    fixed_no_obj_ptr, soft_no_obj_ptr : bool
        Absent object: pointer replaced by ``no_obj_ptr`` (hard, or mixed by probability).
    use_mlp_for_obj_ptr_proj : bool
        ``obj_ptr_proj`` is a 3-layer MLP, not a linear layer.
    no_obj_embed_spatial : bool
        Memories of frames without the object get ``no_obj_embed_spatial`` added.
    spec : ModelSpec or None
        What the model was built from.

    Attributes
    ----------
    pixel_mean, pixel_std : Tensor
        ``3 x 1 x 1`` normalisation of 0..255 RGB (ImageNet's, as SAM's): a frame is
        stretched to ``image_size`` squared, then ``(x - pixel_mean) / pixel_std``.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: ImageEncoder,
        memory_attention: MemoryAttention,
        memory_encoder: MemoryEncoder,
        sam_prompt_encoder: PromptEncoder,
        sam_mask_decoder: Sam2MaskDecoder,
        *,
        num_maskmem: int = 7,
        image_size: int = 1024,
        backbone_stride: int = 16,
        sigmoid_scale_for_mem_enc: float = 20.0,
        sigmoid_bias_for_mem_enc: float = -10.0,
        binarize_mask_from_pts_for_mem_enc: bool = False,
        use_mask_input_as_output_without_sam: bool = True,
        max_cond_frames_in_attn: int = -1,
        directly_add_no_mem_embed: bool = True,
        use_high_res_features_in_sam: bool = True,
        multimask_output_in_sam: bool = True,
        multimask_min_pt_num: int = 0,
        multimask_max_pt_num: int = 1,
        multimask_output_for_tracking: bool = True,
        use_multimask_token_for_obj_ptr: bool = True,
        iou_prediction_use_sigmoid: bool = True,
        memory_temporal_stride_for_eval: int = 1,
        non_overlap_masks_for_mem_enc: bool = False,
        use_obj_ptrs_in_encoder: bool = True,
        max_obj_ptrs_in_encoder: int = 16,
        add_tpos_enc_to_obj_ptrs: bool = True,
        proj_tpos_enc_in_obj_ptrs: bool = True,
        use_signed_tpos_enc_to_obj_ptrs: bool = True,
        only_obj_ptrs_in_the_past_for_eval: bool = True,
        pred_obj_scores: bool = True,
        pred_obj_scores_mlp: bool = True,
        fixed_no_obj_ptr: bool = True,
        soft_no_obj_ptr: bool = False,
        use_mlp_for_obj_ptr_proj: bool = True,
        no_obj_embed_spatial: bool = True,
        spec: Any = None,
    ) -> None:
        super().__init__()
        if proj_tpos_enc_in_obj_ptrs and not add_tpos_enc_to_obj_ptrs:
            raise ValueError("proj_tpos_enc_in_obj_ptrs needs add_tpos_enc_to_obj_ptrs")
        if fixed_no_obj_ptr and not (pred_obj_scores and use_obj_ptrs_in_encoder):
            raise ValueError("fixed_no_obj_ptr needs pred_obj_scores and use_obj_ptrs_in_encoder")
        self.spec = spec
        # SAM 2 normalises [0, 1] RGB by ImageNet's mean / std: on the 0..255 scale these are
        # SAM's pixel_mean / pixel_std. Constants, kept out of the state dict.
        self.register_buffer("pixel_mean", torch.tensor(_PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(_PIXEL_STD).view(-1, 1, 1), False)
        self.image_encoder = image_encoder
        self.memory_attention = memory_attention
        self.memory_encoder = memory_encoder
        self.sam_prompt_encoder = sam_prompt_encoder
        self.sam_mask_decoder = sam_mask_decoder

        self.image_size = image_size
        self.backbone_stride = backbone_stride
        self.hidden_dim = int(image_encoder.neck.d_model)
        # The memory encoder's output projection narrows memories (to 64 in SAM 2).
        out_weight = getattr(getattr(memory_encoder, "out_proj", None), "weight", None)
        self.mem_dim = int(out_weight.shape[0]) if out_weight is not None else self.hidden_dim
        self.sam_prompt_embed_dim = self.hidden_dim
        self.sam_image_embedding_size = image_size // backbone_stride
        if tuple(sam_prompt_encoder.image_embedding_size) != (self.sam_image_embedding_size,) * 2:
            raise ValueError(
                f"the prompt encoder's grid {tuple(sam_prompt_encoder.image_embedding_size)} "
                f"does not match image_size {image_size} / stride {backbone_stride}"
            )

        self.use_high_res_features_in_sam = use_high_res_features_in_sam
        self.num_feature_levels = 3 if use_high_res_features_in_sam else 1
        self.num_maskmem = num_maskmem
        self.sigmoid_scale_for_mem_enc = sigmoid_scale_for_mem_enc
        self.sigmoid_bias_for_mem_enc = sigmoid_bias_for_mem_enc
        self.binarize_mask_from_pts_for_mem_enc = binarize_mask_from_pts_for_mem_enc
        self.non_overlap_masks_for_mem_enc = non_overlap_masks_for_mem_enc
        self.memory_temporal_stride_for_eval = memory_temporal_stride_for_eval
        self.use_mask_input_as_output_without_sam = use_mask_input_as_output_without_sam
        self.max_cond_frames_in_attn = max_cond_frames_in_attn
        self.directly_add_no_mem_embed = directly_add_no_mem_embed
        self.multimask_output_in_sam = multimask_output_in_sam
        self.multimask_min_pt_num = multimask_min_pt_num
        self.multimask_max_pt_num = multimask_max_pt_num
        self.multimask_output_for_tracking = multimask_output_for_tracking
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        self.iou_prediction_use_sigmoid = iou_prediction_use_sigmoid
        self.use_obj_ptrs_in_encoder = use_obj_ptrs_in_encoder
        self.max_obj_ptrs_in_encoder = max_obj_ptrs_in_encoder
        self.add_tpos_enc_to_obj_ptrs = add_tpos_enc_to_obj_ptrs
        self.proj_tpos_enc_in_obj_ptrs = proj_tpos_enc_in_obj_ptrs
        self.use_signed_tpos_enc_to_obj_ptrs = use_signed_tpos_enc_to_obj_ptrs
        self.only_obj_ptrs_in_the_past_for_eval = only_obj_ptrs_in_the_past_for_eval
        self.pred_obj_scores = pred_obj_scores
        self.pred_obj_scores_mlp = pred_obj_scores_mlp
        self.fixed_no_obj_ptr = fixed_no_obj_ptr
        self.soft_no_obj_ptr = soft_no_obj_ptr
        self.use_mlp_for_obj_ptr_proj = use_mlp_for_obj_ptr_proj

        # Learned embeddings; a checkpoint supplies them (small random values otherwise).
        self.maskmem_tpos_enc = nn.Parameter(_trunc_normal(num_maskmem, 1, 1, self.mem_dim))
        self.no_mem_embed = nn.Parameter(_trunc_normal(1, 1, self.hidden_dim))
        self.no_mem_pos_enc = nn.Parameter(_trunc_normal(1, 1, self.hidden_dim))
        if use_obj_ptrs_in_encoder:
            # Brings a mask prompt to stride 4 and SAM's logit scale, to derive a pointer.
            self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        if pred_obj_scores and use_obj_ptrs_in_encoder:
            self.no_obj_ptr = nn.Parameter(_trunc_normal(1, self.hidden_dim))
        self.no_obj_embed_spatial = (
            nn.Parameter(_trunc_normal(1, self.mem_dim)) if no_obj_embed_spatial else None
        )
        if not use_obj_ptrs_in_encoder:
            self.obj_ptr_proj: nn.Module = nn.Identity()
        elif use_mlp_for_obj_ptr_proj:
            self.obj_ptr_proj = MLP(self.hidden_dim, self.hidden_dim, self.hidden_dim, 3)
        else:
            self.obj_ptr_proj = nn.Linear(self.hidden_dim, self.hidden_dim)
        self.obj_ptr_tpos_proj: nn.Module = (
            nn.Linear(self.hidden_dim, self.mem_dim) if proj_tpos_enc_in_obj_ptrs else nn.Identity()
        )

    @property
    def device(self) -> torch.device:
        """The device of the weights."""
        return self.no_mem_embed.device

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Not available: SAM 2 runs frame by frame (:meth:`track_step`)."""
        raise NotImplementedError(
            "Sam2 has no single forward: encode frames with forward_image and step through "
            "them with track_step (a video / volume predictor does this)"
        )

    # ----------------------------------------------------------------------------------------
    # Image features

    def forward_image(self, img_batch: torch.Tensor) -> dict[str, Any]:
        """Encode a normalised ``B x 3 x S x S`` batch (``S = image_size``).

        Returns
        -------
        dict
            ``"backbone_fpn"``: three maps, strides 4, 8, 16 (the first two already through
            the decoder's ``conv_s0`` / ``conv_s1`` with high-resolution features);
            ``"vision_pos_enc"``: their sine encodings; ``"vision_features"``: the stride-16
            map.
        """
        if img_batch.ndim != 4 or img_batch.shape[1] != 3:
            raise ValueError(f"expected a B x 3 x H x W batch, got {tuple(img_batch.shape)}")
        if tuple(img_batch.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size} x {self.image_size} frames (resize first), got "
                f"{tuple(img_batch.shape[-2:])}"
            )
        out = self.image_encoder(img_batch)
        if self.use_high_res_features_in_sam:
            # Projected once per frame rather than on every click.
            fpn = list(out["backbone_fpn"])
            fpn[0] = self.sam_mask_decoder.conv_s0(fpn[0])
            fpn[1] = self.sam_mask_decoder.conv_s1(fpn[1])
            out["backbone_fpn"] = fpn
        return out

    def _prepare_backbone_features(
        self, backbone_out: dict[str, Any]
    ) -> tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        """The levels the heads use, flattened sequence-first.

        Returns
        -------
        backbone_out : dict
            A shallow copy of the input.
        vision_feats, vision_pos_embeds : list of Tensor
            ``HW x B x C_level`` per level, highest resolution first.
        feat_sizes : list of (int, int)
            ``(H, W)`` per level.
        """
        backbone_out = dict(backbone_out)
        fpn, pos = backbone_out["backbone_fpn"], backbone_out["vision_pos_enc"]
        if len(fpn) != len(pos) or len(fpn) < self.num_feature_levels:
            raise ValueError(
                f"backbone output has {len(fpn)} feature and {len(pos)} encoding levels; "
                f"{self.num_feature_levels} needed"
            )
        maps = fpn[-self.num_feature_levels :]
        encodings = pos[-self.num_feature_levels :]
        feat_sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in encodings]
        vision_feats = [x.flatten(2).permute(2, 0, 1) for x in maps]
        vision_pos_embeds = [x.flatten(2).permute(2, 0, 1) for x in encodings]
        return backbone_out, vision_feats, vision_pos_embeds, feat_sizes

    # ----------------------------------------------------------------------------------------
    # SAM heads

    def _forward_sam_heads(
        self,
        backbone_features: torch.Tensor,
        point_inputs: dict[str, torch.Tensor] | None = None,
        mask_inputs: torch.Tensor | None = None,
        high_res_features: list[torch.Tensor] | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Prompt encoder + mask decoder on one frame's (memory-conditioned) features.

        Parameters
        ----------
        backbone_features : Tensor
            ``B x C x E x E`` with ``E = image_size / 16``.
        point_inputs : dict or None
            ``"point_coords"`` ``B x P x 2`` (x, y) pixels of the ``image_size`` frame and
            ``"point_labels"`` ``B x P`` (1 fg, 0 bg, 2 / 3 box corners, -1 padding).
        mask_inputs : Tensor or None
            ``B x 1 x h x w`` mask prompt (logits); resized to ``4E`` when needed.
        high_res_features : list of two Tensors or None
            Stride-4 and stride-8 features (projected).
        multimask_output : bool
            Decode three masks and keep the one with the best predicted IoU.

        Returns
        -------
        tuple
            ``low_res_multimasks`` ``B x M x 4E x 4E``, ``high_res_multimasks``
            ``B x M x S x S``, ``ious`` ``B x M``, ``low_res_masks`` ``B x 1 x 4E x 4E``,
            ``high_res_masks`` ``B x 1 x S x S``, ``obj_ptr`` ``B x C``,
            ``object_score_logits`` ``B x 1``. Masks of frames without the object are
            ``NO_OBJ_SCORE``.
        """
        b = backbone_features.shape[0]
        device = backbone_features.device
        e = self.sam_image_embedding_size
        if tuple(backbone_features.shape[1:]) != (self.sam_prompt_embed_dim, e, e):
            raise ValueError(
                f"backbone features must be B x {self.sam_prompt_embed_dim} x {e} x {e}, got "
                f"{tuple(backbone_features.shape)}"
            )
        if point_inputs is not None:
            coords = point_inputs["point_coords"]
            labels = point_inputs["point_labels"]
            if coords.shape[0] != b or labels.shape[0] != b:
                raise ValueError(f"point inputs must have batch {b}")
        else:
            # No points: one padding point, as SAM 2 was trained.
            coords = torch.zeros(b, 1, 2, device=device)
            labels = -torch.ones(b, 1, dtype=torch.int32, device=device)

        sam_mask_prompt = None
        if mask_inputs is not None:
            if mask_inputs.ndim != 4 or tuple(mask_inputs.shape[:2]) != (b, 1):
                raise ValueError(
                    f"mask inputs must be {b} x 1 x H x W, got {tuple(mask_inputs.shape)}"
                )
            size = tuple(self.sam_prompt_encoder.mask_input_size)
            if tuple(mask_inputs.shape[-2:]) != size:
                sam_mask_prompt = F.interpolate(
                    mask_inputs.float(),
                    size=size,
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )
            else:
                sam_mask_prompt = mask_inputs

        sparse, dense = self.sam_prompt_encoder(
            points=(coords, labels), boxes=None, masks=sam_mask_prompt
        )
        low_res_multimasks, ious, sam_output_tokens, object_score_logits = self.sam_mask_decoder(
            image_embeddings=backbone_features,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=False,
            high_res_features=high_res_features,
        )
        if self.pred_obj_scores:
            # The mask kept for memory is a hard choice between object and no object.
            is_obj_appearing = object_score_logits > 0
            low_res_multimasks = torch.where(
                is_obj_appearing[:, None, None], low_res_multimasks, NO_OBJ_SCORE
            )
        low_res_multimasks = low_res_multimasks.float()
        high_res_multimasks = F.interpolate(
            low_res_multimasks,
            size=(self.image_size, self.image_size),
            mode="bilinear",
            align_corners=False,
        )

        sam_output_token = sam_output_tokens[:, 0]
        if multimask_output:
            best = ious.argmax(dim=-1)
            rows = torch.arange(b, device=device)
            low_res_masks = low_res_multimasks[rows, best].unsqueeze(1)
            high_res_masks = high_res_multimasks[rows, best].unsqueeze(1)
            if sam_output_tokens.shape[1] > 1:
                sam_output_token = sam_output_tokens[rows, best]
        else:
            low_res_masks, high_res_masks = low_res_multimasks, high_res_multimasks

        obj_ptr = self.obj_ptr_proj(sam_output_token)
        if self.pred_obj_scores:
            if self.soft_no_obj_ptr:
                appearing = object_score_logits.sigmoid()
            else:
                appearing = is_obj_appearing.float()
            obj_ptr = self._mix_no_obj_ptr(obj_ptr, appearing)
        return (
            low_res_multimasks,
            high_res_multimasks,
            ious,
            low_res_masks,
            high_res_masks,
            obj_ptr,
            object_score_logits,
        )

    def _mix_no_obj_ptr(self, obj_ptr: torch.Tensor, appearing: torch.Tensor) -> torch.Tensor:
        """Pointer of a frame where the object is (``appearing`` 1) or is not (0) present."""
        if self.fixed_no_obj_ptr:
            obj_ptr = appearing * obj_ptr
        return obj_ptr + (1 - appearing) * self.no_obj_ptr

    def _use_mask_as_output(
        self,
        backbone_features: torch.Tensor,
        high_res_features: list[torch.Tensor] | None,
        mask_inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """Outputs for a frame prompted by a mask: the mask itself as +-10 logits.

        Same outputs as :meth:`_forward_sam_heads`; ``mask_inputs`` is ``B x 1 x S x S``
        (binary or probabilities). The object pointer is decoded from the mask, the object
        score is +10 where the mask has any foreground, else -10.
        """
        mask = mask_inputs.float()
        high_res_masks = mask * _MASK_OUT_SCALE + _MASK_OUT_BIAS
        low_res_masks = F.interpolate(
            high_res_masks,
            size=(high_res_masks.shape[-2] // 4, high_res_masks.shape[-1] // 4),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        ious = mask.new_ones(mask.shape[0], 1)
        if self.use_obj_ptrs_in_encoder:
            obj_ptr = self._forward_sam_heads(
                backbone_features=backbone_features,
                mask_inputs=self.mask_downsample(mask),
                high_res_features=high_res_features,
            )[5]
        else:
            obj_ptr = mask.new_zeros(mask.shape[0], self.hidden_dim)
        # Presence follows the given mask, not the decoder's score.
        appearing = (mask.flatten(1) > 0).any(dim=1, keepdim=True).float()
        object_score_logits = _MASK_OUT_SCALE * appearing + _MASK_OUT_BIAS
        if self.pred_obj_scores:
            obj_ptr = self._mix_no_obj_ptr(obj_ptr, appearing)
        return (
            low_res_masks,
            high_res_masks,
            ious,
            low_res_masks,
            high_res_masks,
            obj_ptr,
            object_score_logits,
        )

    # ----------------------------------------------------------------------------------------
    # Memory

    def _memory_frames(
        self,
        frame_idx: int,
        output_dict: dict[str, dict[int, FrameOutput]],
        track_in_reverse: bool,
    ) -> tuple[
        list[tuple[int, FrameOutput | None]], dict[int, FrameOutput], dict[int, FrameOutput]
    ]:
        """Memories for ``frame_idx`` and the prompted frames (not) selected for attention.

        The memories are ``(t_pos, output)`` pairs: slot 0 for prompted frames,
        1..num_maskmem-1 for tracked frames, oldest first.
        """
        cond_outputs = output_dict["cond_frame_outputs"]
        if not cond_outputs:
            raise ValueError(
                f"frame {frame_idx} is not an initial prompted frame, but no frame has been "
                "prompted yet (output_dict['cond_frame_outputs'] is empty)"
            )
        selected, unselected = _select_closest_cond_frames(
            frame_idx, cond_outputs, self.max_cond_frames_in_attn
        )
        pairs: list[tuple[int, FrameOutput | None]] = [(0, out) for out in selected.values()]
        stride = 1 if self.training else self.memory_temporal_stride_for_eval
        step = -1 if track_in_reverse else 1  # direction of "earlier"
        for t_pos in range(1, self.num_maskmem):
            t_rel = self.num_maskmem - t_pos  # frames before the current one
            if t_rel == 1:
                prev = frame_idx - step
            elif not track_in_reverse:
                # Every stride-th frame, counted from the one two before.
                prev = ((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride
            else:
                prev = -(-(frame_idx + 2) // stride) * stride + (t_rel - 2) * stride
            out = output_dict["non_cond_frame_outputs"].get(prev)
            if out is None:
                # A prompted frame left out of the selection still counts as a recent frame.
                out = unselected.get(prev)
            pairs.append((t_pos, out))
        return pairs, selected, unselected

    def _prepare_memory_conditioned_features(
        self,
        frame_idx: int,
        is_init_cond_frame: bool,
        current_vision_feats: list[torch.Tensor],
        current_vision_pos_embeds: list[torch.Tensor],
        feat_sizes: list[tuple[int, int]],
        output_dict: dict[str, dict[int, FrameOutput]],
        num_frames: int,
        track_in_reverse: bool = False,
    ) -> torch.Tensor:
        """The frame's stride-16 features conditioned on the memory bank: ``B x C x H x W``."""
        feats = current_vision_feats[-1]
        b = feats.shape[1]
        c = self.hidden_dim
        h, w = feat_sizes[-1]
        device = feats.device
        if self.num_maskmem == 0:  # SAM on images: no memory at all
            return feats.permute(1, 2, 0).reshape(b, c, h, w)

        num_obj_ptr_tokens = 0
        if is_init_cond_frame:
            if self.directly_add_no_mem_embed:
                return (feats + self.no_mem_embed).permute(1, 2, 0).reshape(b, c, h, w)
            # A dummy memory token keeps the attention's memory non-empty.
            memories = [self.no_mem_embed.expand(1, b, self.mem_dim)]
            memory_pos = [self.no_mem_pos_enc.expand(1, b, self.mem_dim)]
        else:
            memories, memory_pos = [], []
            pairs, selected, unselected = self._memory_frames(
                frame_idx, output_dict, track_in_reverse
            )
            for t_pos, prev in pairs:
                if prev is None:
                    continue  # before the first / after the last frame
                mem = prev["maskmem_features"].to(device, non_blocking=True)
                memories.append(mem.flatten(2).permute(2, 0, 1))
                enc = prev["maskmem_pos_enc"][-1].to(device).flatten(2).permute(2, 0, 1)
                memory_pos.append(enc + self.maskmem_tpos_enc[self.num_maskmem - t_pos - 1])

            if self.use_obj_ptrs_in_encoder:
                ptrs, ptr_pos = self._object_pointers(
                    frame_idx,
                    output_dict,
                    selected,
                    unselected,
                    num_frames,
                    track_in_reverse,
                    b,
                    device,
                )
                if ptrs is not None and ptr_pos is not None:
                    memories.append(ptrs)
                    memory_pos.append(ptr_pos)
                    num_obj_ptr_tokens = ptrs.shape[0]

        memory = torch.cat(memories, dim=0)
        memory_pos_embed = torch.cat(memory_pos, dim=0)
        conditioned = self.memory_attention(
            curr=current_vision_feats,
            curr_pos=current_vision_pos_embeds,
            memory=memory,
            memory_pos=memory_pos_embed,
            num_obj_ptr_tokens=num_obj_ptr_tokens,
        )
        return conditioned.permute(1, 2, 0).reshape(b, c, h, w)

    def _object_pointers(
        self,
        frame_idx: int,
        output_dict: dict[str, dict[int, FrameOutput]],
        selected: dict[int, FrameOutput],
        unselected: dict[int, FrameOutput],
        num_frames: int | None,
        track_in_reverse: bool,
        b: int,
        device: torch.device,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Object-pointer tokens ``N x B x mem_dim`` and their temporal encodings.

        Each pointer is split into ``C / mem_dim`` tokens; (None, None) when there are none.
        """
        c = self.hidden_dim
        max_ptrs = self.max_obj_ptrs_in_encoder
        if num_frames is not None:
            max_ptrs = min(num_frames, max_ptrs)
        sign = -1 if track_in_reverse else 1
        cond = selected
        if not self.training and self.only_obj_ptrs_in_the_past_for_eval:
            cond = {
                t: out
                for t, out in selected.items()
                if (t >= frame_idx if track_in_reverse else t <= frame_idx)
            }
        pos_and_ptrs = [
            (
                (frame_idx - t) * sign
                if self.use_signed_tpos_enc_to_obj_ptrs
                else abs(frame_idx - t),
                out["obj_ptr"],
            )
            for t, out in cond.items()
        ]
        for t_diff in range(1, max_ptrs):
            t = frame_idx + t_diff if track_in_reverse else frame_idx - t_diff
            if t < 0 or (num_frames is not None and t >= num_frames):
                break
            out = output_dict["non_cond_frame_outputs"].get(t, unselected.get(t))
            if out is not None:
                pos_and_ptrs.append((t_diff, out["obj_ptr"]))
        if not pos_and_ptrs:
            return None, None

        positions, ptr_list = zip(*pos_and_ptrs, strict=True)
        ptrs = torch.stack([p.to(device) for p in ptr_list], dim=0)  # N x B x C
        if self.add_tpos_enc_to_obj_ptrs:
            # Distances are normalised by the window; a 1-frame sequence has only distance 0.
            t_diff_max = max(max_ptrs - 1, 1)
            tpos_dim = c if self.proj_tpos_enc_in_obj_ptrs else self.mem_dim
            pos = torch.tensor(positions, device=device, dtype=torch.float32)
            pos = self.obj_ptr_tpos_proj(sine_encoding_1d(pos / t_diff_max, dim=tpos_dim))
            pos = pos.unsqueeze(1).expand(-1, b, self.mem_dim)
        else:
            pos = ptrs.new_zeros(len(positions), b, self.mem_dim)
        if self.mem_dim < c:
            split = c // self.mem_dim
            ptrs = ptrs.reshape(-1, b, split, self.mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
            pos = pos.repeat_interleave(split, dim=0)
        return ptrs, pos

    def _encode_new_memory(
        self,
        current_vision_feats: list[torch.Tensor],
        feat_sizes: list[tuple[int, int]],
        pred_masks_high_res: torch.Tensor,
        object_score_logits: torch.Tensor,
        is_mask_from_pts: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Memory of a frame from its stride-16 features and ``B x 1 x S x S`` mask logits.

        Returns
        -------
        maskmem_features : Tensor
            ``B x mem_dim x H x W``.
        maskmem_pos_enc : list of one Tensor
            Its position encoding, same shape.
        """
        feats = current_vision_feats[-1]
        b = feats.shape[1]
        h, w = feat_sizes[-1]
        pix_feat = feats.permute(1, 2, 0).reshape(b, self.hidden_dim, h, w)
        if self.non_overlap_masks_for_mem_enc and not self.training:
            pred_masks_high_res = self._apply_non_overlapping_constraints(pred_masks_high_res)
        if self.binarize_mask_from_pts_for_mem_enc and is_mask_from_pts and not self.training:
            mask_for_mem = (pred_masks_high_res > 0).float()
        else:
            mask_for_mem = torch.sigmoid(pred_masks_high_res)
        if self.sigmoid_scale_for_mem_enc != 1.0:
            mask_for_mem = mask_for_mem * self.sigmoid_scale_for_mem_enc
        if self.sigmoid_bias_for_mem_enc != 0.0:
            mask_for_mem = mask_for_mem + self.sigmoid_bias_for_mem_enc
        out = self.memory_encoder(pix_feat, mask_for_mem, skip_mask_sigmoid=True)
        maskmem_features = out["vision_features"]
        maskmem_pos_enc = out["vision_pos_enc"]
        if self.no_obj_embed_spatial is not None:
            # Marks memories of frames where the object is predicted absent.
            absent = 1 - (object_score_logits > 0).to(maskmem_features.dtype)
            maskmem_features = maskmem_features + (
                absent[..., None, None] * self.no_obj_embed_spatial[..., None, None]
            )
        return maskmem_features, maskmem_pos_enc

    # ----------------------------------------------------------------------------------------
    # Tracking

    def _track_step(
        self,
        frame_idx: int,
        is_init_cond_frame: bool,
        current_vision_feats: list[torch.Tensor],
        current_vision_pos_embeds: list[torch.Tensor],
        feat_sizes: list[tuple[int, int]],
        point_inputs: dict[str, torch.Tensor] | None,
        mask_inputs: torch.Tensor | None,
        output_dict: dict[str, dict[int, FrameOutput]],
        num_frames: int,
        track_in_reverse: bool,
        prev_sam_mask_logits: torch.Tensor | None,
    ) -> tuple[FrameOutput, tuple[torch.Tensor, ...], list[torch.Tensor] | None, torch.Tensor]:
        current_out: FrameOutput = {"point_inputs": point_inputs, "mask_inputs": mask_inputs}
        if len(current_vision_feats) > 1:
            high_res_features = [
                x.permute(1, 2, 0).reshape(x.shape[1], x.shape[2], *s)
                for x, s in zip(current_vision_feats[:-1], feat_sizes[:-1], strict=True)
            ]
        else:
            high_res_features = None
        if mask_inputs is not None and self.use_mask_input_as_output_without_sam:
            pix_feat = current_vision_feats[-1].permute(1, 2, 0)
            pix_feat = pix_feat.reshape(-1, self.hidden_dim, *feat_sizes[-1])
            sam_outputs = self._use_mask_as_output(pix_feat, high_res_features, mask_inputs)
        else:
            pix_feat = self._prepare_memory_conditioned_features(
                frame_idx=frame_idx,
                is_init_cond_frame=is_init_cond_frame,
                current_vision_feats=current_vision_feats[-1:],
                current_vision_pos_embeds=current_vision_pos_embeds[-1:],
                feat_sizes=feat_sizes[-1:],
                output_dict=output_dict,
                num_frames=num_frames,
                track_in_reverse=track_in_reverse,
            )
            if prev_sam_mask_logits is not None:
                # Earlier logits of this frame refine a new click (interactive correction).
                if point_inputs is None or mask_inputs is not None:
                    raise ValueError("prev_sam_mask_logits goes with point inputs and no mask")
                mask_inputs = prev_sam_mask_logits
            sam_outputs = self._forward_sam_heads(
                backbone_features=pix_feat,
                point_inputs=point_inputs,
                mask_inputs=mask_inputs,
                high_res_features=high_res_features,
                multimask_output=self._use_multimask(is_init_cond_frame, point_inputs),
            )
        return current_out, sam_outputs, high_res_features, pix_feat

    def _encode_memory_in_output(
        self,
        current_vision_feats: list[torch.Tensor],
        feat_sizes: list[tuple[int, int]],
        point_inputs: dict[str, torch.Tensor] | None,
        run_mem_encoder: bool,
        high_res_masks: torch.Tensor,
        object_score_logits: torch.Tensor,
        current_out: FrameOutput,
    ) -> None:
        if run_mem_encoder and self.num_maskmem > 0:
            features, pos_enc = self._encode_new_memory(
                current_vision_feats=current_vision_feats,
                feat_sizes=feat_sizes,
                pred_masks_high_res=high_res_masks,
                object_score_logits=object_score_logits,
                is_mask_from_pts=point_inputs is not None,
            )
            current_out["maskmem_features"] = features
            current_out["maskmem_pos_enc"] = pos_enc
        else:
            current_out["maskmem_features"] = None
            current_out["maskmem_pos_enc"] = None

    def track_step(
        self,
        frame_idx: int,
        is_init_cond_frame: bool,
        current_vision_feats: list[torch.Tensor],
        current_vision_pos_embeds: list[torch.Tensor],
        feat_sizes: list[tuple[int, int]],
        point_inputs: dict[str, torch.Tensor] | None,
        mask_inputs: torch.Tensor | None,
        output_dict: dict[str, dict[int, FrameOutput]],
        num_frames: int,
        track_in_reverse: bool = False,
        run_mem_encoder: bool = True,
        prev_sam_mask_logits: torch.Tensor | None = None,
    ) -> FrameOutput:
        """Segment one frame given the memory bank, and encode its memory.

        Parameters
        ----------
        frame_idx : int
            Index of the frame (slice) in the sequence.
        is_init_cond_frame : bool
            The frame is prompted and no frame has memories yet (no memory attention).
        current_vision_feats, current_vision_pos_embeds, feat_sizes :
            From :meth:`_prepare_backbone_features` for this frame (``B`` objects: the
            features repeated per object).
        point_inputs : dict or None
            ``{"point_coords": B x P x 2, "point_labels": B x P}`` in ``image_size`` pixels.
        mask_inputs : Tensor or None
            ``B x 1 x S x S`` mask prompt (taken as the output as is in SAM 2.1).
        output_dict : dict
            ``{"cond_frame_outputs": {idx: out}, "non_cond_frame_outputs": {idx: out}}``,
            the memory bank of earlier steps (prompted and tracked frames).
        num_frames : int
            Length of the sequence (bounds the object-pointer window).
        track_in_reverse : bool
            Tracking towards lower indices: "earlier" frames are the following ones.
        run_mem_encoder : bool
            Encode the frame's memory (skip while a user is still clicking).
        prev_sam_mask_logits : Tensor or None
            ``B x 1 x 4E x 4E`` earlier logits of this frame, fed with new points.

        Returns
        -------
        dict
            ``point_inputs``, ``mask_inputs``, ``pred_masks`` (``B x 1 x 4E x 4E`` logits),
            ``pred_masks_high_res`` (``B x 1 x S x S``), ``obj_ptr`` (``B x C``),
            ``object_score_logits`` (``B x 1``, eval only), ``maskmem_features``
            (``B x mem_dim x E x E`` or None) and ``maskmem_pos_enc`` (list or None). The
            caller stores it in ``output_dict`` under the frame index.
        """
        current_out, sam_outputs, _, _ = self._track_step(
            frame_idx,
            is_init_cond_frame,
            current_vision_feats,
            current_vision_pos_embeds,
            feat_sizes,
            point_inputs,
            mask_inputs,
            output_dict,
            num_frames,
            track_in_reverse,
            prev_sam_mask_logits,
        )
        _, _, _, low_res_masks, high_res_masks, obj_ptr, object_score_logits = sam_outputs
        current_out["pred_masks"] = low_res_masks
        current_out["pred_masks_high_res"] = high_res_masks
        current_out["obj_ptr"] = obj_ptr
        if not self.training:
            current_out["object_score_logits"] = object_score_logits
        self._encode_memory_in_output(
            current_vision_feats,
            feat_sizes,
            point_inputs,
            run_mem_encoder,
            high_res_masks,
            object_score_logits,
            current_out,
        )
        return current_out

    def _use_multimask(
        self, is_init_cond_frame: bool, point_inputs: dict[str, torch.Tensor] | None
    ) -> bool:
        """Whether the decoder returns three masks for this step."""
        num_pts = 0 if point_inputs is None else point_inputs["point_labels"].shape[1]
        return bool(
            self.multimask_output_in_sam
            and (is_init_cond_frame or self.multimask_output_for_tracking)
            and self.multimask_min_pt_num <= num_pts <= self.multimask_max_pt_num
        )

    def _apply_non_overlapping_constraints(self, pred_masks: torch.Tensor) -> torch.Tensor:
        """Keep each pixel's highest-scoring object; others are clamped to <= -10 there."""
        if pred_masks.shape[0] == 1:
            return pred_masks
        winner = pred_masks.argmax(dim=0, keepdim=True)
        ids = torch.arange(pred_masks.shape[0], device=pred_masks.device)[:, None, None, None]
        return torch.where(winner == ids, pred_masks, pred_masks.clamp(max=-10.0))


def _select_closest_cond_frames(
    frame_idx: int, cond_frame_outputs: dict[int, FrameOutput], max_cond_frame_num: int
) -> tuple[dict[int, FrameOutput], dict[int, FrameOutput]]:
    """Prompted frames to attend to, and the rest.

    All of them, or the closest before and after ``frame_idx`` and then the nearest others,
    up to ``max_cond_frame_num``.
    """
    if max_cond_frame_num == -1 or len(cond_frame_outputs) <= max_cond_frame_num:
        return cond_frame_outputs, {}
    if max_cond_frame_num < 2:
        raise ValueError("max_cond_frames_in_attn must be -1 or at least 2")
    selected: dict[int, FrameOutput] = {}
    before = max((t for t in cond_frame_outputs if t < frame_idx), default=None)
    if before is not None:
        selected[before] = cond_frame_outputs[before]
    after = min((t for t in cond_frame_outputs if t >= frame_idx), default=None)
    if after is not None:
        selected[after] = cond_frame_outputs[after]
    rest = sorted(
        (t for t in cond_frame_outputs if t not in selected), key=lambda t: abs(t - frame_idx)
    )
    for t in rest[: max_cond_frame_num - len(selected)]:
        selected[t] = cond_frame_outputs[t]
    unselected = {t: v for t, v in cond_frame_outputs.items() if t not in selected}
    return selected, unselected


def _trunc_normal(*shape: int, std: float = 0.02) -> torch.Tensor:
    return nn.init.trunc_normal_(torch.zeros(shape), std=std)

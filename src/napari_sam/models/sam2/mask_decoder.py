"""SAM 2's mask decoder: SAM's decoder plus high-resolution skips and an object score.

Differences from SAM's :class:`~napari_sam.models.mask_decoder.MaskDecoder`: the upscaling
path adds the neck's stride-8 and stride-4 features (projected once per image by
``conv_s1`` / ``conv_s0``), an extra output token predicts whether the object is present at
all (``pred_obj_score_logits``), the mask tokens also serve as object pointers for tracking,
and a single-mask request may fall back to the best multimask output when the single mask is
unstable.
"""

from __future__ import annotations

import torch
from torch import nn

from napari_sam.models.mask_decoder import MLP, MaskDecoder

__all__ = ["Sam2MaskDecoder"]


class Sam2MaskDecoder(MaskDecoder):
    """Masks, IoUs, output tokens and object-score logits from image and prompt embeddings.

    Parameters
    ----------
    transformer_dim, transformer, num_multimask_outputs, activation, iou_head_depth,
    iou_head_hidden_dim, iou_prediction_use_sigmoid :
        As for :class:`~napari_sam.models.mask_decoder.MaskDecoder`.
    use_high_res_features : bool
        Add stride-8 / stride-4 features in the upscaling (``conv_s1`` / ``conv_s0``).
    dynamic_multimask_via_stability : bool
        In eval, replace an unstable single mask by the multimask output with the best IoU.
    dynamic_multimask_stability_delta, dynamic_multimask_stability_thresh : float
        Stability = area(logits > delta) / area(logits > -delta); stable when >= thresh.
    pred_obj_scores : bool
        Predict an object-presence logit from an extra token (otherwise it is +10).
    pred_obj_scores_mlp : bool
        A 3-layer MLP rather than a linear layer for it.
    use_multimask_token_for_obj_ptr : bool
        With multimask output, return the three multimask tokens (else the single-mask one).
    """

    def __init__(
        self,
        *,
        transformer_dim: int = 256,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        iou_prediction_use_sigmoid: bool = False,
        use_high_res_features: bool = False,
        dynamic_multimask_via_stability: bool = False,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
        pred_obj_scores: bool = False,
        pred_obj_scores_mlp: bool = False,
        use_multimask_token_for_obj_ptr: bool = False,
    ) -> None:
        super().__init__(
            transformer_dim=transformer_dim,
            transformer=transformer,
            num_multimask_outputs=num_multimask_outputs,
            activation=activation,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
            iou_prediction_use_sigmoid=iou_prediction_use_sigmoid,
        )
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
            self.pred_obj_score_head: nn.Module = (
                MLP(transformer_dim, transformer_dim, 1, 3)
                if pred_obj_scores_mlp
                else nn.Linear(transformer_dim, 1)
            )
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode masks for ``B`` prompt sets.

        Parameters
        ----------
        image_embeddings : Tensor
            ``B x C x E x E``, or ``1 x C x E x E`` shared by all sets with ``repeat_image``.
        image_pe : Tensor
            ``1 x C x E x E``.
        sparse_prompt_embeddings, dense_prompt_embeddings : Tensor
            ``B x K x C`` and ``B x C x E x E``.
        multimask_output : bool
            Three masks rather than one.
        repeat_image : bool
            The image embedding is shared by all prompt sets.
        high_res_features : list of two Tensors or None
            Projected stride-4 (``B x C/8 x 4E x 4E``) and stride-8 (``B x C/4 x 2E x 2E``)
            features (``conv_s0`` / ``conv_s1`` already applied).

        Returns
        -------
        masks : Tensor
            ``B x M x 4E x 4E`` logits (M = 3 or 1).
        iou_pred : Tensor
            ``B x M``.
        sam_tokens_out : Tensor
            ``B x T x C`` output tokens for object pointers (the three multimask tokens, or
            the single-mask token).
        object_score_logits : Tensor
            ``B x 1``; positive means the object is present.
        """
        masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense_prompt_embeddings,
            repeat_image=repeat_image,
            high_res_features=high_res_features,
        )
        if multimask_output:
            masks, iou_pred = masks[:, 1:], iou_pred[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            masks, iou_pred = self._dynamic_multimask_via_stability(masks, iou_pred)
        else:
            masks, iou_pred = masks[:, 0:1], iou_pred[:, 0:1]
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            # Tracking was trained on the single-mask token as the object's memory token.
            sam_tokens_out = mask_tokens_out[:, 0:1]
        return masks, iou_pred, sam_tokens_out, object_score_logits

    def predict_masks(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        repeat_image: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All masks, all IoUs, all mask tokens and the object-score logits."""
        b = sparse_prompt_embeddings.shape[0]
        weights = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            weights.insert(0, self.obj_score_token.weight)
        first = 1 if self.pred_obj_scores else 0
        output_tokens = torch.cat(weights, dim=0).unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        n_images = image_embeddings.shape[0]
        if repeat_image and n_images == 1:
            image_embeddings = image_embeddings.expand(b, -1, -1, -1)
        elif n_images != b:
            raise ValueError(
                f"{n_images} image embeddings for {b} prompt sets: give one per set, or one "
                "shared embedding with repeat_image=True"
            )
        src = image_embeddings + dense_prompt_embeddings
        if image_pe.shape[0] != 1:
            raise ValueError("image_pe must have batch 1 (PromptEncoder.get_dense_pe())")
        pos_src = image_pe.expand(b, -1, -1, -1)
        _, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, first]
        mask_tokens_out = hs[:, first + 1 : first + 1 + self.num_mask_tokens]

        src = src.transpose(1, 2).reshape(b, c, h, w)
        if not self.use_high_res_features:
            upscaled = self.output_upscaling(src)
        else:
            if high_res_features is None:
                raise ValueError("this decoder needs high_res_features (stride-4 and stride-8)")
            dc1, ln1, act1, dc2, act2 = self.output_upscaling
            feat_s0, feat_s1 = high_res_features
            upscaled = act1(ln1(dc1(src) + feat_s1))
            upscaled = act2(dc2(upscaled) + feat_s0)

        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        _, cu, hu, wu = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, cu, hu * wu)).reshape(b, -1, hu, wu)
        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 0])
        else:
            # Without a score head the object is taken as present: sigmoid(10) ~ 1.
            object_score_logits = iou_pred.new_full((b, 1), 10.0)
        return masks, iou_pred, mask_tokens_out, object_score_logits

    def _get_stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """IoU of the masks thresholded at +delta and -delta: ``B x M``."""
        flat = mask_logits.flatten(-2)
        delta = self.dynamic_multimask_stability_delta
        inner = (flat > delta).sum(dim=-1).float()
        outer = (flat > -delta).sum(dim=-1).float()
        return torch.where(outer > 0, inner / outer, 1.0)

    def _dynamic_multimask_via_stability(
        self, all_mask_logits: torch.Tensor, all_iou_scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The single mask where it is stable, else the multimask output with the best IoU."""
        multi_logits, multi_ious = all_mask_logits[:, 1:], all_iou_scores[:, 1:]
        best = multi_ious.argmax(dim=-1)
        rows = torch.arange(multi_ious.shape[0], device=all_iou_scores.device)
        best_logits = multi_logits[rows, best].unsqueeze(1)
        best_ious = multi_ious[rows, best].unsqueeze(1)
        single_logits, single_ious = all_mask_logits[:, 0:1], all_iou_scores[:, 0:1]
        stable = self._get_stability_scores(single_logits) >= (
            self.dynamic_multimask_stability_thresh
        )
        logits = torch.where(stable[..., None, None], single_logits, best_logits)
        ious = torch.where(stable, single_ious, best_ious)
        return logits, ious

"""Train a SAM 2 model on clips: a prompt on the first frame, memory for the rest.

The SAM 2 counterpart of :class:`~napari_sam.training.trainer.Trainer`, sharing its settings,
schedule, optimiser, checkpoints and resumption; only one step differs. A step draws
``batch_size`` clips (:mod:`napari_sam.training.clips`), encodes all their frames at once, then
walks the frames in order through the model's own ``_track_step`` (as SAM 2's training does):
the first frame is prompted (its true mask, a noisy box or one click), every later one is
segmented from the memory of the frames before it, and each frame's result is encoded into
that memory. Gradients flow through the whole walk. Loss per frame: BCE + Dice of the masks
where the object is present (on the prompted frame the best of the decoder's three, on the
tracked ones all three, see ``ClipConfig.tracked_masks``), the IoU head's
MSE, and the object-score BCE (present or not), so the model also learns when the walk has
left the object.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from napari_sam.prompts import mask_to_box
from napari_sam.sam2_predictor import _normalisation, preprocess, stretch_masks
from napari_sam.training import prompt_sim
from napari_sam.training.clips import Clip
from napari_sam.training.trainer import StepResult, TrainConfig, Trainer, _mask_losses

if TYPE_CHECKING:
    from napari_sam.models.sam2.sam2 import Sam2

__all__ = ["ClipConfig", "ClipTrainer"]


@dataclass
class ClipConfig(TrainConfig):
    """:class:`TrainConfig` plus the clip prompts and the object-score loss.

    Attributes
    ----------
    p_mask : float
        Probability that a step's first frames are prompted with their true masks (else a
        box with probability ``p_box``, else one click).
    object_weight : float
        Weight of the object-score BCE.
    tracked_masks : {"all", "best"}
        Which of a tracked (unprompted) frame's three candidate masks the mask loss supervises.
        ``"all"``: each of them, since the memory leaves no ambiguity about which object is
        meant. ``"best"`` (the loss of the best candidate only, as on the prompted frame) lets
        the decoder hedge: with two objects in view it can offer one candidate on each, which
        keeps that loss low while the IoU head, which picks the mask that is kept, ignores the
        memory (measured on the first fixture run: following the darker of two ellipsoids, its
        third candidate found it at IoU 0.84-0.95 and was ranked last every time).
    """

    p_mask: float = 0.35
    object_weight: float = 1.0
    tracked_masks: str = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tracked_masks not in ("all", "best"):
            raise ValueError(f'tracked_masks must be "all" or "best", got {self.tracked_masks!r}')


class ClipTrainer(Trainer):
    """Trains a :class:`~napari_sam.models.sam2.sam2.Sam2` on clips from ``source``.

    Parameters
    ----------
    model : Sam2
        Trained in place.
    source : object with ``draw(rng) -> Clip``
        E.g. :class:`~napari_sam.training.clips.SyntheticClips`; every clip of a step must have
        the same length.
    config : ClipConfig
        ``trainable`` "decoder" trains the mask decoder and the memory (attention and
        encoder), "all" everything.
    """

    PARTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "iou_head": ("sam_mask_decoder.iou_prediction_head",),
        "decoder": ("sam_mask_decoder", "memory_attention", "memory_encoder"),
        "decoder+prompt": (
            "sam_mask_decoder",
            "memory_attention",
            "memory_encoder",
            "sam_prompt_encoder",
        ),
        "all": (
            "sam_mask_decoder",
            "memory_attention",
            "memory_encoder",
            "sam_prompt_encoder",
            "image_encoder",
            "maskmem_tpos_enc",
            "no_mem_embed",
            "no_mem_pos_enc",
            "no_obj_ptr",
            "no_obj_embed_spatial",
            "obj_ptr_proj",
            "obj_ptr_tpos_proj",
            "mask_downsample",
        ),
    }

    def __init__(self, model: Sam2, source: Any, config: ClipConfig) -> None:
        super().__init__(model, source, config)  # type: ignore[arg-type]
        self.clip_config = config
        self.clip_source = source

    # -- one step -----------------------------------------------------------------------------

    def _frames(self, clips: list[Clip]) -> tuple[torch.Tensor, torch.Tensor]:
        """All frames preprocessed (``B*T x 3 x S x S``, clip-major), truths ``B x T x S x S``."""
        model: Any = self.model
        size = int(model.image_size)
        mean, std = _normalisation(model)
        images = [preprocess(f, size, mean, std) for c in clips for f in c.frames]
        # Stretched to S x S as the frames are, and as the tracker stretches a mask prompt.
        truth = torch.stack(
            [stretch_masks(torch.from_numpy(c.masks)[:, None], size)[:, 0] > 0 for c in clips]
        )
        return torch.cat(images).to(self.device), truth.to(self.device)

    def _prompt(self, first: torch.Tensor) -> tuple[dict | None, torch.Tensor | None]:
        """Point inputs or a mask input for the first frames (``B x S x S`` truths)."""
        cfg: ClipConfig = self.clip_config
        rng = self.rng
        if rng.random() < cfg.p_mask:
            return None, first[:, None].float()
        truths = first.cpu().numpy()
        dev = self.device
        if rng.random() < cfg.p_box:
            side = first.shape[-1]
            boxes = [
                prompt_sim.jittered_box(rng, m, noise=0.1, max_shift=20 * side / 1024)
                if m.any()
                else mask_to_box(m)
                for m in truths
            ]
            coords = torch.tensor(np.array(boxes, np.float32).reshape(-1, 2, 2), device=dev)
            labels = torch.tensor([[2, 3]] * len(boxes), dtype=torch.int64, device=dev)
            return {"point_coords": coords, "point_labels": labels}, None
        pick = prompt_sim.interior_point if rng.random() < 0.5 else prompt_sim.random_point
        points = np.array([pick(rng, m) for m in truths], np.float32)[:, None]
        labels = torch.ones(len(points), 1, dtype=torch.int64, device=dev)
        return {"point_coords": torch.tensor(points, device=dev), "point_labels": labels}, None

    def train_step(self) -> StepResult:
        """Draw a batch of clips, walk them, take one optimiser step."""
        start = time.perf_counter()
        cfg: ClipConfig = self.clip_config
        self._set_modes()
        clips: list[Clip] = [self.clip_source.draw(self.rng) for _ in range(cfg.batch_size)]
        images, truth = self._frames(clips)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, parts, first_iou = self._walk(images, truth)
        lr = self._optimise(loss)
        return StepResult(
            step=self.step,
            loss=float(loss.detach()),
            mask_loss=parts["mask"],
            iou_loss=parts["iou"],
            lr=lr,
            seconds=time.perf_counter() - start,
            extra={"object_loss": parts["object"], "tracked_iou": first_iou},
        )

    def _walk(
        self, images: torch.Tensor, truth: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float], float]:
        cfg: ClipConfig = self.clip_config
        model: Any = self.model
        b, t, s = truth.shape[0], truth.shape[1], truth.shape[-1]
        backbone = model.forward_image(images)
        _, feats, pos, sizes = model._prepare_backbone_features(backbone)
        point_inputs, mask_inputs = self._prompt(truth[:, 0])
        output_dict: dict[str, dict[int, Any]] = {
            "cond_frame_outputs": {},
            "non_cond_frame_outputs": {},
        }
        valid = torch.ones(b, 1, s, s, dtype=torch.bool, device=self.device)
        mask_terms, iou_terms, object_terms, tracked_ious = [], [], [], []
        for frame in range(t):
            rows = torch.arange(b, device=self.device) * t + frame
            frame_feats = [x[:, rows] for x in feats]
            frame_pos = [x[:, rows] for x in pos]
            prompted = frame == 0
            current, outputs, _, _ = model._track_step(
                frame,
                prompted,
                frame_feats,
                frame_pos,
                sizes,
                point_inputs if prompted else None,
                mask_inputs if prompted else None,
                output_dict,
                t,
                False,
                None,
            )
            low_multi, _, ious, low, high, obj_ptr, object_logits = outputs
            current["pred_masks"], current["pred_masks_high_res"] = low, high
            current["obj_ptr"] = obj_ptr
            model._encode_memory_in_output(
                frame_feats,
                sizes,
                point_inputs if prompted else None,
                True,
                high,
                object_logits,
                current,
            )
            slot = "cond_frame_outputs" if prompted else "non_cond_frame_outputs"
            output_dict[slot][frame] = current
            if prompted and mask_inputs is not None:
                continue  # the mask is the output: nothing was predicted
            target = truth[:, frame, None].float()
            present = target.flatten(1).any(dim=1)
            object_terms.append(
                F.binary_cross_entropy_with_logits(object_logits[:, 0].float(), present.float())
            )
            if not present.any():
                continue
            per_mask, true_iou = _mask_losses(
                low_multi[present],
                F.avg_pool2d(target[present], 4),
                target[present],
                valid[present],
            )
            if prompted or cfg.tracked_masks == "best":
                mask_terms.append(per_mask.min(dim=1).values.mean())
            else:
                mask_terms.append(per_mask.mean())
            iou_terms.append(F.mse_loss(ious[present].float(), true_iou))
            if not prompted:
                best = ious[present].argmax(dim=1, keepdim=True)
                tracked_ious.extend(true_iou.gather(1, best)[:, 0].tolist())
        zero = images.new_zeros(())
        mask_loss = torch.stack(mask_terms).mean() if mask_terms else zero
        iou_loss = torch.stack(iou_terms).mean() if iou_terms else zero
        object_loss = torch.stack(object_terms).mean() if object_terms else zero
        loss = mask_loss + cfg.iou_weight * iou_loss + cfg.object_weight * object_loss
        parts = {
            "mask": float(mask_loss.detach()),
            "iou": float(iou_loss.detach()),
            "object": float(object_loss.detach()),
        }
        return loss, parts, float(np.mean(tracked_ious)) if tracked_ious else 0.0

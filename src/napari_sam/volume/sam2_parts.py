"""The session's model work for SAM 2 models: :class:`Sam2Parts`.

A :class:`~napari_sam.volume.session.VolumeSession` given a SAM 2 model (``spec.family ==
"sam2"``) uses these parts (:func:`napari_sam.volume.parts.parts_for` picks them), so every
interface built on the session works with SAM 2 unchanged:

- slices are decoded by :class:`~napari_sam.sam2_predictor.Sam2ImagePredictor` from the
  features of a :class:`~napari_sam.volume.sam2_features.FeatureCache`;
- ``propagate`` *tracks* the seeds (every seed slice of every object is a mask prompt, so it is
  remembered by every other slice) with :class:`~napari_sam.volume.tracking.VolumeTracker`,
  yielding the same :class:`~napari_sam.volume.propagation.Step` objects as SAM 1's
  propagation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_sam.volume.parts import SessionParts

__all__ = ["Sam2Parts", "mask_to_logits", "track_seeds"]

#: Options of SAM 1's propagation that SAM 2 tracking has no use for: it ends an object by its
#: own object score (``stop_after``) instead of IoU gates and mask areas.
SAM1_ONLY = (
    "min_iou_prev",
    "min_pred_iou",
    "min_area",
    "use_box",
    "use_points",
    "num_points",
    "multimask",
    "directions",
)

#: A SAM 1 slice embedding takes 4 MiB; the session's ``max_memory_slices`` is a count of those.
SAM1_SLICE_BYTES = 256 * 64 * 64 * 4


def mask_to_logits(mask: np.ndarray, side: int) -> np.ndarray:
    """Turn a drawn ``H x W`` mask into SAM 2 mask-prompt logits ``(1, side, side)``.

    The mask is stretched to the square (as the image is), area-averaged by an antialiased
    bilinear resize, and mapped to logits ``40 * (coverage - 0.5)``: +-20 inside and outside,
    0 on the boundary.
    """
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    m = F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return ((m[0] - 0.5) * 40.0).numpy()


def track_seeds(
    cache: Any,
    predictor: Any,
    seeds: Mapping[int, Mapping[int, np.ndarray]],
    **options: Any,
) -> Iterator[Any]:
    """Track objects from their seed masks with SAM 2; one ``Step`` per tracked slice.

    Parameters
    ----------
    cache : FeatureCache
        The volume's features (its axis is the tracking axis).
    predictor : Sam2ImagePredictor
        Gives the model.
    seeds : dict
        ``{label: {slice: (H, W) bool mask}}``; an empty mask marks the object absent there.
    **options
        :class:`~napari_sam.volume.tracking.VolumeTracker` options (``slice_range``,
        ``stop_after``, ``non_overlap``, ...). SAM 1's gates (:data:`SAM1_ONLY`) are accepted
        and not used.

    Yields
    ------
    Step
        ``masks`` holds the objects tracked on that slice; seed slices are not rewritten (the
        user's masks stay as they are).
    """
    from napari_sam.volume.propagation import Step
    from napari_sam.volume.tracking import VolumeTracker

    tracker_options = {k: v for k, v in options.items() if k not in SAM1_ONLY}
    tracker = VolumeTracker(predictor.model, cache, **tracker_options)
    for label, per_slice in seeds.items():
        for index, mask in sorted(per_slice.items()):
            tracker.add_prompt(int(index), int(label), mask=np.asarray(mask, dtype=bool))
    walk = tracker.track_iter()  # a generator: closed with us
    try:
        for step in walk:
            masks = {
                o: m
                for o, m in step.masks_by_id().items()
                if o in step.updated and step.slice not in seeds.get(o, {})
            }
            scores = {o: float(s) for o, s in zip(step.obj_ids, step.object_scores) if o in masks}
            yield Step(step.slice, masks=masks, scores=scores, done=step.done, total=step.total)
    finally:
        walk.close()


class Sam2Parts(SessionParts):
    """Session parts for SAM 2 models (see the module docstring)."""

    def make_predictor(self, model: Any) -> Any:
        """Return a :class:`~napari_sam.sam2_predictor.Sam2ImagePredictor` of ``model``."""
        from napari_sam.sam2_predictor import Sam2ImagePredictor

        return Sam2ImagePredictor(model)

    def make_cache(
        self,
        model: Any,
        volume: np.ndarray,
        axis: int,
        window: Any,
        cache_dir: Path | None,
        **options: Any,
    ) -> Any:
        """Return the :class:`~napari_sam.volume.sam2_features.FeatureCache` of ``volume``.

        ``max_memory_slices`` counts SAM 1 embeddings (4 MiB): it is turned into as many SAM 2
        slices as fit the same bytes (16 MiB each at 1024 px), at least 2.
        """
        from napari_sam.volume.sam2_features import FeatureCache

        cache = FeatureCache(
            model, volume, axis=axis, window=window, cache_dir=cache_dir, **options
        )
        budget = int(options.get("max_memory_slices", 8)) * SAM1_SLICE_BYTES
        cache.max_memory_slices = max(2, budget // cache.bytes_per_slice)
        return cache

    def embed(self, cache: Any, predictor: Any, index: int) -> None:
        """Put slice ``index``'s features into the predictor (encoding it if needed)."""
        predictor.set_features(cache.get(index), cache.slice_shape)

    def mask_prompt(self, predictor: Any, mask: np.ndarray) -> np.ndarray:
        """Turn a drawn mask into SAM 2 mask-prompt logits (:func:`mask_to_logits`)."""
        return mask_to_logits(mask, int(predictor.model.image_size) // 4)

    def propagate(
        self,
        cache: Any,
        predictor: Any,
        seeds: Mapping[int, Mapping[int, np.ndarray]],
        **options: Any,
    ) -> Iterator[Any]:
        """Track the seeds with SAM 2's memory (:func:`track_seeds`)."""
        return track_seeds(cache, predictor, seeds, **options)

    def segment_everything(self, cache: Any, model: Any, index: int) -> Iterator[str]:
        """Refuse: automatic masks come from SAM 1's grid decoder."""
        raise ValueError(
            "Segment everything needs a SAM 1 model (vit_b, vit_t, ...); SAM 2 models segment "
            "from prompts and track them"
        )

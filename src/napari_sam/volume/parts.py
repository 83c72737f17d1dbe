"""How a :class:`~napari_sam.volume.session.VolumeSession` does its model work: the pluggable parts.

A session keeps the state (volume, labels, objects, seeds); a :class:`SessionParts` object does
the model calls for it: make the predictor and the embedding cache of a model, decode prompts on
one slice, follow objects through the volume, find every object on a slice. Replacing one
method changes one capability for every interface (widget, console, command line):

- ``propagate``: the propagation strategy. SAM 1 models follow objects slice by slice with
  mask prompts (:func:`napari_sam.volume.propagation.propagate`); a video model (SAM 2) would
  track with its memory here, chosen from the model it is given.
- ``make_cache``: where embeddings come from (``encode_fn`` for remote encoders).
- ``predict``: how prompts become masks (text prompts would add a prompt kind here).

Tests pass parts with fake models to drive the widget's control flow exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SessionParts", "is_sam2", "parts_for"]


def is_sam2(model: Any) -> bool:
    """Whether ``model`` is a SAM 2 model (a video model: it tracks with memory)."""
    family = getattr(getattr(model, "spec", None), "family", None)
    return family == "sam2" or (family is None and hasattr(model, "track_step"))


def parts_for(model: Any) -> SessionParts:
    """The default parts for ``model``: :class:`~napari_sam.volume.sam2_parts.Sam2Parts` for
    SAM 2 models (tracking), :class:`SessionParts` for the others."""
    if is_sam2(model):
        from napari_sam.volume.sam2_parts import Sam2Parts

        return Sam2Parts()
    return SessionParts()


class SessionParts:
    """Default parts: Meta's SAM through :mod:`napari_sam` (imports are lazy: napari reads the
    plugin manifest without importing torch).

    Attributes
    ----------
    everything_options : dict
        Keyword arguments of the automatic mask generator used by :meth:`segment_everything`
        (``points_per_side``, ``pred_iou_thresh``, ...); empty means segment_anything's
        defaults.
    """

    def __init__(self) -> None:
        self.everything_options: dict[str, Any] = {}

    def make_predictor(self, model: Any) -> Any:
        """The prompt decoder of ``model`` (a :class:`~napari_sam.predictor.SamPredictor`)."""
        from napari_sam.predictor import SamPredictor

        return SamPredictor(model)

    def make_cache(
        self,
        model: Any,
        volume: np.ndarray,
        axis: int,
        window: Any,
        cache_dir: Path | None,
        **options: Any,
    ) -> Any:
        """The embedding cache of ``volume`` sliced along ``axis``.

        ``options``: ``model_key``, ``max_memory_slices``, ``encode_fn`` of
        :class:`~napari_sam.volume.embeddings.EmbeddingCache`.
        """
        from napari_sam.volume.embeddings import EmbeddingCache

        return EmbeddingCache(
            model, volume, axis=axis, window=window, cache_dir=cache_dir, **options
        )

    def is_encoded(self, cache: Any, index: int) -> bool:
        """Whether slice ``index`` needs no encoder run."""
        return bool(cache.has(index))

    def embed(self, cache: Any, predictor: Any, index: int) -> None:
        """Put slice ``index``'s embedding into the predictor (encoding it if needed)."""
        embedding, original_size, input_size = cache.get(index)
        predictor.set_image_embedding(embedding, original_size, input_size)

    def predict(
        self,
        predictor: Any,
        *,
        points: np.ndarray | None,
        point_labels: np.ndarray | None,
        box: np.ndarray | None,
        mask: np.ndarray | None,
        mask_input: np.ndarray | None,
        multimask: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks ``(C, H, W)`` bool, predicted IoUs ``(C,)`` and low-res logits ``(C, L, L)``.

        ``mask`` is a drawn ``(H, W)`` region used as the dense prompt when no ``mask_input``
        (``(1, L, L)`` logits, e.g. of the previous prediction) is given.
        """
        if mask_input is None and mask is not None:
            mask_input = self.mask_prompt(predictor, mask)
        has_points = points is not None and len(points) > 0
        masks, ious, low_res = predictor.predict(
            point_coords=points if has_points else None,
            point_labels=point_labels if has_points else None,
            box=box,
            mask_input=mask_input,
            multimask_output=multimask,
        )
        return np.asarray(masks), np.asarray(ious), np.asarray(low_res)

    def mask_prompt(self, predictor: Any, mask: np.ndarray) -> np.ndarray:
        """A drawn ``(H, W)`` mask as the predictor's dense prompt (``(1, L, L)`` logits)."""
        from napari_sam.prompts import mask_to_mask_input

        return mask_to_mask_input(mask, predictor.transform, predictor.original_size)

    def propagate(
        self,
        cache: Any,
        predictor: Any,
        seeds: Mapping[int, Mapping[int, np.ndarray]],
        **options: Any,
    ) -> Iterator[Any]:
        """Follow objects from their seed masks; yields one
        :class:`~napari_sam.volume.propagation.Step` per finished slice (``options``: those of
        :func:`~napari_sam.volume.propagation.propagate`, ``slice_range`` as ``(start, stop)``)."""
        from napari_sam.volume.propagation import propagate

        return propagate(cache, predictor, seeds, **options)

    def segment_everything(self, cache: Any, model: Any, index: int) -> Iterator[str]:
        """Generator: SAM's automatic masks on slice ``index`` (a grid of point prompts on the
        cached embedding); yields progress lines, returns an ``(H, W)`` int32 label image with
        0 = background and 1, 2, ... from the largest mask down."""
        from napari_sam.automatic import iter_segment_everything

        embedding, _, _ = cache.get(index)
        image = cache.slice_image(index)  # the 8-bit slice the embedding was computed from
        steps = iter_segment_everything(
            model, image, embedding=embedding, **self.everything_options
        )
        try:
            while True:
                progress = next(steps)
                yield f"Segmenting everything on slice {index}: {progress.done}/{progress.total}…"
        except StopIteration as done:
            return np.asarray(done.value, dtype=np.int32)

"""Track objects through a volume with SAM 2: slices are the frames of a video.

A click (points, a box or a mask) on a slice segments that slice like SAM does; tracking then
walks slice by slice away from it, each slice attending to a memory of

- every *prompted* slice of the object (its conditioning slices), and
- the ``num_maskmem - 1`` slices just tracked before it in the walking direction (6 for SAM 2.1),
  plus the object pointers (one 256-vector each) of up to ``max_obj_ptrs_in_encoder - 1`` (15)
  slices before it.

A volume has no time arrow: a prompt on a middle slice is tracked up (increasing index) and down.
A later prompt on a slice already tracked is a *correction*: it becomes a conditioning slice and
only the slices after it in the direction it was tracked are re-tracked, up to the next prompted
slice or the end of that run; the rest is kept. Objects are tracked independently (as in SAM 2),
several at once, sharing each slice's image features.

Memory bound: the tracking state lives on the CPU (the model's device keeps only the small
object pointers). Per object and slice it holds the ``S/4 x S/4`` float32 mask logits (256 KiB at
``S = 1024``, 64 KiB at ``S = 512``); the large memory features (``64 x S/16 x S/16`` bfloat16,
512 KiB at ``S = 1024``) are kept only for conditioning slices, for the frame window the next
slice will read, and for the window the first slice of each pending walk will read (so the walk
down from a prompt does not re-encode the slices just tracked up): at most
``num_maskmem - 1`` slices per walk under way or pending. A correction re-encodes the window it
needs (at most ``num_maskmem - 1`` memory-encoder runs). Image features come from a
:class:`~napari_sam.volume.sam2_features.FeatureCache` (memory LRU plus an optional disk store),
so only its ``max_memory_slices`` slices of features are in memory at any time.

This mirrors ``sam2.sam2_video_predictor.SAM2VideoPredictor`` (``init_state``,
``add_new_points_or_box``, ``add_new_mask``, ``propagate_in_video`` forward then in reverse) closely
enough to give the same masks; the model is only called through ``SAM2Base``'s methods
(``_prepare_backbone_features``, ``track_step``, ``_encode_new_memory``).

Example
-------
>>> model = napari_sam.load_model("sam2.1_hiera_tiny")                      # doctest: +SKIP
>>> features = FeatureCache(model, ct, axis=0, window=make_window(ct, "liver"))
>>> tracker = VolumeTracker(model, features, stop_after=3)
>>> tracker.add_prompt(120, obj_id=1, points=[[256, 300]], labels=[1])     # the liver
>>> for step in tracker.track_iter():                  # up from slice 120, then down
...     labels[step.slice] = step.label_image()       # step.done / step.total: progress
>>> tracker.add_prompt(140, obj_id=1, points=[[250, 310], [90, 80]], labels=[1, 0])
>>> tracker.track()            # re-tracks 141 and up only: 140 was reached walking up
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

from napari_sam.intensity import Window
from napari_sam.predictor import check_prompts
from napari_sam.sam2_predictor import Sam2Model, fill_small_regions, stretch_masks
from napari_sam.volume.embeddings import Cancel, _is_cancelled

__all__ = ["Prompt", "TrackStep", "VolumeTracker", "track_volume"]

UP, DOWN = 1, -1


class FeatureSource(Protocol):
    """Where per-slice image features come from (a ``FeatureCache`` is one)."""

    num_slices: int
    slice_shape: tuple[int, int]

    def get(self, index: int) -> dict[str, list[torch.Tensor]]: ...


@dataclass(frozen=True)
class Prompt:
    """A prompt for one object on one slice.

    Coordinates are ``(x, y)`` = (column, row) pixels of the slice; ``mask`` is a boolean
    ``H x W`` array.
    """

    slice: int
    obj_id: int = 1
    points: Any = None
    labels: Any = None
    box: Any = None
    mask: Any = None


@dataclass(frozen=True)
class TrackStep:
    """The result of one tracked slice.

    Attributes
    ----------
    slice : int
    direction : int
        +1 when walking up (increasing index), -1 down; 0 for a prompt's own answer.
    obj_ids : tuple of int
        Objects with a result on this slice (tracked now or before), in the order of ``logits``.
    logits : ndarray, shape (n_objects, H, W), float32
        Mask logits at the slice's size (> 0 is in the mask).
    object_scores : ndarray, shape (n_objects,)
        SAM 2's object score logits (< 0: the model sees no object).
    updated : tuple of int
        Objects computed in this step.
    done, total : int
        Progress: slices yielded so far in this run and the expected number (re-estimated after
        each slice; it shrinks when an object ends early).
    """

    slice: int
    direction: int
    obj_ids: tuple[int, ...]
    logits: np.ndarray
    object_scores: np.ndarray
    updated: tuple[int, ...]
    done: int = 0
    total: int = 0

    @property
    def masks(self) -> np.ndarray:
        """Boolean masks, shape (n_objects, H, W)."""
        return self.logits > 0

    def masks_by_id(self) -> dict[int, np.ndarray]:
        """``{obj_id: boolean H x W mask}`` (the form ``VolumeSession`` writes)."""
        return {o: m for o, m in zip(self.obj_ids, self.masks)}

    def label_image(self, dtype: npt.DTypeLike = np.uint16) -> np.ndarray:
        """Merge the objects into one label image ``H x W``.

        Each pixel takes the id of the object with the highest positive logit there, 0 where
        there is none.
        """
        labels = np.zeros(self.logits.shape[1:], dtype=dtype)
        if not self.obj_ids:
            return labels
        best = np.argmax(self.logits, axis=0)
        hit = np.take_along_axis(self.logits, best[None], axis=0)[0] > 0
        labels[hit] = np.asarray(self.obj_ids, dtype=dtype)[best[hit]]
        return labels


@dataclass
class _Object:
    """Tracking state of one object (SAM 2's per-object output dicts)."""

    prompts: dict[int, dict] = field(default_factory=dict)
    cond: dict[int, dict] = field(default_factory=dict)
    noncond: dict[int, dict] = field(default_factory=dict)
    # Answers to prompts whose memory is not encoded yet: slice -> (is_conditioning, output).
    pending: dict[int, tuple[bool, dict]] = field(default_factory=dict)
    # Slices with a valid result -> direction they were reached in.
    direction: dict[int, int] = field(default_factory=dict)
    # Where tracking must start: direction -> set of slices.
    starts: dict[int, set[int]] = field(default_factory=lambda: {UP: set(), DOWN: set()})
    # Consecutive slices without the object in the current walk (for ``stop_after``).
    absent_run: int = 0
    # Slices whose current result has been yielded by a walk.
    delivered: set[int] = field(default_factory=set)

    def output(self, index: int) -> dict | None:
        if index in self.pending:
            return self.pending[index][1]
        return self.cond.get(index, self.noncond.get(index))


class VolumeTracker:
    """Prompts on slices of a volume, tracked through it with a SAM 2 model.

    Not thread-safe: add prompts and run walks from one thread (a worker may run
    :meth:`track_iter` while the caller only reads the steps it yields).

    Parameters
    ----------
    model : Sam2
        A SAM 2 model (``SAM2Base`` interface), in eval mode.
    features : FeatureSource
        Per-slice image features, e.g. ``FeatureCache(model, volume, axis=...)``; its
        ``num_slices`` and ``slice_shape`` define the volume.
    stop_after : int, optional
        End an object's walk after this many consecutive slices where it is absent (object
        score logit below ``score_threshold`` or an empty mask); those slices keep their
        (empty) results, the slices beyond are not tracked. None (default) walks to the end.
    score_threshold : float
        Object score logit under which an object counts as absent (SAM 2 itself hides the mask
        below 0).
    non_overlap : bool
        Where objects overlap, keep only the one with the highest logit in the returned logits
        (SAM 2's ``non_overlap_masks``; memory is not affected). Default False, as in SAM 2.
    fill_hole_area : int
        Fill background holes up to this area (pixels of the ``S/4`` masks) in returned masks,
        as SAM 2's video predictor does with 8 when its CUDA extension is built; 0 = off.
    corrections_as_conditioning : bool
        Whether a correction joins the memory of every later slice (True, default) or only the
        recent-frame window (SAM 2's ``add_all_frames_to_correct_as_cond=False``).
    keep_all_memories : bool
        Keep the memory features of every tracked slice (faster corrections, 512 KiB per slice
        and object at ``S = 1024``) instead of only the window.
    binarize_prompt_masks : bool
        Remember a prompted slice by its thresholded mask, exactly what the user sees (True,
        SAM 2's video predictor), rather than by its soft probabilities. Whatever the model's
        own ``binarize_mask_from_pts_for_mem_enc`` says.
    slice_range : (int, int), optional
        Walk only within slices ``start <= i < stop`` (default: the whole axis).
    """

    def __init__(
        self,
        model: Sam2Model,
        features: FeatureSource,
        *,
        stop_after: int | None = None,
        score_threshold: float = 0.0,
        non_overlap: bool = False,
        fill_hole_area: int = 0,
        corrections_as_conditioning: bool = True,
        keep_all_memories: bool = False,
        binarize_prompt_masks: bool = True,
        slice_range: tuple[int, int] | None = None,
    ) -> None:
        if stop_after is not None and stop_after < 1:
            raise ValueError(f"stop_after must be None or >= 1, got {stop_after}")
        self.model = model
        self.features = features
        self.num_slices = int(features.num_slices)
        self.slice_shape = tuple(int(s) for s in features.slice_shape)
        self.image_size = int(model.image_size)
        self.stop_after = stop_after
        self.score_threshold = float(score_threshold)
        self.non_overlap = bool(non_overlap)
        self.fill_hole_area = int(fill_hole_area)
        self.corrections_as_conditioning = bool(corrections_as_conditioning)
        self.keep_all_memories = bool(keep_all_memories)
        self.binarize_prompt_masks = bool(binarize_prompt_masks)
        lo, hi = (0, self.num_slices) if slice_range is None else slice_range
        if not 0 <= lo < hi <= self.num_slices:
            raise ValueError(
                f"slice_range must be (start, stop) with 0 <= start < stop <= "
                f"{self.num_slices}, got {slice_range}"
            )
        self.slice_range = (int(lo), int(hi))
        self._objects: dict[int, _Object] = {}
        self._maskmem_pos_enc: list[torch.Tensor] | None = None

    # -- public API ---------------------------------------------------------------------------

    @property
    def object_ids(self) -> tuple[int, ...]:
        """Ids of the objects with prompts, in the order they were first prompted."""
        return tuple(self._objects)

    def tracked_slices(self, obj_id: int) -> list[int]:
        """Sorted slices with a current result for ``obj_id`` (prompted or tracked)."""
        obj = self._object(obj_id)
        return sorted(set(obj.direction) | set(obj.pending) | set(obj.cond))

    @torch.no_grad()
    def add_prompt(
        self,
        slice: int,
        obj_id: int = 1,
        *,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        clear: bool = True,
    ) -> np.ndarray:
        """Prompt ``obj_id`` on a slice and segment that slice.

        Parameters
        ----------
        slice : int
        obj_id : int
            Any integer naming the object (a label value); new ids start a new object.
        points : ndarray, shape (N, 2), optional
            ``(x, y)`` pixels of the slice (x = column).
        labels : ndarray, shape (N,), optional
            1 foreground, 0 background.
        box : ndarray, shape (4,), optional
            ``(x0, y0, x1, y1)`` pixels.
        mask : ndarray, shape (H, W), optional
            A boolean mask of the object on this slice (instead of points and box).
        clear : bool
            Replace this slice's earlier points of the object (True) or add to them.

        Returns
        -------
        ndarray, shape (H, W), float32
            The object's mask logits on this slice.

        A prompt on a slice already tracked for this object is a correction: the slices after
        it in the direction it was tracked are invalidated and re-tracked by the next
        :meth:`track_iter`.
        """
        index = self._check_slice(slice)
        obj = self._objects.get(int(obj_id), _Object())
        prompt = self._prompt_inputs(obj, index, points, labels, box, mask, clear)
        tracked = obj.direction.get(index)
        is_init = tracked is None
        is_cond = is_init or self.corrections_as_conditioning
        prev_logits = None
        previous = obj.output(index)
        if "point_inputs" in prompt and previous is not None:
            prev_logits = self._filled(previous["pred_masks"]).to(self.model.device)
            prev_logits = prev_logits.clamp(-32.0, 32.0)
        feats, pos, sizes = self._slice_features(index)
        if not is_init:
            self._ensure_memory(obj, index, tracked == DOWN)
        out = self.model.track_step(
            frame_idx=index,
            is_init_cond_frame=is_init,
            current_vision_feats=feats,
            current_vision_pos_embeds=pos,
            feat_sizes=sizes,
            point_inputs=prompt.get("point_inputs"),
            mask_inputs=prompt.get("mask_inputs"),
            output_dict=self._memory_view(obj),
            num_frames=self.num_slices,
            track_in_reverse=tracked == DOWN,
            run_mem_encoder=False,
            prev_sam_mask_logits=prev_logits,
        )
        self._objects[int(obj_id)] = obj
        obj.prompts[index] = prompt
        obj.pending[index] = (is_cond, self._compact(out, memory=False))
        obj.delivered.discard(index)
        if is_init:
            obj.starts[UP].add(index)
            obj.starts[DOWN].add(index)
        else:
            assert tracked is not None
            self._invalidate_after(obj, index, tracked)
            obj.starts[tracked].add(index)
        return self._full_res(obj.pending[index][1]["pred_masks"])[0, 0].cpu().numpy()

    def track_iter(self, cancel: Cancel = None) -> Generator[TrackStep, None, None]:
        """Track every pending prompt through the volume, one slice per step.

        Walks up from the prompts, then down. Stop early by closing the generator or through
        ``cancel`` (a ``threading.Event`` or a callable returning True), checked before each
        slice; the unfinished walks resume at the next call.
        """
        if not self._objects:
            raise ValueError("Nothing to track: prompt an object on a slice first (add_prompt)")
        self._encode_pending()
        done = 0
        for direction in (UP, DOWN):
            ended: set[int] = set()
            sweep = self._sweep(direction, self._live_starts(direction), self._tracked(), ended)
            for index, work in sweep:
                if _is_cancelled(cancel):
                    # The walks under way resume here at the next call.
                    for obj_id, _ in work:
                        self._objects[obj_id].starts[direction].add(index)
                    self._evict_all()
                    return
                updated = []
                for obj_id, start in work:
                    obj = self._objects[obj_id]
                    if index == start:
                        obj.absent_run = 0
                    if index in obj.delivered:
                        continue  # a prompted slice whose answer is out already
                    obj.starts[direction].discard(start)
                    if self._track_slice(obj, index, start, direction):
                        ended.add(obj_id)
                    obj.delivered.add(index)
                    updated.append(obj_id)
                    self._keep_window(obj, index + direction, direction == DOWN)
                if not updated:
                    continue
                done += 1
                total = done + self._remaining(direction, index, ended)
                try:
                    yield self._step(index, direction, tuple(updated), done, total)
                except GeneratorExit:
                    # Closed by the caller: the walks under way resume after this slice.
                    nxt = index + direction
                    for obj_id in updated:
                        obj = self._objects[obj_id]
                        if obj_id not in ended and 0 <= nxt < self.num_slices:
                            if nxt not in obj.direction:  # else that walk ends there anyway
                                obj.starts[direction].add(nxt)
                    self._evict_all()
                    raise
            for obj in self._objects.values():
                obj.starts[direction].clear()
            self._evict_all()

    def track(self, cancel: Cancel = None) -> int:
        """Run :meth:`track_iter` to the end; returns the number of slices tracked."""
        count = 0
        for _ in self.track_iter(cancel):
            count += 1
        return count

    def result(self, slice: int) -> TrackStep:
        """Return the current logits of every object with a result on ``slice``.

        ``direction``, ``done`` and ``total`` of the returned step are 0.
        """
        return self._step(self._check_slice(slice), 0, (), 0, 0)

    def remove_object(self, obj_id: int) -> None:
        """Forget an object: its prompts and results."""
        self._object(obj_id)
        del self._objects[int(obj_id)]

    def reset(self) -> None:
        """Forget every object."""
        self._objects.clear()

    # -- prompts ------------------------------------------------------------------------------

    def _check_slice(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"slice index must be an integer, got {index!r}")
        if not 0 <= index < self.num_slices:
            raise IndexError(f"slice {index} is outside the volume (0..{self.num_slices - 1})")
        return int(index)

    def _object(self, obj_id: int) -> _Object:
        try:
            return self._objects[int(obj_id)]
        except KeyError:
            raise KeyError(
                f"no object {obj_id}; objects with prompts: {list(self._objects)}"
            ) from None

    def _prompt_inputs(
        self,
        obj: _Object,
        index: int,
        points: ArrayLike | None,
        labels: ArrayLike | None,
        box: ArrayLike | None,
        mask: ArrayLike | None,
        clear: bool,
    ) -> dict:
        h, w = self.slice_shape
        s = self.image_size
        if mask is not None:
            if points is not None or box is not None:
                raise ValueError("give either a mask or points/box on a slice, not both")
            mask = np.asarray(mask)
            if mask.shape != (h, w):
                raise ValueError(f"mask must have the slice's shape {(h, w)}, got {mask.shape}")
            m = torch.as_tensor(mask.astype(bool), device=self.model.device)[None, None]
            return {"mask_inputs": stretch_masks(m, s)}
        coords, tags, corners, _ = check_prompts(points, labels, box, None, (h, w), s // 4)
        xy, kinds = [], []
        if corners is not None:
            if not clear:
                raise ValueError("a box replaces the slice's points: use clear=True with a box")
            xy.append(torch.tensor(corners.reshape(2, 2), dtype=torch.float32))
            kinds.append(torch.tensor([2, 3], dtype=torch.int32))
        if coords is not None:
            xy.append(torch.tensor(coords, dtype=torch.float32))
            kinds.append(torch.tensor(tags, dtype=torch.int32))
        # Normalise then scale, in float32, as SAM 2's video predictor does.
        scaled = torch.cat(xy)[None] / torch.tensor([w, h], dtype=torch.float32) * s
        new = {
            "point_coords": scaled.to(self.model.device),
            "point_labels": torch.cat(kinds)[None].to(self.model.device),
        }
        old = obj.prompts.get(index, {}).get("point_inputs")
        if not clear and old is not None:
            new = {k: torch.cat([old[k], new[k]], dim=1) for k in new}
        return {"point_inputs": new}

    def _invalidate_after(self, obj: _Object, index: int, direction: int) -> None:
        # The run tracked from this slice on, up to the next prompted slice.
        k = index + direction
        while obj.direction.get(k) == direction and k not in obj.prompts:
            del obj.direction[k]
            obj.noncond.pop(k, None)
            obj.delivered.discard(k)
            k += direction

    # -- model calls --------------------------------------------------------------------------

    def _slice_features(
        self, index: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        backbone = self.features.get(index)
        _, feats, pos, sizes = self.model._prepare_backbone_features(
            {
                "backbone_fpn": list(backbone["backbone_fpn"]),
                "vision_pos_enc": list(backbone["vision_pos_enc"]),
            }
        )
        return feats, pos, sizes

    def _memory_view(self, obj: _Object) -> dict:
        return {"cond_frame_outputs": obj.cond, "non_cond_frame_outputs": obj.noncond}

    def _compact(self, out: dict, memory: bool = True) -> dict:
        maskmem = out.get("maskmem_features") if memory else None
        if maskmem is not None:
            # SAM 2 keeps memories in bfloat16; so do we (half the bytes, same masks).
            maskmem = maskmem.to(torch.bfloat16).cpu()
            self._remember_pos_enc(out["maskmem_pos_enc"])
        return {
            "maskmem_features": maskmem,
            "maskmem_pos_enc": self._maskmem_pos_enc if maskmem is not None else None,
            "pred_masks": out["pred_masks"].float().cpu(),
            "obj_ptr": out["obj_ptr"],
            "object_score_logits": out["object_score_logits"],
        }

    def _remember_pos_enc(self, pos_enc: list[torch.Tensor]) -> None:
        # The memory's positional encoding is the same for every slice and object.
        if self._maskmem_pos_enc is None:
            self._maskmem_pos_enc = [p[0:1].clone() for p in pos_enc]

    def _encode_memory(self, index: int, out: dict, from_prompt: bool) -> None:
        feats, _, sizes = self._slice_features(index)
        logits = self._filled(out["pred_masks"]) if from_prompt else out["pred_masks"]
        high_res = F.interpolate(
            logits.to(self.model.device),
            size=(self.image_size, self.image_size),
            mode="bilinear",
            align_corners=False,
        )
        if from_prompt and self.binarize_prompt_masks:
            # Saturated logits: the model's sigmoid turns them into exactly 0 and 1, the same
            # as its own binarisation would, so the model's setting does not matter.
            high_res = torch.where(high_res > 0, 1e4, -1e4)
        maskmem, pos_enc = self.model._encode_new_memory(
            current_vision_feats=feats,
            feat_sizes=sizes,
            pred_masks_high_res=high_res,
            object_score_logits=out["object_score_logits"],
            is_mask_from_pts=from_prompt,
        )
        self._remember_pos_enc(pos_enc)
        out["maskmem_features"] = maskmem.to(torch.bfloat16).cpu()
        out["maskmem_pos_enc"] = self._maskmem_pos_enc

    @torch.no_grad()
    def _encode_pending(self) -> None:
        """Encode the memory of every answered prompt and make it part of the state."""
        for obj in self._objects.values():
            for index, (is_cond, out) in sorted(obj.pending.items()):
                self._encode_memory(index, out, from_prompt=True)
                if is_cond:
                    obj.cond[index] = out
                    obj.noncond.pop(index, None)
                else:
                    obj.noncond[index] = out
            obj.pending.clear()

    def _window(self, index: int, reverse: bool) -> list[int]:
        """Slices whose memory SAM 2 reads when tracking ``index`` (the recent-frame window)."""
        stride = max(1, int(getattr(self.model, "memory_temporal_stride_for_eval", 1)))
        sign = -1 if reverse else 1
        out = []
        for t_rel in range(1, int(self.model.num_maskmem)):
            if t_rel == 1:
                out.append(index - sign)
            elif not reverse:
                out.append(((index - 2) // stride) * stride - (t_rel - 2) * stride)
            else:
                out.append(-(-(index + 2) // stride) * stride + (t_rel - 2) * stride)
        return out

    def _ensure_memory(self, obj: _Object, index: int, reverse: bool) -> None:
        for k in self._window(index, reverse):
            out = obj.noncond.get(k)
            if out is not None and out["maskmem_features"] is None:
                self._encode_memory(k, out, from_prompt=False)

    def _pinned(self, obj: _Object) -> set[int]:
        """Slices whose memory the first step of a pending walk reads."""
        keep = set()
        for d, starts in obj.starts.items():
            for start in starts:
                keep.update(self._window(start + d, d == DOWN))
        return keep

    def _keep_window(self, obj: _Object, next_index: int, reverse: bool) -> None:
        if self.keep_all_memories:
            return
        keep = set(self._window(next_index, reverse)) | self._pinned(obj)
        for k, out in obj.noncond.items():
            if k not in keep and k not in obj.prompts and out["maskmem_features"] is not None:
                out["maskmem_features"] = None

    def _evict_all(self) -> None:
        """Between walks: drop every memory but those the pending walks read first."""
        if self.keep_all_memories:
            return
        for obj in self._objects.values():
            keep = self._pinned(obj)
            for k, out in obj.noncond.items():
                if k not in keep and k not in obj.prompts:
                    out["maskmem_features"] = None

    @torch.no_grad()
    def _track_slice(self, obj: _Object, index: int, start: int, direction: int) -> bool:
        """Track one object on one slice; return True when the object's walk ends here."""
        out = obj.cond.get(index)
        if out is None and index == start and index in obj.prompts:
            out = obj.noncond.get(index)  # a correction that is not a conditioning slice
        if out is None:
            feats, pos, sizes = self._slice_features(index)
            reverse = direction == DOWN
            self._ensure_memory(obj, index, reverse)
            result = self.model.track_step(
                frame_idx=index,
                is_init_cond_frame=False,
                current_vision_feats=feats,
                current_vision_pos_embeds=pos,
                feat_sizes=sizes,
                point_inputs=None,
                mask_inputs=None,
                output_dict=self._memory_view(obj),
                num_frames=self.num_slices,
                track_in_reverse=reverse,
                run_mem_encoder=True,
            )
            out = self._compact(result)
            obj.noncond[index] = out
        obj.direction[index] = direction
        if self.stop_after is None:
            return False
        absent = float(out["object_score_logits"].max()) < self.score_threshold or not bool(
            (self._filled(out["pred_masks"]) > 0).any()
        )
        obj.absent_run = obj.absent_run + 1 if absent else 0
        return obj.absent_run >= self.stop_after

    # -- walks --------------------------------------------------------------------------------

    def _live_starts(self, direction: int) -> dict[int, list[int]]:
        order = sorted if direction == UP else (lambda s: sorted(s, reverse=True))
        return {o: order(obj.starts[direction]) for o, obj in self._objects.items()}

    def _tracked(self) -> dict[int, Any]:
        return {o: obj.direction for o, obj in self._objects.items()}

    def _sweep(
        self,
        direction: int,
        starts: dict[int, list[int]],
        tracked: dict[int, Any],
        ended: set[int],
    ) -> Iterator[tuple[int, list[tuple[int, int]]]]:
        """Yield the slices of one walk direction with the ``(object, walk start)`` pairs due.

        A walk runs from its start until a slice that already has a result (other than its
        start), the volume's end, or an early stop (the caller puts the object in ``ended``).
        ``tracked`` must reflect results as they are made.
        """
        queued = {o: list(s) for o, s in starts.items() if s}
        if not queued:
            return
        first = [q[0] for q in queued.values()]
        k = min(first) if direction == UP else max(first)
        active: dict[int, int] = {}
        lo, hi = self.slice_range
        while lo <= k < hi:
            for o, q in queued.items():
                if q and q[0] == k:
                    q.pop(0)
                    if o not in active:  # otherwise that walk already passes here
                        active[o] = k
            work = []
            for o, start in list(active.items()):
                if o in ended or (k != start and k in tracked[o]):
                    del active[o]
                    ended.discard(o)
                    continue
                work.append((o, start))
            if work:
                yield k, work
            if not active and not any(queued.values()):
                return
            k += direction

    def _remaining(self, direction: int, index: int, ended: set[int]) -> int:
        """Slices still to come in this run if no object ends early (for progress)."""
        tracked = {o: set(obj.direction) for o, obj in self._objects.items()}
        seen = {(o, k) for o, obj in self._objects.items() for k in obj.delivered}
        count = 0
        for d in (UP, DOWN):
            if d == UP and direction == DOWN:
                continue
            starts = self._live_starts(d)
            if d == direction:
                # Walks under way continue from the next slice.
                for o in self._objects:
                    if o not in ended and (o, index) in seen and index in tracked[o]:
                        nxt = index + d
                        if 0 <= nxt < self.num_slices and nxt not in tracked[o]:
                            starts[o] = sorted(set(starts[o]) | {nxt}, reverse=d == DOWN)
            for k, work in self._sweep(d, starts, tracked, set()):
                new = [(o, k) for o, _ in work if (o, k) not in seen]
                if new:
                    count += 1
                    seen.update(new)
                for o, _ in work:
                    tracked[o].add(k)
        return count

    # -- outputs ------------------------------------------------------------------------------

    def _filled(self, logits: torch.Tensor) -> torch.Tensor:
        return fill_small_regions(logits, max_hole_area=self.fill_hole_area, hole_value=0.1)

    def _full_res(self, logits: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            self._filled(logits), size=self.slice_shape, mode="bilinear", align_corners=False
        )

    def _step(
        self, index: int, direction: int, updated: tuple[int, ...], done: int, total: int
    ) -> TrackStep:
        ids, logits, scores = [], [], []
        for o, obj in self._objects.items():
            out = obj.output(index)
            if out is None or (index not in obj.direction and index not in obj.prompts):
                continue
            ids.append(o)
            logits.append(self._full_res(out["pred_masks"]))
            scores.append(float(out["object_score_logits"].max()))
        if logits:
            stacked = torch.cat(logits)
            if self.non_overlap and len(ids) > 1:
                winner = stacked.argmax(dim=0, keepdim=True)
                mine = torch.arange(len(ids))[:, None, None, None] == winner
                stacked = torch.where(mine, stacked, stacked.clamp(max=-10.0))
            array = stacked[:, 0].numpy()
        else:
            array = np.zeros((0, *self.slice_shape), dtype=np.float32)
        return TrackStep(
            slice=index,
            direction=direction,
            obj_ids=tuple(ids),
            logits=array,
            object_scores=np.asarray(scores, dtype=np.float32),
            updated=tuple(updated),
            done=done,
            total=total,
        )


def track_volume(
    model: Sam2Model,
    volume: np.ndarray,
    prompts: Iterable[Prompt],
    *,
    axis: int = 0,
    window: Window | None = None,
    features: FeatureSource | None = None,
    cache_dir: str | os.PathLike | None = None,
    cancel: Cancel = None,
    **options: Any,
) -> Iterator[TrackStep]:
    """Track prompts through a volume: a one-call front end to :class:`VolumeTracker`.

    Parameters
    ----------
    model : Sam2
    volume : ndarray, shape (Z, Y, X)
        Sliced along ``axis``; prompts use the pixel coordinates of those slices.
    prompts : iterable of Prompt
    window : Window, optional
        Intensity window (``napari_sam.intensity``); None = one automatic window for the volume.
    features : FeatureSource, optional
        An existing feature cache of this volume and axis (reused across calls); else one is
        made, stored under ``cache_dir`` when given.
    **options
        :class:`VolumeTracker` options (``stop_after``, ``non_overlap``, ...).

    Yields
    ------
    TrackStep
        First each prompt's own answer (``direction`` 0), then one step per tracked slice.
    """
    if features is None:
        from napari_sam.volume.sam2_features import FeatureCache

        source: FeatureSource = FeatureCache(
            model, volume, axis=axis, window=window, cache_dir=cache_dir
        )
    else:
        source = features
    tracker = VolumeTracker(model, source, **options)
    for p in prompts:
        tracker.add_prompt(
            p.slice, p.obj_id, points=p.points, labels=p.labels, box=p.box, mask=p.mask
        )
        yield tracker.result(p.slice)
    yield from tracker.track_iter(cancel)

"""VolumeSession: one volume, one model, its embedding cache and its objects (the scripting API).

A session ties together what segmenting a volume needs: the volume (a NIfTI path or an array), a
model, an intensity window, the per-slice embedding cache and a labels volume in the same
(display) orientation. Objects are label ids; each has *seed* slices (segmented with prompts or
painted) from which :meth:`VolumeSession.propagate` follows it through the volume.

Seeds are read from the labels volume when propagation starts, so a seed slice corrected by hand
(in napari, or by writing into ``session.labels``) is propagated as corrected.

Example
-------
>>> from napari_sam import VolumeSession
>>> with VolumeSession("ct.nii.gz", model="vit_b", cache_dir="~/sam-cache") as s:  # doctest: +SKIP
...     s.segment_slice(40, box=[120, 80, 220, 190], label_id=1)
...     s.propagate()
...     s.save("ct_labels.nii.gz")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from napari_sam.prompts import mask_to_mask_input
from napari_sam.volume.embeddings import Cancel, EmbeddingCache, EncodeFn, weights_fingerprint
from napari_sam.volume.propagation import Step, propagate, write_masks

__all__ = ["PropagationSummary", "SliceResult", "VolumeSession", "resolve_window"]

Mode = Literal["keep", "overwrite"]


@dataclass
class SliceResult:
    """The last prediction of :meth:`VolumeSession.segment_slice`.

    ``logits`` (``1 x L x L``) can be passed back as ``mask_input`` to refine the same slice.
    """

    index: int
    label_id: int | None
    mask: np.ndarray
    score: float
    logits: np.ndarray
    masks: np.ndarray
    scores: np.ndarray


@dataclass
class PropagationSummary:
    """What one :meth:`VolumeSession.propagate` run did."""

    slices: int = 0
    changed_voxels: int = 0
    extent: dict[int, tuple[int, int]] = field(default_factory=dict)
    stopped: dict[int, list[tuple[int, str]]] = field(default_factory=dict)


class VolumeSession:
    """Segment a volume with SAM: prompts on slices, propagation, labels, saving.

    Parameters
    ----------
    volume : path, NiftiVolume or ndarray
        A ``.nii``/``.nii.gz`` file (read with :func:`napari_sam.io.nifti.read_nifti`, geometry
        kept for :meth:`save`), a :class:`~napari_sam.io.nifti.NiftiVolume` (e.g. one volume of
        a 4D series: ``read_nifti(path, volume=3)``), or an array ``(Z, Y, X)`` /
        ``(Z, Y, X, 3)`` in display orientation.
    model : str, path or Sam
        A registry name (``"vit_b"``, ``"vit_t"``, ...), a checkpoint file, or a model object.
    checkpoint : path, optional
        Weights for a registry name (instead of the cached download).
    window : str, Window or (low, high)
        Intensity window for the whole volume: a :func:`napari_sam.intensity.make_window` mode
        (``"auto"``, a CT preset such as ``"soft_tissue"``, ``"percentile"``, ``"minmax"``), a
        ``Window``, or explicit bounds.
    axis : int
        Slicing axis (0: the first display axis, axial for NIfTI files).
    cache_dir : path, optional
        Folder for the on-disk embedding store (reused across sessions); None: memory only.
    device : str
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``... for a model loaded by
        name or path.
    precision : {None, "exact", "auto", "fp32", "int8", "bf16"}
        ``None`` (default): the model as given, exact (equal to Meta's implementation) when
        loaded by name or path; ``"auto"`` runs the fast path (:func:`napari_sam.speed.optimize`),
        the fastest that keeps the same masks, as the widget and the command line do by default.
    labels : integer ndarray, optional
        Labels volume to write into, in place (shape = the volume's spatial shape); default a
        new ``uint16`` volume of zeros.
    max_memory_slices : int
        In-memory embedding bound (4 MiB per slice for official models).
    scale, translate, metadata
        Geometry for :meth:`save` when ``volume`` is an array (NIfTI inputs bring their own).
    encode_fn : callable, optional
        Replaces the image encoder call (tests, remote encoders); see :class:`EmbeddingCache`.
    """

    def __init__(
        self,
        volume: str | os.PathLike | Any,
        model: str | os.PathLike | torch.nn.Module = "vit_b",
        *,
        checkpoint: str | os.PathLike | None = None,
        window: Any = "auto",
        axis: int = 0,
        cache_dir: str | os.PathLike | None = None,
        device: str = "auto",
        precision: str | None = None,
        labels: np.ndarray | None = None,
        max_memory_slices: int = 32,
        scale: Sequence[float] | None = None,
        translate: Sequence[float] | None = None,
        metadata: dict | None = None,
        encode_fn: EncodeFn | None = None,
    ) -> None:
        self._closed = True
        data, meta, geometry, name = _read_volume(volume)
        self.volume: np.ndarray = data
        self.metadata: dict = dict(metadata if metadata is not None else meta)
        self.scale = tuple(scale) if scale is not None else geometry[0]
        self.translate = tuple(translate) if translate is not None else geometry[1]
        self.name = name
        self.rgb = data.ndim == 4
        if not -3 <= axis < 3:
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        self.axis = axis % 3
        spatial = data.shape[:3]
        if labels is None:
            labels = np.zeros(spatial, dtype=np.uint16)
        else:
            if not isinstance(labels, np.ndarray):
                # A copy would silently lose every write.
                raise TypeError(
                    f"labels must be a numpy array (it is written in place), got "
                    f"{type(labels).__name__}; convert it with np.asarray first"
                )
            if labels.shape != spatial or labels.dtype.kind not in "iu":
                raise ValueError(
                    f"labels must be an integer array of shape {spatial} (the volume's), got "
                    f"{labels.dtype} {labels.shape}"
                )
        self.labels: np.ndarray = labels
        window = resolve_window(data, window)  # bad windows fail before a model is loaded

        from napari_sam.speed import check_precision, with_precision

        if precision is not None:
            check_precision(precision)  # before the (slow) load
        self.model = _load(model, checkpoint, device)
        if precision is not None:
            self.model = with_precision(self.model, precision)
        from napari_sam.predictor import SamPredictor

        self.predictor = SamPredictor(self.model)
        self._cache_options = dict(
            axis=self.axis,
            cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None,
            max_memory_slices=max_memory_slices,
            encode_fn=encode_fn,
        )
        self._model_key: str | None = None
        self._annotated: dict[int, set[int]] = {}
        self._absent: dict[int, set[int]] = {}
        self.last_result: SliceResult | None = None
        self.window = None
        self.cache: EmbeddingCache
        self._closed = False
        self.set_window(window)

    # -- setup ---------------------------------------------------------------------------------

    @property
    def num_slices(self) -> int:
        """Number of slices along the session's axis."""
        return int(self.volume.shape[self.axis])

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.cache.slice_shape

    def set_window(self, window: Any) -> None:
        """Change the intensity window; embeddings are then computed (or found) for it."""
        self._check_open()
        window = resolve_window(self.volume, window)
        if self._cache_options["cache_dir"] is not None and self._model_key is None:
            self._model_key = weights_fingerprint(self.model)
        self.window = window
        self.cache = EmbeddingCache(
            self.model,
            self.volume,
            window=window,
            model_key=self._model_key,
            **self._cache_options,
        )

    def close(self) -> None:
        """Release the model, embeddings and predictor state (labels stay readable)."""
        if self._closed:
            return
        self._closed = True
        self.cache.clear_memory()
        self.predictor.reset_image()
        del self.cache, self.predictor, self.model

    def __enter__(self) -> VolumeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"model={getattr(self.model.spec, 'name', '?')}"
        return (
            f"VolumeSession({self.name or 'volume'} {self.volume.shape}, axis={self.axis}, "
            f"{state}, objects={sorted(self._annotated)})"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this VolumeSession is closed; create a new one")

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"slice index must be an integer, got {index!r}")
        if not 0 <= index < self.num_slices:
            raise IndexError(
                f"slice {index} is outside the volume: axis {self.axis} has {self.num_slices} "
                f"slices (0..{self.num_slices - 1})"
            )
        return int(index)

    def _where(self, index: int) -> tuple:
        where: list[Any] = [slice(None)] * 3
        where[self.axis] = index
        return tuple(where)

    # -- objects -------------------------------------------------------------------------------

    @property
    def objects(self) -> dict[int, list[int]]:
        """Label id -> its seed slices."""
        return {label: sorted(s) for label, s in sorted(self._annotated.items())}

    def next_label_id(self) -> int:
        """The smallest label id above every id in use."""
        used = max([int(self.labels.max()), *self._annotated, *self._absent, 0])
        return used + 1

    def slice_image(self, index: int) -> np.ndarray:
        """The 8-bit RGB image SAM sees for a slice."""
        return self.cache.slice_image(self._check_index(index))

    def segment_slice(
        self,
        index: int,
        *,
        points: Any = None,
        point_labels: Any = None,
        box: Any = None,
        mask_input: Any = None,
        label_id: int | None = None,
        multimask: bool = True,
        mode: Mode = "keep",
        commit: bool = True,
    ) -> np.ndarray:
        """Segment one object on one slice from prompts; returns the ``(H, W)`` bool mask.

        Parameters
        ----------
        index : int
            Slice along the session's axis.
        points : (N, 2) array-like, optional
            ``(x, y)`` = (column, row) pixels of the slice.
        point_labels : (N,) array-like, optional
            1 foreground, 0 background; default all foreground.
        box : [x0, y0, x1, y1], optional
        mask_input : array, optional
            A ``(H, W)`` mask of the slice (e.g. painted) or ``(1, L, L)`` logits from
            ``session.last_result.logits``.
        label_id : int, optional
            Object to write; default a new id (:meth:`next_label_id`).
        multimask : bool
            Ask for three masks and keep the one with the highest predicted IoU.
        mode : {"keep", "overwrite"}
            Overlap rule with other objects (see
            :func:`~napari_sam.volume.propagation.merge_masks`).
        commit : bool
            Write the mask into :attr:`labels` (replacing this object's previous mask on the
            slice) and make the slice a seed of the object. False only previews.
        """
        self._check_open()
        index = self._check_index(index)
        embedding, original_size, input_size = self.cache.get(index)
        self.predictor.set_image_embedding(embedding, original_size, input_size)
        if points is not None:
            points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
            if point_labels is None:
                point_labels = np.ones(len(points), dtype=np.int64)
        if mask_input is not None:
            mask_input = np.asarray(mask_input)
            if mask_input.shape == tuple(original_size):
                mask_input = mask_to_mask_input(mask_input, self.predictor.transform, original_size)
        masks, scores, logits = self.predictor.predict(
            point_coords=points,
            point_labels=point_labels,
            box=None if box is None else np.asarray(box, dtype=np.float64),
            mask_input=mask_input,
            multimask_output=multimask,
        )
        best = int(np.argmax(scores))
        mask = masks[best]
        if commit:
            label_id = self._label(label_id)
            self._commit(index, label_id, mask, mode)
        self.last_result = SliceResult(
            index, label_id, mask, float(scores[best]), logits[best][None], masks, scores
        )
        return mask

    def add_mask(
        self, index: int, mask: np.ndarray, *, label_id: int | None = None, mode: Mode = "keep"
    ) -> int:
        """Write a mask (painted, or from another tool) as a seed of an object; returns its id."""
        self._check_open()
        index = self._check_index(index)
        mask = np.asarray(mask).astype(bool, copy=False)
        if mask.shape != self.slice_shape:
            raise ValueError(f"mask has shape {mask.shape}; slices are {self.slice_shape}")
        label_id = self._label(label_id)
        self._commit(index, label_id, mask, mode)
        return label_id

    def annotate(self, label_id: int, index: int) -> None:
        """Make a slice a seed of an object as it is in :attr:`labels` (e.g. drawn in napari)."""
        index = self._check_index(index)
        self._annotated.setdefault(self._label(label_id), set()).add(index)
        self._absent.get(label_id, set()).discard(index)

    def mark_absent(self, label_id: int, index: int) -> None:
        """Declare an object absent on a slice: propagation will not cross it."""
        index = self._check_index(index)
        self._absent.setdefault(self._label(label_id), set()).add(index)
        self._annotated.get(label_id, set()).discard(index)

    def remove_object(self, label_id: int) -> int:
        """Erase an object from :attr:`labels` and forget its seeds; returns voxels cleared."""
        hit = self.labels == label_id
        self.labels[hit] = 0
        self._annotated.pop(label_id, None)
        self._absent.pop(label_id, None)
        return int(np.count_nonzero(hit))

    def _label(self, label_id: int | None) -> int:
        if label_id is None:
            return self.next_label_id()
        if isinstance(label_id, bool) or not isinstance(label_id, int | np.integer):
            raise TypeError(f"label_id must be an integer, got {label_id!r}")
        if not 0 < label_id <= np.iinfo(self.labels.dtype).max:
            raise ValueError(
                f"label_id must be between 1 and {np.iinfo(self.labels.dtype).max} for labels "
                f"of dtype {self.labels.dtype}, got {label_id}"
            )
        return int(label_id)

    def _commit(self, index: int, label_id: int, mask: np.ndarray, mode: Mode) -> None:
        write_masks(self.labels, {label_id: mask}, axis=self.axis, index=index, mode=mode)
        if mask.any():
            self.annotate(label_id, index)

    # -- propagation ---------------------------------------------------------------------------

    def seeds(self, label_ids: Iterable[int] | None = None) -> dict[int, dict[int, np.ndarray]]:
        """Seed masks as they are now in :attr:`labels` (absent slices as empty masks)."""
        ids = sorted(self._annotated) if label_ids is None else [int(i) for i in label_ids]
        seeds: dict[int, dict[int, np.ndarray]] = {}
        for label in ids:
            slices = self._annotated.get(label, set())
            if not slices:
                raise ValueError(
                    f"object {label} has no seed slice: segment it on a slice first "
                    "(segment_slice / add_mask / annotate)"
                )
            per = {z: self.labels[self._where(z)] == label for z in slices}
            empty = np.zeros(self.slice_shape, dtype=bool)
            per.update({z: empty for z in self._absent.get(label, ())})
            seeds[label] = per
        return seeds

    def propagate_iter(
        self, label_ids: Iterable[int] | None = None, *, mode: Mode = "keep", **options: Any
    ) -> Iterator[Step]:
        """Propagate objects through the volume, writing each slice before yielding it.

        Parameters
        ----------
        label_ids : iterable of int, optional
            Objects to propagate (default: every object with a seed).
        mode : {"keep", "overwrite"}
            Overlap rule with other objects.
        **options
            Passed to :func:`napari_sam.volume.propagation.propagate`: ``slice_range``,
            ``directions``, ``use_box``, ``use_points``, ``num_points``, ``multimask``,
            ``min_area``, ``min_pred_iou``, ``min_iou_prev``.

        Yields
        ------
        Step
            Already written into :attr:`labels`. Stop at any time (``break`` or ``close()``):
            the labels then hold the finished slices only.
        """
        self._check_open()
        seeds = self.seeds(label_ids)
        if not seeds:
            raise ValueError("no object to propagate: segment an object on a slice first")
        for step in propagate(self.cache, self.predictor, seeds, **options):
            step.changed = write_masks(self.labels, step, axis=self.axis, mode=mode)
            yield step

    def propagate(
        self,
        label_ids: Iterable[int] | None = None,
        *,
        mode: Mode = "keep",
        progress: bool = False,
        **options: Any,
    ) -> PropagationSummary:
        """Run :meth:`propagate_iter` to the end; ``progress=True`` shows a progress bar."""
        summary = PropagationSummary()
        steps = self.propagate_iter(label_ids, mode=mode, **options)
        bar = _progress_bar(progress, "propagating", unit="slice")
        try:
            for step in steps:
                summary.slices += 1
                summary.changed_voxels += step.changed
                for label in step.masks:
                    lo, hi = summary.extent.get(label, (step.index, step.index))
                    summary.extent[label] = (min(lo, step.index), max(hi, step.index))
                for label, reason in step.stopped.items():
                    summary.stopped.setdefault(label, []).append((step.index, reason))
                if bar is not None:
                    bar.total = step.total
                    bar.update(1)
        finally:
            steps.close()
            if bar is not None:
                bar.close()
        return summary

    # -- embeddings and files ------------------------------------------------------------------

    def precompute_iter(
        self, indices: Iterable[int] | None = None, cancel: Cancel = None
    ) -> Iterator[int]:
        """Compute (or find) slice embeddings ahead of time; yields each slice index."""
        self._check_open()
        return self.cache.precompute(indices, cancel=cancel)

    def precompute(self, indices: Iterable[int] | None = None, *, progress: bool = False) -> int:
        """Run :meth:`precompute_iter` to the end; returns the number of slices."""
        todo = list(range(self.num_slices) if indices is None else indices)
        bar = _progress_bar(progress, "encoding", unit="slice", total=len(todo))
        count = 0
        try:
            for _ in self.precompute_iter(todo):
                count += 1
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return count

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write :attr:`labels` as NIfTI in the source's geometry (atomic)."""
        from napari_sam.io.nifti import write_labels

        return write_labels(
            path,
            self.labels,
            self.metadata,
            scale=self.scale,
            translate=self.translate,
            overwrite=overwrite,
        )


def resolve_window(volume: np.ndarray, window: Any):
    """A :class:`~napari_sam.intensity.Window` from a mode name, ``(low, high)`` or a Window.

    Mode names are those of :func:`napari_sam.intensity.make_window` (``"auto"``, CT presets
    such as ``"soft_tissue"``, ``"percentile"``, ``"minmax"``...). None stays None (the cache
    then uses ``"auto"``; uint8 RGB volumes need no window).
    """
    from napari_sam.intensity import Window, make_window

    if window is None or isinstance(window, Window):
        return window
    if isinstance(window, str):
        return make_window(volume, window)
    if isinstance(window, Sequence) and len(window) == 2:
        return Window(float(window[0]), float(window[1]))
    raise ValueError(f"window must be a mode name, a Window or (low, high), got {window!r}")


def _read_volume(volume: Any) -> tuple[np.ndarray, dict, tuple, str]:
    if isinstance(volume, str | os.PathLike):
        from napari_sam.io.nifti import read_nifti

        path = Path(volume).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"volume file {path} does not exist")
        volume = read_nifti(path)
    if hasattr(volume, "data") and hasattr(volume, "metadata"):
        data = np.asarray(volume.data)
        rgb = bool(getattr(volume, "rgb", False))
        geometry = (tuple(volume.scale), tuple(volume.translate))
        meta, name = dict(volume.metadata), getattr(volume, "name", "")
    else:
        data = np.asarray(volume)
        rgb = data.ndim == 4 and data.shape[-1] in (3, 4)
        geometry, meta, name = (None, None), {}, ""
    if data.ndim != 3 + rgb:
        what = "a 2D image" if data.ndim == 2 + rgb else f"an array of shape {data.shape}"
        hint = (
            "; for a 4D series pick one volume: read_nifti(path, volume=i)"
            if data.ndim == 4 + rgb
            else "; for 2D images use SamPredictor"
        )
        raise ValueError(f"a VolumeSession needs a 3D volume (Z, Y, X), got {what}{hint}")
    if data.dtype.kind not in "biuf":
        raise ValueError(f"volume dtype {data.dtype} is not numeric")
    if geometry[0] is not None:
        geometry = (geometry[0][:3], geometry[1][:3])
    return data, meta, geometry, name


def _load(model: Any, checkpoint: Any, device: str) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        if checkpoint is not None:
            raise ValueError("checkpoint= is for a model given by name, not a model object")
        return model
    from napari_sam.weights import load_model

    return load_model(model, checkpoint=checkpoint, device=device)


def _progress_bar(enabled: bool, desc: str, **kwargs: Any):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=desc, **kwargs)

"""VolumeSession: one volume, one model, its embedding cache and its objects (the scripting API).

A session ties together what segmenting a volume needs: the volume (a NIfTI path or an array), a
model, an intensity window, the per-slice embedding cache and a labels volume in the same
(display) orientation. Objects are label ids; each has *seed* slices (segmented with prompts or
painted) from which :meth:`VolumeSession.propagate` follows it through the volume.

Seeds are read from the labels volume when propagation starts, so a seed slice corrected by hand
(in napari, or by writing into ``session.labels``) is propagated as corrected.

Lifecycle: a session is made once and re-targeted (``set_volume``, ``set_axis``, ``set_window``,
``set_labels``, ``set_model``); every write goes through a
:class:`~napari_sam.volume.labels_writer.LabelsWriter` (undo), every model call through its
:class:`~napari_sam.volume.parts.SessionParts` (the propagation strategy, the embedding source).
The napari widget and console share one session.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from napari_sam.intensity import resolve_window
from napari_sam.volume.embeddings import Cancel, EncodeFn, weights_fingerprint
from napari_sam.volume.labels_writer import ArrayWriter, LabelsWriter
from napari_sam.volume.parts import SessionParts, is_sam2, parts_for
from napari_sam.volume.propagation import Step, merge_masks

__all__ = ["PropagationSummary", "SliceResult", "VolumeSession", "resolve_window"]

Mode = Literal["keep", "overwrite"]


@dataclass
class SliceResult:
    """A prediction of :meth:`VolumeSession.preview` / :meth:`VolumeSession.segment_slice`.

    ``mask``, ``score`` and ``logits`` (``1 x L x L``) are the best candidate's; ``logits`` can
    be passed back as ``mask_input`` to refine the same slice. ``masks`` ``(C, H, W)``,
    ``scores`` ``(C,)`` and ``all_logits`` ``(C, L, L)`` hold every candidate.
    ``label_id`` is set once committed.
    """

    index: int
    label_id: int | None
    mask: np.ndarray
    score: float
    logits: np.ndarray
    masks: np.ndarray
    scores: np.ndarray
    all_logits: np.ndarray | None = None


@dataclass
class PropagationSummary:
    """What one :meth:`VolumeSession.propagate` run did."""

    slices: int = 0
    changed_voxels: int = 0
    extent: dict[int, tuple[int, int]] = field(default_factory=dict)
    stopped: dict[int, list[tuple[int, str]]] = field(default_factory=dict)


@dataclass
class _Objects:
    """Seed and absent slices of the objects of one labels volume (sliced along one axis)."""

    annotated: dict[int, set[int]] = field(default_factory=dict)
    absent: dict[int, set[int]] = field(default_factory=dict)


class VolumeSession:
    """Segment a volume with SAM: prompts on slices, propagation, labels, saving.

    A session has a lifecycle: it is made once and re-targeted (:meth:`set_volume`,
    :meth:`set_axis`, :meth:`set_window`, :meth:`set_labels`, :meth:`set_model`) without
    being rebuilt; what a change invalidates (embeddings, predictor state) is dropped and made
    again on first use. The napari widget keeps one session for its whole life and napari's
    console gets that same object as ``sam_session``.

    Parameters
    ----------
    volume : path, NiftiVolume, ndarray or None
        A ``.nii``/``.nii.gz`` file (read with :func:`napari_sam.io.nifti.read_nifti`, geometry
        kept for :meth:`save`), a :class:`~napari_sam.io.nifti.NiftiVolume` (e.g. one volume of
        a 4D series: ``read_nifti(path, volume=3)``), or an array ``(Z, Y, X)`` /
        ``(Z, Y, X, 3)`` in display orientation. None: set one later with :meth:`set_volume`.
    model : str, path, Sam or None
        A registry name (``"vit_b"``, ``"vit_t"``, ...), a checkpoint file, or a model object.
        None: set one later with :meth:`set_model`.
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
    writer : LabelsWriter, optional
        Where writes go (default :class:`~napari_sam.volume.labels_writer.ArrayWriter` on
        ``labels``, with its own undo); the widget's writes through napari's undo history.
    max_memory_slices : int
        In-memory embedding bound (4 MiB per slice for official models).
    scale, translate, metadata
        Geometry for :meth:`save` when ``volume`` is an array (NIfTI inputs bring their own).
    encode_fn : callable, optional
        Replaces the image encoder call (tests, remote encoders); see :class:`EmbeddingCache`.
    encoding : str
        ``"local"`` (default) or a dask scheduler address (``"tcp://gpu-box:8786"``): slices
        are then encoded on the cluster's workers and the embeddings come back into this
        session's cache (see :meth:`set_encoding`; needs the ``[cluster]`` extra and the model
        by name or path, which the workers load too).
    parts : SessionParts, optional
        How the model work is done (predictor, cache, decoding, propagation strategy); see
        :mod:`napari_sam.volume.parts`.

    Attributes
    ----------
    before_use : callable or None
        ``before_use(session, needs)`` runs at the start of each operation; ``needs`` is
        ``{"labels"}`` or ``{"labels", "model"}``. The widget uses it to bring the session to
        its current choices when the console calls it.
    """

    def __init__(
        self,
        volume: str | os.PathLike | Any = None,
        model: str | os.PathLike | torch.nn.Module | None = "vit_b",
        *,
        checkpoint: str | os.PathLike | None = None,
        window: Any = "auto",
        axis: int = 0,
        cache_dir: str | os.PathLike | None = None,
        device: str = "auto",
        precision: str | None = None,
        labels: np.ndarray | None = None,
        writer: LabelsWriter | None = None,
        max_memory_slices: int = 32,
        scale: Sequence[float] | None = None,
        translate: Sequence[float] | None = None,
        metadata: dict | None = None,
        encode_fn: EncodeFn | None = None,
        parts: SessionParts | None = None,
        encoding: str = "local",
    ) -> None:
        self._closed = False
        self.parts = parts if parts is not None else SessionParts()
        # Parts given by the caller stay; default parts follow the model (SAM 2 tracks).
        self._parts_given = parts is not None
        self._tracker: Any = None
        #: Options of the SAM 2 tracker (``stop_after``, ``non_overlap``, ``fill_hole_area``...).
        self.tracking_options: dict[str, Any] = {}
        self.before_use: Callable[[VolumeSession, set[str]], None] | None = None
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._cache_options: dict[str, Any] = dict(max_memory_slices=max_memory_slices)
        if encode_fn is not None:
            self._cache_options["encode_fn"] = encode_fn
        self.volume: np.ndarray | None = None
        self.writer: LabelsWriter | None = None
        self.metadata: dict = {}
        self.scale: tuple | None = None
        self.translate: tuple | None = None
        self.name = ""
        self.rgb = False
        self.axis = 0
        self.window: Any = None
        self.model: Any = None
        self.predictor: Any = None
        self.last_result: SliceResult | None = None
        self._cache: Any = None
        self._model_key: str | None = None
        self._labels_key: Any = None
        self._store: dict[tuple, _Objects] = {}
        self._objects = _Objects()
        self._encoder: Any = None  # the remote encoder this session made (and closes)
        self._model_source: Any = None  # how workers load the model (set_model by name/path)
        if volume is not None:
            # Bad volumes and windows fail before a model is loaded.
            self.set_volume(
                volume,
                axis=axis,
                window=window,
                labels=labels,
                writer=writer,
                scale=scale,
                translate=translate,
                metadata=metadata,
            )
        if precision is not None:
            from napari_sam.speed import check_precision

            check_precision(precision)  # before the (slow) load
        if model is not None:
            self.set_model(model, checkpoint=checkpoint, device=device, precision=precision)
        if encoding != "local":
            if encode_fn is not None:
                raise ValueError("give encode_fn= or encoding=, not both")
            self.set_encoding(encoding)

    # -- lifecycle -----------------------------------------------------------------------------

    def set_model(
        self,
        model: str | os.PathLike | torch.nn.Module,
        *,
        checkpoint: str | os.PathLike | None = None,
        device: str = "auto",
        precision: str | None = None,
    ) -> None:
        """Use another model (loaded here when given by name or path); embeddings follow."""
        self._check_open()
        self._model_source = _model_source(model, checkpoint, device, precision)
        model = _load(model, checkpoint, device)
        if precision is not None:
            from napari_sam.speed import with_precision

            model = with_precision(model, precision)
        self.model = model
        if not self._parts_given:
            self.parts = parts_for(model)
        self.predictor = self.parts.make_predictor(model)
        self._tracker = None
        self._model_key = None
        self._cache = None

    def set_encoding(
        self,
        encoding: str | None,
        *,
        source: Any = None,
        timeout: float = 60.0,
        on_status: Callable[[str], Any] | None = None,
    ) -> None:
        """Encode slices locally (``"local"`` or None) or on a dask cluster (its scheduler
        address); prompting stays local either way.

        Parameters
        ----------
        encoding : str or None
            ``"local"``/None, or a scheduler address such as ``"tcp://gpu-box:8786"``.
        source : ModelSource or str, optional
            How the workers load the same model (a registry name or a weights file they can
            read); default: the name or path this session's model was loaded from.
        timeout : float
            Seconds to wait for the scheduler and for one slice.
        on_status : callable, optional
            Called with the encoder's status line (``"remote: ..."``, ``"local: <reason>"``)
            when it changes, from the thread that encodes.

        Notes
        -----
        The session owns the encoder it makes here: a later call, :meth:`close` or leaving the
        ``with`` block closes it. When the cluster cannot be reached or is lost, slices are
        encoded locally from then on (:attr:`encoder` ``.status`` says why;
        ``encoder.reconnect()`` tries again). Embeddings of the two paths share the cache
        (same model, same key).
        """
        self._check_open()
        if encoding in (None, "", "local"):
            new = None
        elif is_sam2(self.model):
            raise ValueError(
                "remote encoding computes SAM 1 embeddings; SAM 2 models encode locally"
            )
        else:
            source = source if source is not None else self._model_source
            if source is None:
                raise ValueError(
                    "remote encoding needs the model by registry name or weights file (the "
                    "workers load it too), not a model object: pass source="
                )
            from napari_sam.cluster.remote import remote_encoder

            new = remote_encoder(str(encoding), source, timeout=timeout, on_status=on_status)
        old, self._encoder = self._encoder, new
        if old is not None:
            old.close()
        if new is not None:
            self._cache_options["encode_fn"] = new
        elif old is not None:
            self._cache_options.pop("encode_fn", None)
        if new is not None or old is not None:
            self._cache = None  # the next cache encodes the new way (stored slices are reused)

    @property
    def encoder(self) -> Any:
        """The remote encoder made by :meth:`set_encoding` (``status``, ``reconnect()``,
        ``remote_slices``), or None when encoding locally."""
        return self._encoder

    def set_volume(
        self,
        volume: str | os.PathLike | Any,
        *,
        axis: int | None = None,
        window: Any = "auto",
        labels: np.ndarray | None = None,
        writer: LabelsWriter | None = None,
        labels_key: Any = None,
        scale: Sequence[float] | None = None,
        translate: Sequence[float] | None = None,
        metadata: dict | None = None,
    ) -> None:
        """Work on another volume (a new image, another time point); the model stays.

        ``axis`` defaults to the current one; ``labels``/``writer`` as in the constructor (a
        new zero volume when neither is given); ``labels_key`` see :meth:`set_labels`.
        """
        self._check_open()
        data, meta, geometry, name = _read_volume(volume)
        axis = self.axis if axis is None else _check_axis(axis)
        window = resolve_window(data, window)
        self.volume = data
        self.metadata = dict(metadata if metadata is not None else meta)
        self.scale = tuple(scale) if scale is not None else geometry[0]
        self.translate = tuple(translate) if translate is not None else geometry[1]
        self.name = name
        self.rgb = data.ndim == 4
        self.axis = axis
        self.window = window
        self._cache = None
        self.last_result = None
        self.set_labels(labels, writer=writer, key=labels_key)

    def set_axis(self, axis: int) -> None:
        """Slice along another axis (seeds are per axis: each axis keeps its own objects)."""
        self._check_open()
        axis = _check_axis(axis)
        if axis != self.axis:
            self.axis = axis
            self._cache = None
            self.last_result = None
            self._switch_objects()

    def set_window(self, window: Any) -> None:
        """Change the intensity window; embeddings are then computed (or found) for it."""
        self._check_open()
        self._require_volume()
        self.window = resolve_window(self.volume, window)
        self._cache = None
        self._tracker = None

    def set_labels(
        self,
        labels: np.ndarray | None = None,
        *,
        writer: LabelsWriter | None = None,
        key: Any = None,
    ) -> None:
        """Write into other labels: an integer array of the volume's spatial shape (in place),
        or a ``writer`` (whose ``labels`` is read). None and no writer: a new zero volume.

        Objects (seed and absent slices) belong to the labels: ``key`` names them so that
        coming back to the same labels (e.g. a napari layer) finds its objects again; default
        the array's identity.
        """
        self._check_open()
        spatial = self._require_volume().shape[:3]
        if writer is not None:
            labels = writer.labels
        elif labels is None:
            labels = np.zeros(spatial, dtype=np.uint16)
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
        self.writer = writer if writer is not None else ArrayWriter(labels, self.axis)
        self._labels_key = key if key is not None else id(labels)
        self._switch_objects()

    def _switch_objects(self) -> None:
        self._tracker = None
        if isinstance(self.writer, ArrayWriter):
            self.writer.axis = self.axis
        self._objects = self._store.setdefault((self._labels_key, self.axis), _Objects())

    def close(self) -> None:
        """Release the model, embeddings and predictor state (labels stay readable)."""
        if self._closed:
            return
        self._closed = True
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None
        if self._cache is not None:
            self._cache.clear_memory()
        if hasattr(self.predictor, "reset_image"):
            self.predictor.reset_image()
        self._cache = self.predictor = self.model = self._tracker = None

    def __enter__(self) -> VolumeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        model = getattr(getattr(self.model, "spec", None), "name", "?" if self.model else None)
        state = "closed" if self._closed else f"model={model}"
        shape = None if self.volume is None else self.volume.shape
        return (
            f"VolumeSession({self.name or 'volume'} {shape}, axis={self.axis}, "
            f"{state}, objects={sorted(self._objects.annotated)})"
        )

    # -- state ---------------------------------------------------------------------------------

    @property
    def labels(self) -> np.ndarray | None:
        """The ``(Z, Y, X)`` labels the session writes into (its writer's; None before a
        volume is set). Read from the writer each time, so a napari layer whose data array was
        replaced is followed."""
        return None if self.writer is None else self.writer.labels

    @property
    def labels_key(self) -> Any:
        """The key of the labels the objects belong to (see :meth:`set_labels`)."""
        return self._labels_key

    @property
    def ready(self) -> bool:
        """Whether a volume and a model are set (and the session is open)."""
        return not self._closed and self.volume is not None and self.model is not None

    @property
    def cache(self) -> Any:
        """The embedding cache of the volume, window, axis and model (made on first use)."""
        if self._cache is None:
            self._check_open()
            self._require_volume()
            if self.model is None:
                raise ValueError("no model: choose one first (set_model)")
            options = dict(self._cache_options)
            if self.cache_dir is not None:
                if self._model_key is None:
                    self._model_key = weights_fingerprint(self.model)
                options["model_key"] = self._model_key
            self._cache = self.parts.make_cache(
                self.model, self.volume, self.axis, self.window, self.cache_dir, **options
            )
        return self._cache

    @cache.setter
    def cache(self, cache: Any) -> None:
        self._cache = cache

    @property
    def num_slices(self) -> int:
        """Number of slices along the session's axis."""
        return int(self._require_volume().shape[self.axis])

    @property
    def slice_shape(self) -> tuple[int, int]:
        """``(H, W)`` of one slice."""
        shape = self._require_volume().shape[:3]
        rows, cols = (s for i, s in enumerate(shape) if i != self.axis)
        return int(rows), int(cols)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this VolumeSession is closed; create a new one")

    def _require_volume(self) -> np.ndarray:
        if self.volume is None:
            raise ValueError("no volume: open one first (set_volume)")
        return self.volume

    def _use(self, *needs: str) -> None:
        """Run the ``before_use`` hook, then check what the operation needs is there."""
        self._check_open()
        if self.before_use is not None:
            self.before_use(self, set(needs))
        self._require_volume()
        if "model" in needs and self.model is None:
            raise ValueError("no model: choose one first (set_model)")

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
        return {label: sorted(s) for label, s in sorted(self._objects.annotated.items()) if s}

    def next_label_id(self) -> int:
        """The smallest label id above every id in the labels and every object marked absent.

        An object whose pixels are all gone (undone, erased) frees its id, as napari does."""
        used = max([self._writer().max_label(), *self._objects.absent, 0])
        return used + 1

    def slice_image(self, index: int) -> np.ndarray:
        """The 8-bit RGB image SAM sees for a slice."""
        return self.cache.slice_image(self._check_index(index))

    def is_encoded(self, index: int) -> bool:
        """Whether slice ``index``'s embedding is ready (no encoder run needed)."""
        return self.parts.is_encoded(self.cache, self._check_index(index))

    def preview(
        self,
        index: int,
        *,
        points: Any = None,
        point_labels: Any = None,
        box: Any = None,
        mask: Any = None,
        mask_input: Any = None,
        multimask: bool = True,
    ) -> SliceResult:
        """Segment one object on one slice without writing anything; returns every mask.

        ``mask`` is a drawn ``(H, W)`` region used as the dense prompt, ``mask_input`` the
        ``(1, L, L)`` logits of a previous prediction (it wins over ``mask``); see
        :meth:`segment_slice` for the other arguments. Safe to call from a worker thread.
        """
        self._use("model")
        index = self._check_index(index)
        self.parts.embed(self.cache, self.predictor, index)
        if points is not None:
            points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
            if point_labels is None:
                point_labels = np.ones(len(points), dtype=np.int64)
            point_labels = np.asarray(point_labels)
        if mask_input is not None:
            mask_input = np.asarray(mask_input)
            if mask_input.shape == self.slice_shape:  # a painted mask, not logits
                mask, mask_input = mask_input, None
        if mask is not None:
            mask = np.asarray(mask).astype(bool, copy=False)
        masks, scores, logits = self.parts.predict(
            self.predictor,
            points=points,
            point_labels=point_labels,
            box=None if box is None else np.asarray(box, dtype=np.float64),
            mask=mask,
            mask_input=mask_input,
            multimask=multimask,
        )
        best = int(np.argmax(scores))
        result = SliceResult(
            index,
            None,
            masks[best],
            float(scores[best]),
            logits[best][None],
            masks,
            scores,
            logits,
        )
        self.last_result = result
        return result

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
        result = self.preview(
            index,
            points=points,
            point_labels=point_labels,
            box=box,
            mask_input=mask_input,
            multimask=multimask,
        )
        if commit:
            result.label_id = self.commit(result, label_id=label_id, mode=mode)
        return result.mask

    def commit(
        self,
        result: SliceResult | None = None,
        *,
        label_id: int | None = None,
        mode: Mode = "keep",
        replace: bool = True,
    ) -> int:
        """Write a previewed mask (default :attr:`last_result`) as a seed; returns its id."""
        result = result if result is not None else self.last_result
        if result is None:
            raise ValueError("nothing to commit: preview a slice first (preview/segment_slice)")
        return self.add_mask(
            result.index, result.mask, label_id=label_id, mode=mode, replace=replace
        )

    def add_mask(
        self,
        index: int,
        mask: np.ndarray,
        *,
        label_id: int | None = None,
        mode: Mode = "keep",
        replace: bool = True,
    ) -> int:
        """Write a mask (painted, or from another tool) as a seed of an object; returns its id.

        One undo step. ``replace``: the object's previous pixels on the slice go first (False
        adds to them).
        """
        self._use("labels")
        index = self._check_index(index)
        mask = np.asarray(mask).astype(bool, copy=False)
        if mask.shape != self.slice_shape:
            raise ValueError(f"mask has shape {mask.shape}; slices are {self.slice_shape}")
        label_id = self._label(label_id)
        with self._writer().undo_step():
            self._write(index, {label_id: mask}, mode, replace)
        if mask.any():
            self.annotate(label_id, index)
        return label_id

    def add_objects(self, index: int, found: np.ndarray, *, mode: Mode = "keep") -> list[int]:
        """Write a label image of one slice (0 = background, 1..n objects, e.g. from
        :meth:`segment_everything_iter`) as new objects, in one undo step.

        Object ``k`` gets id ``next_label_id() - 1 + k``; returns the ids written (an object
        that ``mode="keep"`` leaves no pixel of is not written).
        """
        self._use("labels")
        index = self._check_index(index)
        found = np.asarray(found)
        if found.shape != self.slice_shape:
            raise ValueError(f"label image has shape {found.shape}; slices are {self.slice_shape}")
        base, count = self.next_label_id() - 1, int(found.max(initial=0))
        limit = np.iinfo(self._writer().labels.dtype).max
        if base + count > limit:
            raise ValueError(
                f"{count} new labels do not fit the labels' {self._writer().labels.dtype}"
            )
        current = self._writer().labels[self._where(index)]
        write = found > 0
        if mode == "keep":
            write &= current == 0
        rows, cols = np.nonzero(write)
        values = (base + found[rows, cols]).astype(current.dtype)
        with self._writer().undo_step():
            self._writer().write(index, rows, cols, values)
        added = [int(v) for v in np.unique(values)]
        for label in added:
            self.annotate(label, index)
        return added

    def annotate(self, label_id: int, index: int) -> None:
        """Make a slice a seed of an object as it is in :attr:`labels` (e.g. drawn in napari)."""
        index = self._check_index(index)
        self._objects.annotated.setdefault(self._label(label_id), set()).add(index)
        self._objects.absent.get(label_id, set()).discard(index)

    def mark_absent(self, label_id: int, index: int) -> None:
        """Declare an object absent on a slice: propagation will not cross it."""
        index = self._check_index(index)
        self._objects.absent.setdefault(self._label(label_id), set()).add(index)
        self._objects.annotated.get(label_id, set()).discard(index)

    def remove_object(self, label_id: int) -> int:
        """Erase an object from :attr:`labels` (one undo step) and forget its seeds; returns
        the voxels cleared."""
        self._use("labels")
        writer = self._writer()
        hit = writer.labels == label_id
        cleared = int(np.count_nonzero(hit))
        with writer.undo_step():
            for index in np.flatnonzero(hit.any(axis=tuple(a for a in range(3) if a != self.axis))):
                rows, cols = np.nonzero(hit[self._where(int(index))])
                writer.write(int(index), rows, cols, 0)
        self._objects.annotated.pop(label_id, None)
        self._objects.absent.pop(label_id, None)
        return cleared

    def undo(self) -> None:
        """Undo the last write (a commit, a propagation, ...) through the writer."""
        self._use("labels")
        self._writer().undo()
        # The tracker's memory may hold what was just undone: later prompts start afresh.
        self._tracker = None

    def _writer(self) -> LabelsWriter:
        if self.writer is None:
            self.set_labels()
        assert self.writer is not None
        return self.writer

    def _label(self, label_id: int | None) -> int:
        if label_id is None:
            return self.next_label_id()
        if isinstance(label_id, bool) or not isinstance(label_id, int | np.integer):
            raise TypeError(f"label_id must be an integer, got {label_id!r}")
        dtype = self._writer().labels.dtype
        if not 0 < label_id <= np.iinfo(dtype).max:
            raise ValueError(
                f"label_id must be between 1 and {np.iinfo(dtype).max} for labels "
                f"of dtype {dtype}, got {label_id}"
            )
        return int(label_id)

    def _write(self, index: int, masks: Mapping[int, np.ndarray], mode: Mode, replace: bool) -> int:
        """Merge ``masks`` into slice ``index`` through the writer; returns pixels changed."""
        writer = self._writer()
        current = writer.labels[self._where(index)]
        merged = merge_masks(current, masks, mode=mode, replace=replace)
        rows, cols = np.nonzero(merged != current)
        if rows.size:
            writer.write(index, rows, cols, merged[rows, cols])
        return int(rows.size)

    # -- propagation ---------------------------------------------------------------------------

    def seeds(self, label_ids: Iterable[int] | None = None) -> dict[int, dict[int, np.ndarray]]:
        """Seed masks as they are now in :attr:`labels` (absent slices as empty masks).

        A seed slice that no longer holds its object (undone, erased) is no seed. An object
        asked for by id that has no seed slice has every slice where it is present (painted by
        hand) as seeds. Objects without any seed are left out.
        """
        labels = self._writer().labels
        ids = sorted(self._objects.annotated) if label_ids is None else [int(i) for i in label_ids]
        seeds: dict[int, dict[int, np.ndarray]] = {}
        for label in ids:
            slices = self._objects.annotated.get(label, set())
            if not slices and label_ids is not None:
                others = tuple(a for a in range(3) if a != self.axis)
                slices = set(np.flatnonzero((labels == label).any(axis=others)).tolist())
            per = {z: np.array(labels[self._where(z)] == label) for z in sorted(slices)}
            per = {z: m for z, m in per.items() if m.any()}
            if not per:
                continue
            empty = np.zeros(self.slice_shape, dtype=bool)
            per.update({z: empty for z in self._objects.absent.get(label, ())})
            seeds[label] = per
        return seeds

    def propagation_steps(
        self,
        label_ids: Iterable[int] | None = None,
        *,
        seeds: Mapping[int, Mapping[int, np.ndarray]] | None = None,
        **options: Any,
    ) -> Iterator[Step]:
        """Propagation computed but not written: one :class:`Step` per finished slice.

        Reads the labels only (:meth:`seeds`, unless ``seeds`` are given), so it can run in a
        worker thread while the steps are written elsewhere with :meth:`write_step`.
        ``options`` as in :meth:`propagate_iter`.
        """
        self._use("labels", "model")
        if seeds is None:
            label_ids = None if label_ids is None else [int(i) for i in label_ids]
            seeds = self.seeds(label_ids)
            for label in label_ids or ():
                if label not in seeds:
                    raise ValueError(
                        f"object {label} has no seed slice: segment it on a slice first "
                        "(segment_slice / add_mask / annotate)"
                    )
        if not seeds:
            raise ValueError(
                "no object to propagate: segment an object on a slice first (or paint it and "
                "propagate it by its label id)"
            )
        return self.parts.propagate(self.cache, self.predictor, seeds, **options)

    def write_step(self, step: Step, *, mode: Mode = "keep", replace: bool = True) -> int:
        """Write one propagated slice through the writer; returns (and records in
        ``step.changed``) the pixels changed."""
        step.changed = self._write(step.index, step.masks, mode, replace) if step.masks else 0
        return step.changed

    def propagate_iter(
        self,
        label_ids: Iterable[int] | None = None,
        *,
        mode: Mode = "keep",
        replace: bool = True,
        **options: Any,
    ) -> Iterator[Step]:
        """Propagate objects through the volume, writing each slice before yielding it.

        Parameters
        ----------
        label_ids : iterable of int, optional
            Objects to propagate (default: every object with a seed).
        mode : {"keep", "overwrite"}
            Overlap rule with other objects.
        replace : bool
            A slice's previous pixels of a propagated object go first (False adds to them).
        **options
            Passed to the propagation strategy (:meth:`SessionParts.propagate`, default
            :func:`napari_sam.volume.propagation.propagate`): ``slice_range`` as
            ``(start, stop)``, ``directions``, ``use_box``, ``use_points``, ``num_points``,
            ``multimask``, ``min_area``, ``min_pred_iou``, ``min_iou_prev``.

        Yields
        ------
        Step
            Already written into :attr:`labels`. Stop at any time (``break`` or ``close()``):
            the labels then hold the finished slices only. The whole run is one undo step.
        """
        steps = self.propagation_steps(label_ids, **options)
        try:
            with self._writer().undo_step():
                for step in steps:
                    self.write_step(step, mode=mode, replace=replace)
                    yield step
        finally:
            steps.close()

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

    # -- tracking (SAM 2) ---------------------------------------------------------------------

    @property
    def tracker(self) -> Any:
        """The :class:`~napari_sam.volume.tracking.VolumeTracker` of the volume, axis, window
        and SAM 2 model (made on first use; remade when any of them or the labels change, and
        after :meth:`undo`). ``tracking_options`` are its options."""
        if self._tracker is None:
            self._use("labels", "model")
            from napari_sam.volume.parts import is_sam2
            from napari_sam.volume.tracking import VolumeTracker

            if not is_sam2(self.model):
                raise ValueError(
                    "tracking needs a SAM 2 model (e.g. sam2.1_hiera_tiny or medsam2); with a "
                    "SAM 1 model use segment_slice and propagate"
                )
            self._tracker = VolumeTracker(self.model, self.cache, **self.tracking_options)
        return self._tracker

    def track_iter(
        self,
        slice: int,
        *,
        points: Any = None,
        labels: Any = None,
        box: Any = None,
        mask: Any = None,
        obj_id: int | None = None,
        mode: Mode = "keep",
        cancel: Any = None,
    ) -> Iterator[Any]:
        """Prompt an object on a slice and track it through the volume (SAM 2 models).

        The slice is segmented from the prompt and written, then the object is tracked up and
        down, each slice written before it is yielded. A prompt on a slice the object was
        already tracked to is a correction: only the slices after it (in the direction it was
        reached) are tracked again. Several objects: call again with another ``obj_id``;
        every prompted slice of an object stays in its memory.

        Parameters
        ----------
        slice : int
            Slice along the session's axis.
        points : (N, 2) array-like, optional
            ``(x, y)`` = (column, row) pixels.
        labels : (N,) array-like, optional
            1 foreground, 0 background; default all foreground.
        box : [x0, y0, x1, y1], optional
        mask : (H, W) bool array, optional
            The object drawn on the slice (instead of points and box).
        obj_id : int, optional
            The object (label id); default a new one (:meth:`next_label_id`).
        mode : {"keep", "overwrite"}
            Overlap rule with other objects.
        cancel : threading.Event or callable, optional
            Checked before each slice; a stopped run resumes at the next call.

        Yields
        ------
        TrackStep
            First the prompted slice (``direction`` 0), then one per tracked slice, with
            progress ``done``/``total``. The whole run is one undo step.
        """
        tracker = self.tracker
        index = self._check_index(slice)
        label = self._label(obj_id)
        if points is not None:
            points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
            if labels is None:
                labels = np.ones(len(points), dtype=np.int64)
        with self._writer().undo_step():
            tracker.add_prompt(index, label, points=points, labels=labels, box=box, mask=mask)
            first = tracker.result(index)
            answer = first.masks_by_id()[label]
            self._write(index, {label: answer}, mode, True)
            if answer.any():
                self.annotate(label, index)
            yield first
            for step in tracker.track_iter(cancel):
                masks = {o: m for o, m in step.masks_by_id().items() if o in step.updated}
                self._write(step.slice, masks, mode, True)
                yield step

    def track(self, slice: int, **prompt: Any) -> int:
        """Run :meth:`track_iter` to the end; returns the number of slices written."""
        count = 0
        for _ in self.track_iter(slice, **prompt):
            count += 1
        return count

    def segment_everything_iter(self, index: int) -> Iterator[str]:
        """Generator: every object SAM finds on slice ``index`` (nothing written); yields
        progress lines, returns an ``(H, W)`` int32 label image (write it with
        :meth:`add_objects`)."""
        self._use("model")
        index = self._check_index(index)
        return (yield from self.parts.segment_everything(self.cache, self.model, index))

    # -- embeddings and files ------------------------------------------------------------------

    def precompute_iter(
        self, indices: Iterable[int] | None = None, cancel: Cancel = None
    ) -> Iterator[int]:
        """Compute (or find) slice embeddings ahead of time; yields each slice index."""
        self._use("model")
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

        self._use("labels")
        return write_labels(
            path,
            self._writer().labels,
            self.metadata,
            scale=self.scale,
            translate=self.translate,
            overwrite=overwrite,
        )


def _check_axis(axis: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer) or not -3 <= axis < 3:
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    return int(axis) % 3


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
    if not isinstance(model, str | os.PathLike):  # a model object (or a test's stand-in)
        if checkpoint is not None:
            raise ValueError("checkpoint= is for a model given by name, not a model object")
        return model
    from napari_sam.weights import load_model

    return load_model(model, checkpoint=checkpoint, device=device)


def _model_source(model: Any, checkpoint: Any, device: str, precision: str | None) -> Any:
    """What cluster workers are given to load the same model (None for a model object)."""
    if not isinstance(model, str | os.PathLike):
        return None
    from napari_sam.cluster.tasks import ModelSource  # dask-free

    return ModelSource(
        str(model), None if checkpoint is None else str(checkpoint), device, precision
    )


def _progress_bar(enabled: bool, desc: str, **kwargs: Any):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=desc, **kwargs)

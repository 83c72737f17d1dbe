"""The widget's only doorway into the engine (models, weights, windows, caches, propagation).

Every call the napari widget makes into :mod:`napari_sam` goes through one :class:`Backend`
object, so renamed engine functions are reconnected here and nowhere else, and tests can hand
the widget a backend with a fake model or a slow encoder. Nothing here touches Qt or napari;
the widget calls the heavy methods (``load_model``, ``make_cache``, ``embed``, ``predict``,
``propagate``) from worker threads only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_sam._napari.prompt_layers import SlicePrompts

__all__ = ["Backend", "ModelOption", "Step", "WindowOption"]

# Order of preference for the model preselected when several are cached: accuracy per second
# on a laptop CPU (vit_h takes a minute per slice there).
_PREFERRED = ("vit_b", "vit_t", "vit_l", "vit_h", "medsam_vit_b")


@dataclass(frozen=True)
class ModelOption:
    """One entry of the model chooser."""

    source: Any  # registry name, checkpoint path, or a model object
    label: str
    cached: bool
    downloadable: bool
    size_bytes: int | None = None


@dataclass(frozen=True)
class WindowOption:
    """One entry of the intensity-window chooser."""

    label: str
    mode: str


@dataclass(frozen=True)
class Step:
    """One propagated slice: ``masks`` maps label id -> 2D bool mask of slice ``index``."""

    index: int
    masks: dict[int, np.ndarray]
    done: int
    total: int


def _megabytes(n: int | None) -> str:
    return "unknown size" if n is None else f"{n / 1e6:,.0f} MB"


class Backend:
    """Default bindings to the engine modules (imported lazily: napari reads the manifest
    without importing torch).

    Attributes
    ----------
    everything_options : dict
        Keyword arguments of the automatic mask generator used by "Segment everything"
        (``points_per_side``, ``pred_iou_thresh``, ...); empty means segment_anything's
        defaults.
    """

    def __init__(self) -> None:
        self.everything_options: dict[str, Any] = {}

    # -- models and weights -------------------------------------------------------------------

    def model_options(self) -> list[ModelOption]:
        """Registry models with their status ("cached" / "will download N MB, licence")."""
        from napari_sam import weights
        from napari_sam.registry import MODELS

        options = []
        for name in sorted(MODELS, key=lambda n: _PREFERRED.index(n) if n in _PREFERRED else 99):
            spec = MODELS[name]
            if spec.test_fixture:
                continue  # never offered: it knows only synthetic shapes
            cached = weights.is_cached(name)
            if cached:
                status = "cached"
            elif spec.downloadable:
                status = f"will download {_megabytes(spec.size_bytes)}, {spec.license}"
            else:
                status = "supply the file (Checkpoint…)"
            options.append(
                ModelOption(name, f"{name} — {status}", cached, spec.downloadable, spec.size_bytes)
            )
        return options

    def download(
        self,
        name: str,
        progress_callback: Callable[[int, int | None], None],
        cancel: Callable[[], bool],
    ) -> Path:
        from napari_sam import weights

        return weights.download(
            name, progress=False, progress_callback=progress_callback, cancel=cancel
        )

    def is_cancelled_error(self, exc: BaseException) -> bool:
        from napari_sam import weights

        return isinstance(exc, weights.DownloadCancelled)

    def devices(self) -> list[str]:
        import torch

        found = ["auto", "cpu"]
        if torch.cuda.is_available():
            found.append("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            found.append("mps")
        return found

    def speeds(self) -> list[tuple[str, str]]:
        """(label, precision) choices; the first is the default."""
        from napari_sam.speed import capabilities

        found = [("Fast", "auto"), ("Exact", "exact")]
        if capabilities("cpu").int8:
            found.append(("int8 (approximate)", "int8"))
        return found

    def load_model(self, source: Any, device: str, precision: str = "exact"):
        """A registry name (not downloaded here: the widget asks first), a checkpoint path, or
        an already built model; run at ``precision`` (see :func:`napari_sam.speed.with_precision`).
        """
        from napari_sam import weights
        from napari_sam.speed import is_fast, with_precision

        if not isinstance(source, (str, Path)):
            if is_fast(source):  # already made fast by its owner: used as is
                return source
            return with_precision(source, precision)
        model = weights.load_model(source, device=device, download=False)
        return with_precision(model, precision)

    def model_name(self, model) -> str:
        spec = getattr(model, "spec", None)
        return getattr(spec, "name", type(model).__name__)

    # -- intensity ----------------------------------------------------------------------------

    def window_options(self) -> list[WindowOption]:
        try:
            from napari_sam.intensity import CT_PRESETS
        except ImportError:  # pragma: no cover - the intensity module is part of the package
            presets = {}
        else:
            presets = CT_PRESETS
        options = [WindowOption("Auto (CT soft tissue or MR percentiles)", "auto")]
        for name, value in presets.items():
            width, level = (value.width, value.level) if hasattr(value, "width") else value
            title = name.replace("_", " ")
            options.append(WindowOption(f"CT {title} ({width:g}/{level:g})", name))
        options += [
            WindowOption("MR percentiles 0.5–99.5 %", "percentile"),
            WindowOption("Min–max of the volume", "minmax"),
            WindowOption("napari contrast limits", "contrast_limits"),
        ]
        return options

    def make_window(self, volume, mode: str, contrast_limits=None, rgb: bool = False):
        """One window for the whole volume (None for 8-bit RGB, which SAM takes as is)."""
        if rgb and np.asarray(volume[:1]).dtype == np.uint8:
            return None
        from napari_sam.intensity import make_window

        if mode == "contrast_limits":
            low, high = contrast_limits
            return make_window(volume, "contrast_limits", limits=(float(low), float(high)))
        return make_window(volume, mode)

    # -- embeddings and prompts ---------------------------------------------------------------

    def cache_dir(self) -> Path | None:
        from napari_sam.volume.embeddings import default_cache_dir

        return default_cache_dir()

    def make_cache(self, model, volume, axis: int, window, cache_dir: Path | None):
        from napari_sam.volume.embeddings import EmbeddingCache

        return EmbeddingCache(model, volume, axis=axis, window=window, cache_dir=cache_dir)

    def make_predictor(self, model):
        from napari_sam.predictor import SamPredictor

        return SamPredictor(model)

    def is_encoded(self, cache, index: int) -> bool:
        return cache.has(index)

    def embed(self, cache, predictor, index: int) -> None:
        """Put slice ``index``'s embedding into the predictor (encoding it if needed)."""
        embedding, original_size, input_size = cache.get(index)
        predictor.set_image_embedding(embedding, original_size, input_size)

    def predict(
        self,
        predictor,
        prompts: SlicePrompts,
        mask_input: np.ndarray | None,
        multimask: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks (C x H x W bool), predicted IoUs (C) and low-res logits (C x L x L)."""
        if mask_input is None and prompts.mask is not None:
            from napari_sam.prompts import mask_to_mask_input

            mask_input = mask_to_mask_input(
                prompts.mask, predictor.transform, predictor.original_size
            )
        has_points = len(prompts.points) > 0
        masks, ious, low_res = predictor.predict(
            point_coords=prompts.points if has_points else None,
            point_labels=prompts.labels if has_points else None,
            box=prompts.box,
            mask_input=mask_input,
            multimask_output=multimask,
        )
        return np.asarray(masks), np.asarray(ious), np.asarray(low_res)

    def segment_everything(self, cache, model, index: int) -> Iterator[str]:
        """Generator: SAM's automatic masks on slice ``index`` (a grid of point prompts on the
        cached embedding); yields progress lines, returns an ``H x W`` int32 label image with
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

    # -- volumes ------------------------------------------------------------------------------

    def propagate(
        self,
        cache,
        predictor,
        seeds: dict[int, dict[int, np.ndarray]],
        *,
        slice_range: tuple[int, int] | None,
    ) -> Iterator[Step]:
        """Slice-by-slice propagation from the seed masks along the cache's axis; one
        :class:`Step` per finished slice. ``slice_range`` is inclusive ``(first, last)``."""
        from napari_sam.volume.propagation import propagate

        span = None if slice_range is None else (slice_range[0], slice_range[1] + 1)
        steps = propagate(cache, predictor, seeds, slice_range=span)
        try:
            for step in steps:
                yield Step(
                    int(step.index),
                    {int(k): np.asarray(v, bool) for k, v in step.masks.items()},
                    int(step.done),
                    int(step.total),
                )
        finally:
            steps.close()

    def make_session(
        self, model, volume, *, axis: int, window, labels: np.ndarray, cache, geometry: dict
    ):
        """The scripting session for napari's console. It writes into ``labels`` (a view of
        the widget's labels layer), shares the widget's embedding cache and saves in the
        image's geometry (``geometry``: ``scale``, ``translate``, ``metadata``)."""
        from napari_sam.volume.session import VolumeSession

        session = VolumeSession(
            volume,
            model,
            window=window,
            axis=axis,
            labels=labels,
            cache_dir=self.cache_dir(),
            **geometry,
        )
        if cache is not None and cache.axis == session.axis and cache.window == session.window:
            session.cache = cache  # one set of embeddings for the widget and the console
        return session

"""What the widget's background jobs do, without Qt: prepare the engine, segment, propagate.

Each job is a generator run in a napari worker thread. It yields status strings (shown in the
widget), an :class:`Adopt` carrying the engine it built (kept by the main thread for the next
job) and, when propagating, one :class:`~._backend.Step` per finished slice; a segmentation job
returns its :class:`Result`. The jobs touch no layer: what they need from the viewer is
snapshotted on the main thread into a :class:`Setup` or a :class:`Request` first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_sam._napari._backend import Backend
from napari_sam._napari._slicing import SliceFrame
from napari_sam._napari.prompt_layers import SlicePrompts

__all__ = [
    "Adopt",
    "Engine",
    "Request",
    "Result",
    "Setup",
    "everything_job",
    "prepare",
    "propagate_job",
    "seed_masks",
    "segment_job",
]


@dataclass(frozen=True)
class Setup:
    """What the engine needs for the widget's current choices.

    ``model_key`` and ``cache_key`` name everything the model and the embedding cache depend on,
    so a job rebuilds only what changed.
    """

    model_source: Any
    device: str
    precision: str
    volume: Any
    engine_axis: int
    window_mode: str
    contrast_limits: tuple[float, float] | None
    rgb: bool
    cache_dir: Path | None
    model_key: tuple
    cache_key: tuple


@dataclass(frozen=True)
class Engine:
    """A loaded model with its predictor, and the embedding cache of one volume."""

    model_key: tuple
    model: Any
    predictor: Any
    cache_key: tuple | None = None
    cache: Any = None
    window: Any = None


@dataclass
class Request:
    """One run of SAM on the prompts of one slice."""

    setup: Setup
    frame: SliceFrame
    index: int
    prompts: SlicePrompts
    mask_input: np.ndarray | None
    multimask: bool


@dataclass
class Result:
    """SAM's answer for a :class:`Request`; ``chosen`` is the mask on show."""

    frame: SliceFrame
    index: int
    prompts: SlicePrompts
    masks: np.ndarray  # C x H x W bool
    ious: np.ndarray  # C
    low_res: np.ndarray  # C x L x L logits
    chosen: int = 0

    @property
    def mask(self) -> np.ndarray:
        return self.masks[self.chosen]


@dataclass
class Adopt:
    """Yielded by a job to hand the engine it built to the main thread early."""

    engine: Engine


def prepare(backend: Backend, setup: Setup, engine: Engine | None):
    """Generator: load the model and open the embedding cache when they changed; returns the
    engine to use."""
    if engine is None or engine.model_key != setup.model_key:
        yield "Loading the model…"
        model = backend.load_model(setup.model_source, setup.device, setup.precision)
        engine = Engine(setup.model_key, model, backend.make_predictor(model))
    if engine.cache_key != setup.cache_key:
        yield "Preparing the intensity window…"
        window = backend.make_window(
            setup.volume, setup.window_mode, setup.contrast_limits, setup.rgb
        )
        cache = backend.make_cache(
            engine.model, setup.volume, setup.engine_axis, window, setup.cache_dir
        )
        engine = replace(engine, cache_key=setup.cache_key, cache=cache, window=window)
    return engine


def segment_job(backend: Backend, request: Request, engine: Engine | None):
    """Generator: encode the slice if needed (saying so) and decode the prompts."""
    engine = yield from prepare(backend, request.setup, engine)
    yield Adopt(engine)
    if not backend.is_encoded(engine.cache, request.index):
        yield f"Encoding slice {request.index}…"
    backend.embed(engine.cache, engine.predictor, request.index)
    masks, ious, low_res = backend.predict(
        engine.predictor, request.prompts, request.mask_input, request.multimask
    )
    chosen = int(np.argmax(ious))  # the mask SAM rates best
    return Result(request.frame, request.index, request.prompts, masks, ious, low_res, chosen)


def everything_job(backend: Backend, setup: Setup, engine: Engine | None, index: int):
    """Generator: all objects SAM finds on one slice; returns ``(index, label image)``."""
    engine = yield from prepare(backend, setup, engine)
    yield Adopt(engine)
    if not backend.is_encoded(engine.cache, index):
        yield f"Encoding slice {index}…"
    labels = yield from backend.segment_everything(engine.cache, engine.model, index)
    return index, labels


def propagate_job(
    backend: Backend,
    setup: Setup,
    engine: Engine | None,
    seed_source: tuple,
    slice_range: tuple[int, int],
):
    """Generator: read the seeds, then yield one ``Step`` per propagated slice.

    ``seed_source`` holds the arguments of :func:`seed_masks`; reading seeds scans the whole
    labels volume, which is why it happens here and not on the main thread.
    """
    seeds = seed_masks(*seed_source)
    if not seeds:
        hint = ", or paint the selected label on a slice" if seed_source[3] else ""
        raise ValueError(f"Nothing to propagate: commit a mask (C) on a slice first{hint}.")
    engine = yield from prepare(backend, setup, engine)
    yield Adopt(engine)
    n = sum(len(m) for m in seeds.values())
    yield f"Propagating {len(seeds)} object(s) from {n} seed slice(s)…"
    yield from backend.propagate(engine.cache, engine.predictor, seeds, slice_range=slice_range)


def seed_masks(
    labels: np.ndarray,
    frame: SliceFrame,
    committed: dict[int, list[int]],
    selected: int | None = None,
) -> dict[int, dict[int, np.ndarray]]:
    """The seeds of a propagation: label id -> {slice -> mask}, read from the labels volume.

    Parameters
    ----------
    labels : ndarray
        The target labels layer's data (so hand edits of committed slices count).
    frame : SliceFrame
        Which slices.
    committed : dict
        Label id -> slices where the widget committed that label.
    selected : int, optional
        Propagate only this label; if it was never committed, every slice where it is present
        (painted by hand) is a seed.
    """
    if selected is not None:
        committed = {selected: committed.get(selected, [])}
        if not committed[selected] and frame.axis is not None:
            volume = frame.volume(labels)
            axes = tuple(a for a in range(volume.ndim) if a != frame.engine_axis)
            present = np.flatnonzero((volume == selected).any(axis=axes))
            committed = {selected: present.tolist()}
    seeds: dict[int, dict[int, np.ndarray]] = {}
    for label, indices in committed.items():
        masks = {i: np.array(frame.slice_of(labels, i) == label) for i in indices}
        masks = {i: m for i, m in masks.items() if m.any()}
        if masks:
            seeds[label] = masks
    return seeds

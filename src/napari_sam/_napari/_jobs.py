"""What the widget's background jobs do, without Qt: bring the session up to date, segment,
propagate.

Each job is a generator run in a napari worker thread on the widget's one
:class:`~napari_sam.volume.session.VolumeSession`. It yields status strings (shown in the
widget) and, when propagating, one :class:`~napari_sam.volume.propagation.Step` per finished
slice, which the main thread writes through the session; a segmentation job returns its
:class:`Result`. The jobs touch no layer: what they need from the viewer is snapshotted on the
main thread into a :class:`Setup` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sam._napari._backend import Backend
from napari_sam._napari._slicing import SliceFrame
from napari_sam.prompts import Prompts

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Generator

    from napari_sam.volume.session import VolumeSession

__all__ = [
    "Prepared",
    "Result",
    "Setup",
    "boxes_job",
    "detect_job",
    "everything_job",
    "prepare",
    "propagate_job",
    "run_now",
    "segment_job",
]


@dataclass(frozen=True)
class Setup:
    """What the session needs for the widget's current choices.

    ``model_key`` names everything the model depends on and ``target_key`` everything the
    volume and its embeddings depend on (image data, slicing, window), so a job redoes only
    what changed. ``writer`` is the target labels layer's writer (None: no layer yet, or one
    of another shape).
    """

    frame: SliceFrame
    model_source: Any
    device: str
    precision: str
    volume: Any
    engine_axis: int
    window_mode: str
    contrast_limits: tuple[float, float] | None
    rgb: bool
    geometry: dict
    writer: Any
    labels_key: Any
    model_key: tuple
    target_key: tuple
    encoding: str = "local"
    encoding_source: Any = None
    encoding_timeout: float = 60.0
    on_encoding_status: Any = None

    @property
    def encoding_key(self) -> tuple:
        """What the session's encoder depends on: the address and the model."""
        return (self.encoding, self.model_key)


@dataclass
class Prepared:
    """Which choices the session was last brought to (None: not yet)."""

    model_key: tuple | None = None
    target_key: tuple | None = None
    encoding_key: tuple | None = None


@dataclass
class Result:
    """SAM's answer for the prompts of one slice; ``chosen`` is the mask on show."""

    frame: SliceFrame
    index: int
    prompts: Prompts
    masks: np.ndarray  # C x H x W bool
    ious: np.ndarray  # C
    low_res: np.ndarray  # C x L x L logits
    chosen: int = 0

    @property
    def mask(self) -> np.ndarray:
        return self.masks[self.chosen]


def prepare(
    backend: Backend,
    session: VolumeSession,
    setup: Setup,
    prepared: Prepared,
    *,
    model: bool = True,
) -> Generator[str, None, None]:
    """Generator: bring ``session`` to ``setup`` (load the model when it changed, re-target the
    volume when the image, slicing or window changed); ``model=False`` skips the model."""
    if model and prepared.model_key != setup.model_key:
        yield "Loading the model…"
        prepared.model_key = None
        session.set_model(backend.load_model(setup.model_source, setup.device, setup.precision))
        prepared.model_key = setup.model_key
    if model and prepared.encoding_key != setup.encoding_key:
        from napari_sam.volume.parts import is_sam2

        prepared.encoding_key = None
        encoding = setup.encoding
        if encoding != "local" and is_sam2(session.model):
            yield "SAM 2 models encode on this machine (remote encoding is for SAM 1 models)."
            encoding = "local"
        elif encoding != "local":
            yield f"Connecting to {encoding} for encoding…"
        session.set_encoding(
            encoding,
            source=setup.encoding_source,
            timeout=setup.encoding_timeout,
            on_status=setup.on_encoding_status,
        )
        prepared.encoding_key = setup.encoding_key
    if prepared.target_key != setup.target_key:
        yield "Preparing the intensity window…"
        prepared.target_key = None
        window = backend.make_window(
            setup.volume, setup.window_mode, setup.contrast_limits, setup.rgb
        )
        session.set_volume(
            setup.volume,
            axis=setup.engine_axis,
            window=window,
            writer=setup.writer,
            labels_key=setup.labels_key,
            **setup.geometry,
        )
        prepared.target_key = setup.target_key
    elif setup.writer is not None and session.writer is not setup.writer:
        session.set_labels(writer=setup.writer, key=setup.labels_key)


def run_now(job: Generator) -> Any:
    """Run a job generator to its end here (napari's console runs on the main thread)."""
    while True:
        try:
            next(job)
        except StopIteration as done:
            return done.value


def segment_job(
    backend: Backend,
    session: VolumeSession,
    setup: Setup,
    prepared: Prepared,
    index: int,
    prompts: Prompts,
    mask_input: np.ndarray | None,
    multimask: bool,
) -> Generator[str, None, Result]:
    """Generator: encode the slice if needed (saying so) and decode the prompts."""
    yield from prepare(backend, session, setup, prepared)
    if not session.is_encoded(index):
        yield f"Encoding slice {index}…"
    has_points = len(prompts.points) > 0
    result = session.preview(
        index,
        points=prompts.points if has_points else None,
        point_labels=prompts.labels if has_points else None,
        box=prompts.box,
        mask=prompts.mask,
        mask_input=mask_input,
        multimask=multimask,
    )
    chosen = int(np.argmax(result.scores))  # the mask SAM rates best
    return Result(
        setup.frame, index, prompts, result.masks, result.scores, result.all_logits, chosen
    )


def everything_job(
    backend: Backend, session: VolumeSession, setup: Setup, prepared: Prepared, index: int
) -> Generator[str, None, tuple[int, np.ndarray]]:
    """Generator: all objects SAM finds on one slice; returns ``(index, label image)``."""
    yield from prepare(backend, session, setup, prepared)
    if not session.is_encoded(index):
        yield f"Encoding slice {index}…"
    labels = yield from session.segment_everything_iter(index)
    return index, labels


def propagate_job(
    backend: Backend,
    session: VolumeSession,
    setup: Setup,
    prepared: Prepared,
    label_ids: list[int] | None,
    slice_range: tuple[int, int],
) -> Generator[Any, None, None]:
    """Generator: read the seeds, then yield one ``Step`` per propagated slice (unwritten).

    Reading seeds scans the labels volume, which is why it happens here and not on the main
    thread. ``slice_range`` is ``(start, stop)``.
    """
    yield from prepare(backend, session, setup, prepared)
    seeds = session.seeds(label_ids)
    if not seeds:
        hint = ", or paint the selected label on a slice" if label_ids else ""
        raise ValueError(f"Nothing to propagate: commit a mask (C) on a slice first{hint}.")
    n = sum(len(m) for m in seeds.values())
    yield f"Propagating {len(seeds)} object(s) from {n} seed slice(s)…"
    yield from session.propagation_steps(seeds=seeds, slice_range=slice_range)


def detect_job(
    backend: Backend,
    session: VolumeSession,
    setup: Setup,
    prepared: Prepared,
    index: int,
    phrases: list[str],
    detector: str,
    thresholds: tuple[float, float],
) -> Generator[str, None, tuple[int, Any]]:
    """Generator: a text detector's boxes on slice ``index``; returns ``(index, Detections)``.

    The detector sees the 8-bit slice SAM sees (the session's window); it is loaded once per
    (source, device) and kept on the backend.
    """
    yield from prepare(backend, session, setup, prepared)
    image = session.slice_image(index)
    if not backend.has_detector(detector, setup.device):
        yield f"Loading the text detector {detector}…"
    found = backend.detector(detector, setup.device)
    yield f"Finding {' '.join(phrases)} on slice {index}…"
    box_threshold, text_threshold = thresholds
    detections = found.detect(
        image, phrases, box_threshold=box_threshold, text_threshold=text_threshold
    )
    yield f"Found {len(detections)} box(es)."  # a Cancel pressed meanwhile stops here
    return index, detections


def boxes_job(
    backend: Backend,
    session: VolumeSession,
    setup: Setup,
    prepared: Prepared,
    index: int,
    objects: list[Prompts],
) -> Generator[str, None, tuple[int, np.ndarray]]:
    """Generator: SAM's single mask for each box on slice ``index``; returns ``(index, label
    image)`` with object ``k`` as ``k + 1`` (an earlier object keeps contested pixels)."""
    yield from prepare(backend, session, setup, prepared)
    if not session.is_encoded(index):
        yield f"Encoding slice {index}…"
    found = np.zeros(session.slice_shape, dtype=np.int32)
    for k, prompts in enumerate(objects, 1):
        yield f"Segmenting box {k} of {len(objects)} on slice {index}…"
        result = session.preview(index, box=prompts.box, mask=prompts.mask, multimask=False)
        found[(found == 0) & result.masks[0]] = k
    return index, found

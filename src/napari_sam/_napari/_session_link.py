"""Keeping the widget's one VolumeSession on the widget's choices (image, slicing, window,
model, target labels layer)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from napari_sam._napari._jobs import Prepared, Setup, prepare, run_now
from napari_sam._napari._layer_writer import LayerWriter
from napari_sam._napari._slicing import SliceFrame
from napari_sam.volume.session import VolumeSession

__all__ = ["SessionLink"]


class SessionLink:
    """Mixin of :class:`~.widget.SamWidget`: snapshots the choices into a :class:`Setup` for a
    job, hands the session a writer on the target labels layer, and brings the session up to
    date on the spot when napari's console calls it (``session.before_use``)."""

    def _init_link(self) -> None:
        self._prepared = Prepared()
        self._writer: LayerWriter | None = None
        self.session.before_use = self._before_use

    @staticmethod
    def _labels_key(labels: Any, frame: SliceFrame) -> tuple:
        # The session's objects belong to one labels layer and one held time point.
        return (id(labels), frame.fixed)

    def _writer_for(self, labels: Any, frame: SliceFrame) -> LayerWriter:
        writer = self._writer
        if writer is None or writer.layer is not labels or writer.frame != frame:
            writer = self._writer = LayerWriter(labels, frame)
        return writer

    def attach_labels(self, labels: Any, frame: SliceFrame) -> None:
        """Make the session write into the labels layer ``labels`` (shape = the image's)."""
        writer = self._writer_for(labels, frame)
        if self.session.writer is not writer:
            self.session.set_labels(writer=writer, key=self._labels_key(labels, frame))

    def _setup(self, frame: SliceFrame) -> Setup:
        image = self.image_layer
        source = self.model_source
        device = self.device_combo.currentData() or "auto"
        precision = self.speed_combo.currentData() or "auto"
        mode = self.window_combo.currentData() or "auto"
        limits = tuple(map(float, image.contrast_limits)) if mode == "contrast_limits" else None
        data = image.data[0] if image.multiscale else image.data
        model_key = (source if isinstance(source, (str, Path)) else id(source), device, precision)
        labels = self.labels_layer
        writer = None
        if labels is not None and tuple(labels.data.shape) == frame.shape:
            writer = self._writer_for(labels, frame)
        return Setup(
            frame=frame,
            model_source=source,
            device=device,
            precision=precision,
            volume=frame.volume(data),
            engine_axis=frame.engine_axis,
            window_mode=mode,
            contrast_limits=limits,
            rgb=frame.rgb,
            geometry=self.session_geometry(frame),
            writer=writer,
            labels_key=None if labels is None else self._labels_key(labels, frame),
            model_key=model_key,
            target_key=(id(data), frame.axis, frame.fixed, mode, limits),
            **self._encoding_setup(source, device),
        )

    def _invalidate(self, model: bool = False) -> None:
        """Choices changed: the next job re-targets the session (and reloads the model if
        ``model``); a preview on show no longer holds."""
        self._prepared.target_key = None
        if model:
            self._prepared.model_key = None
        self._set_result(None)
        if self._prompts_exist():
            self.request_segment()

    def ready_session(self, model: bool = True) -> VolumeSession:
        """The session on the current choices, prepared here and now (blocks: for napari's
        console, where the user runs code on the main thread anyway)."""
        run_now(
            prepare(
                self.backend, self.session, self._setup(self.frame()), self._prepared, model=model
            )
        )
        return self.session

    def _before_use(self, session: VolumeSession, needs: set[str]) -> None:
        # Jobs run in worker threads on an already prepared session; the widget's own writes
        # happen while a job runs or right after a preview of the current choices.
        if threading.current_thread() is not threading.main_thread() or self.jobs.busy:
            return
        # The console's session is on the widget's model too, once there is one to load.
        problem = self._model_ready_message()
        if "model" in needs and problem:
            raise ValueError(problem)
        self.ready_session(model=problem is None)
        if "labels" in needs:
            frame = self.frame()
            labels = self.ensure_labels_layer()
            if tuple(labels.data.shape) != frame.shape:
                raise ValueError(
                    f"the labels layer {labels.name!r} has shape {labels.data.shape}, the image "
                    f"{frame.shape}: choose a matching labels layer"
                )
            self.attach_labels(labels, frame)

"""The "Segment Anything" dock widget: prompts in, masks out, volumes propagated.

The widget is a thin shell around one :class:`~napari_sam.volume.session.VolumeSession`
(:attr:`SamWidget.session`, also napari's console ``sam_session``): it reads prompts from two
layers (:mod:`.prompt_layers`), asks the session for a preview of the current slice, shows it
in a working labels layer and commits it into the target labels layer; the session writes
through a :class:`~._layer_writer.LayerWriter`, so every commit and propagation is one step of
napari's undo. The behaviour is split by concept into mixins: :mod:`._models` (model chooser,
downloads), :mod:`._preview` (prompts -> preview), :mod:`._commit` (commit, propagation,
segment everything), :mod:`._framing` (which slices) and :mod:`._session_link` (the session
kept on the widget's choices); the controls and their layout are :mod:`._panel`.

Threads: every model call (loading, encoding a slice, decoding prompts, propagating) runs in a
napari worker thread, one job at a time; the main thread only snapshots prompts, draws masks and
writes slices, each slot wrapped by a :class:`~._workers.SlotTimer`. Changing prompts while a
job runs re-runs SAM once the job ends.

Keys (on the viewer and on the prompt layers): T toggles the sign of new points, N shows the
next of SAM's three masks, C commits, Shift+C clears the prompts, Shift+S propagates.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

import napari
import numpy as np
from qtpy.QtCore import QEvent
from qtpy.QtWidgets import QComboBox

from napari_sam._napari._backend import Backend
from napari_sam._napari._commit import CommitAndPropagate
from napari_sam._napari._encoding import RemoteEncoding
from napari_sam._napari._framing import Framing, spatial_shape
from napari_sam._napari._models import ModelChooser
from napari_sam._napari._panel import SamPanel
from napari_sam._napari._preview import PromptPreview
from napari_sam._napari._session_link import SessionLink
from napari_sam._napari._text import TextPrompts
from napari_sam._napari._workers import JobRunner, SlotTimer
from napari_sam._napari.prompt_layers import BoxPrompts, PointPrompts, PromptLayer
from napari_sam.volume.propagation import Step
from napari_sam.volume.session import VolumeSession

__all__ = ["KEYS", "SamWidget"]

log = logging.getLogger(__name__)

#: key -> widget method; bound on the viewer and on the prompt layers (those take precedence
#: over layer defaults such as the Shapes layer's T = path mode).
KEYS = {
    "T": "toggle_sign",
    "N": "next_mask",
    "C": "commit",
    "Shift-C": "clear_prompts",
    "Shift-S": "propagate",
}
NEW_LABELS = "New labels layer"
PREVIEW_NAME = "SAM preview"
PREVIEW_COLOR = "cyan"


class SamWidget(
    ModelChooser,
    PromptPreview,
    CommitAndPropagate,
    TextPrompts,
    RemoteEncoding,
    Framing,
    SessionLink,
    SamPanel,
):
    """Segment Anything for napari images and volumes.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        Injected by napari.
    backend : Backend, optional
        The engine bindings and the session's parts (tests pass fakes or slow encoders).
    """

    def __init__(self, viewer: napari.viewer.Viewer, backend: Backend | None = None) -> None:
        super().__init__()
        # napari hands plugins a proxy that wraps every layer it returns; the widget compares
        # layers by identity (its own prompt layers, the chosen image), so it keeps the viewer.
        self.viewer = getattr(viewer, "__wrapped__", viewer)
        self.backend = backend or Backend()
        self.session = VolumeSession(
            model=None, cache_dir=self.backend.cache_dir(), parts=self.backend
        )
        self.timer = SlotTimer()
        self.jobs = JobRunner(self.timer)
        self.downloads = JobRunner(self.timer)
        self._job_error: BaseException | None = None
        self._points: PointPrompts | None = None
        self._boxes: BoxPrompts | None = None
        self._preview = None
        self._connections: list[tuple[Any, Any]] = []  # (viewer-side emitter, callback)
        self._prompt_objects: list[PromptLayer] = []
        self._was_docked = False
        self._init_preview()
        self._init_commit()
        self._init_link()

        for name in self.backend.devices():
            self.device_combo.addItem(name, name)
        for label, precision in self.backend.speeds():
            self.speed_combo.addItem(label, precision)
        for option in self.backend.window_options():
            self.window_combo.addItem(option.label, option.mode)
        self._init_models()
        self._init_text()
        self._init_encoding()
        self._connect()
        self._release = self._releaser()
        self.destroyed.connect(self._release)
        self._refresh_layer_choices()
        self._bind_keys(self.viewer)
        self.viewer.update_console({"sam_widget": self, "sam_session": self.session})

    @property
    def console_session(self) -> VolumeSession:
        """napari's console ``sam_session``: the widget's own :attr:`session`."""
        return self.session

    @property
    def last_error(self) -> BaseException | None:
        """The error that ended the last job, or None."""
        return self._job_error

    # ------------------------------------------------------------------------------------------
    # UI

    def _connect(self) -> None:
        t = self.timer.wrap
        self.image_combo.currentIndexChanged.connect(t(self._on_image_changed, "image"))
        self.model_combo.currentIndexChanged.connect(t(self._on_model_changed, "model"))
        self.device_combo.currentIndexChanged.connect(t(self._on_model_changed, "device"))
        self.speed_combo.currentIndexChanged.connect(t(self._on_model_changed, "speed"))
        self.window_combo.currentIndexChanged.connect(t(self._on_settings_changed, "window"))
        self.axis_combo.activated.connect(t(self._on_axis_chosen, "axis"))
        self.detector_combo.currentIndexChanged.connect(t(self._on_detector_changed, "detector"))
        self.text_edit.returnPressed.connect(t(self.find_boxes, "text"))
        self.encoding_edit.editingFinished.connect(t(self._on_encoding_changed, "encoding"))
        for button, method in (
            (self.checkpoint_button, self._choose_checkpoint),
            (self.download_button, self.download),
            (self.download_cancel_button, self._download_cancel.set),
            (self.sign_button, self.toggle_sign),
            (self.next_mask_button, self.next_mask),
            (self.clear_button, self.clear_prompts),
            (self.commit_button, self.commit),
            (self.propagate_button, self.propagate),
            (self.cancel_button, self.cancel),
            (self.everything_button, self.segment_everything),
            (self.all_boxes_button, self.segment_all_boxes),
            (self.find_boxes_button, self.find_boxes),
            (self.detector_folder_button, self._choose_detector_folder),
            (self.encoding_retry_button, self.retry_encoding),
        ):
            slot = t(method, f"button:{method.__name__}")
            button.clicked.connect(lambda _checked=False, slot=slot: slot())

        # Viewer events outlive the widget: each connection is recorded so that closing the
        # widget releases it (see _releaser).
        layers = self.viewer.layers.events
        self._listen(layers.inserted, t(self._refresh_layer_choices, "layers"))
        self._listen(layers.removed, t(self._on_layer_removed, "layers"))
        self._listen(self.viewer.dims.events.current_step, t(self._on_step, "step"))
        self._listen(self.viewer.dims.events.order, t(self._on_dims_order, "order"))

    def _listen(self, emitter, callback) -> None:
        emitter.connect(callback)
        self._connections.append((emitter, callback))

    def _releaser(self):
        """A function that detaches the widget from the viewer: stops jobs, disconnects
        events, unbinds keys. It holds no reference to the widget, so it still works while Qt
        destroys the widget (a closed dock widget is deleted, not just hidden)."""
        viewer, jobs, cancel_download = self.viewer, self.jobs, self._download_cancel
        connections, prompts, session = self._connections, self._prompt_objects, self.session

        def release(*_) -> None:
            jobs.cancel()
            cancel_download.set()
            with contextlib.suppress(Exception):
                session.set_encoding("local")  # closes a remote encoder's connection
            for emitter, callback in connections:
                with contextlib.suppress(Exception):
                    emitter.disconnect(callback)
            connections.clear()
            for prompt in prompts:
                with contextlib.suppress(Exception):
                    prompt.disconnect()
            prompts.clear()
            for key in KEYS:
                with contextlib.suppress(Exception):
                    viewer.bind_key(key, None)

        return release

    def _bind_keys(self, provider) -> None:
        for key, method in KEYS.items():
            provider.bind_key(key, self._key_handler(method), overwrite=True)

    def _key_handler(self, method: str):
        slot = self.timer.wrap(getattr(self, method), f"key:{method}")

        def handler(_viewer_or_layer) -> None:
            slot()

        handler.__name__ = method
        return handler

    def event(self, event) -> bool:
        # napari removes a closed dock widget by un-parenting it (it is not deleted while
        # key bindings still refer to it): that is when the widget lets go of the viewer.
        if event.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._was_docked = True
            elif self._was_docked:
                self._release()
        return super().event(event)

    def closeEvent(self, event) -> None:
        self.cleanup()
        super().closeEvent(event)

    def cleanup(self) -> None:
        """Detach from the viewer: stop jobs, disconnect events, release the keys (also done
        when Qt destroys the widget)."""
        self._release()

    def set_status(self, text: str, error: bool = False) -> None:
        note = getattr(self, "_status_note", "")  # e.g. a remote encoder's fallback
        if note and note != text:
            text = f"{text}\n{note}"
        self.status.setText(text)
        self.status.setStyleSheet("color: #ff6666;" if error else "")
        if error:
            log.warning(text)

    # -- jobs ---------------------------------------------------------------------------------

    def _start(self, name: str, job, *args, frame, on_done, on_return=None) -> None:
        """Run ``job(backend, session, setup, prepared, *args)`` in the background."""
        setup = self._setup(frame)
        self._busy(True)
        self._job_error = None
        self.jobs.start(
            name,
            job,
            self.backend,
            self.session,
            setup,
            self._prepared,
            *args,
            on_yield=self._on_job_message,
            on_return=on_return,
            on_error=self._on_job_error,
            on_done=on_done,
        )

    def _on_job_message(self, message) -> None:
        if isinstance(message, Step):
            self._write_step(message)
        else:
            self.set_status(str(message))

    def _on_job_error(self, exc: BaseException) -> None:
        self._job_error = exc
        # Our own checks raise ValueError/FileNotFoundError with a message meant for the user.
        user_error = isinstance(exc, (ValueError, FileNotFoundError))
        self.set_status(str(exc) if user_error else f"{type(exc).__name__}: {exc}", error=True)

    def _busy(self, busy: bool) -> None:
        if busy:
            self.progress.setRange(0, 0)  # indeterminate while encoding / decoding
        self.progress.setVisible(busy)
        self.cancel_button.setEnabled(busy)

    # ------------------------------------------------------------------------------------------
    # choices: image, model, labels, window

    @property
    def image_layer(self):
        """The chosen image layer, or None."""
        return self.image_combo.currentData()

    @property
    def labels_layer(self):
        """The target labels layer, or None while "new" is selected and none was created."""
        return self.labels_combo.currentData()

    @property
    def points_layer(self):
        """The widget's point prompts layer."""
        return None if self._points is None else self._points.layer

    @property
    def boxes_layer(self):
        """The widget's box (and ellipse, polygon) prompts layer."""
        return None if self._boxes is None else self._boxes.layer

    @property
    def preview_layer(self):
        """The working labels layer showing the mask on show."""
        return self._preview

    def _own_layers(self) -> list:
        return [x for x in (self.points_layer, self.boxes_layer, self._preview) if x is not None]

    def _refresh_layer_choices(self, event=None) -> None:
        from napari.layers import Image, Labels

        own = self._own_layers()
        images = [x for x in self.viewer.layers if isinstance(x, Image)]
        labels = [x for x in self.viewer.layers if isinstance(x, Labels) and x not in own]
        self._refill(self.image_combo, [(x.name, x) for x in images])
        current = self.labels_layer
        self._refill(self.labels_combo, [(NEW_LABELS, None)] + [(x.name, x) for x in labels])
        if current is None and self.labels_combo.currentData() is None:
            self._select_matching_labels()

    @staticmethod
    def _refill(combo: QComboBox, items: list[tuple[str, Any]]) -> None:
        current = combo.currentData()
        combo.blockSignals(True)
        combo.clear()
        for text, data in items:
            combo.addItem(text, data)
        index = next((i for i, (_, d) in enumerate(items) if d is current), 0)
        combo.setCurrentIndex(index)
        combo.blockSignals(False)
        if combo.currentData() is not current:
            combo.currentIndexChanged.emit(combo.currentIndex())

    def _select_matching_labels(self) -> None:
        image = self.image_layer
        if image is None:
            return
        shape = spatial_shape(image)
        for i in range(1, self.labels_combo.count()):
            layer = self.labels_combo.itemData(i)
            if layer is not None and tuple(layer.data.shape) == shape:
                self.labels_combo.setCurrentIndex(i)
                return

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        for prompt in [p for p in self._prompt_objects if p.layer is layer]:
            prompt.disconnect()
            self._prompt_objects.remove(prompt)
        if self._points is not None and layer is self._points.layer:
            self._points = None
        if self._boxes is not None and layer is self._boxes.layer:
            self._boxes = None
        if layer is self._preview:
            self._preview, self._preview_at = None, None
        self._refresh_layer_choices()

    def _on_model_changed(self, *_) -> None:
        self._update_download_button()
        self._invalidate(model=True)

    def _on_settings_changed(self, *_) -> None:
        self._invalidate()

    def _on_image_changed(self, *_) -> None:
        image = self.image_layer
        for emitter, callback in [c for c in self._connections if c[1] == self._on_contrast_limits]:
            emitter.disconnect(callback)
            self._connections.remove((emitter, callback))
        self._set_result(None)
        self._prepared.target_key = None
        if image is None:
            self.set_status("Open an image to start.")
            return
        self._listen(image.events.contrast_limits, self._on_contrast_limits)
        self._setup_layers(image)
        self._select_matching_labels()
        self._sync_axis_combo()
        self.set_status(f"Ready: {image.name}. Add points or boxes.")

    def _on_contrast_limits(self, event=None) -> None:
        if self.window_combo.currentData() == "contrast_limits":
            self._invalidate()

    # ------------------------------------------------------------------------------------------
    # layers the widget owns

    @staticmethod
    def _geometry(image) -> dict:
        return {"scale": image.scale, "translate": image.translate}

    def _setup_layers(self, image) -> None:
        """Prompt and preview layers with the image's dimensionality, scale and translate."""
        geometry = self._geometry(image)
        shape = spatial_shape(image)
        same = self._preview is not None and tuple(self._preview.data.shape) == shape
        same = same and np.allclose(self._preview.scale, image.scale)
        same = same and np.allclose(self._preview.translate, image.translate)
        if same and self._points is not None and self._boxes is not None:
            return
        # One batch: napari runs a full garbage collection after each removal outside a batch
        # (0.17 s each here), once after a batch.
        batch = getattr(self.viewer.layers, "batched_update", contextlib.nullcontext)
        with batch():
            for layer in self._own_layers():
                if layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
        self._quiet = True
        try:
            from napari.layers import Labels
            from napari.utils.colormaps import DirectLabelColormap

            colormap = DirectLabelColormap(
                color_dict={None: "transparent", 0: "transparent", 1: PREVIEW_COLOR}
            )
            self._preview = Labels(
                np.zeros(shape, dtype=np.uint8),
                name=PREVIEW_NAME,
                opacity=0.55,
                colormap=colormap,
                **geometry,
            )
            self._preview.editable = False
            self._preview_at = None
            size = max(3.0, max(shape[-2:]) / 32)  # pixels; visible at any zoom that fits
            boxes = BoxPrompts.make_layer(image.ndim, **geometry)
            points = PointPrompts.make_layer(image.ndim, size=size, **geometry)
            for layer in (self._preview, boxes, points):
                self.viewer.layers.append(layer)
            self._prompt_objects.clear()
            changed = self.timer.wrap(self._on_prompts_changed, "prompts")
            self._boxes = BoxPrompts(boxes, changed)
            self._points = PointPrompts(points, changed)
            self._prompt_objects += [self._points, self._boxes]
            for layer in (points, boxes):
                self._bind_keys(layer)
            boxes.mode = "add_rectangle"
            points.mode = "add"
            self.viewer.layers.selection.active = points
        finally:
            self._quiet = False
        self._refresh_layer_choices()

    def ensure_labels_layer(self):
        """The target labels layer, created (with the image's geometry) if "new" is selected.

        A created layer has the image's spatial shape, scale and translate and a copy of its
        metadata (NIfTI geometry), so saving it with this plugin lines up with the image file.
        """
        layer = self.labels_layer
        if layer is not None:
            return layer
        image = self.image_layer
        if image is None:
            raise ValueError("no image layer: open an image first")
        from napari.layers import Labels

        layer = Labels(
            np.zeros(spatial_shape(image), dtype=np.uint16),
            name=f"{image.name} labels",
            metadata=copy.deepcopy(dict(image.metadata)),
            **self._geometry(image),
        )
        # Below the prompt layers so clicks keep landing on them.
        own = [self.viewer.layers.index(x) for x in self._own_layers() if x in self.viewer.layers]
        self.viewer.layers.insert(min(own, default=len(self.viewer.layers)), layer)
        self.labels_combo.setCurrentIndex(self.labels_combo.findData(layer))
        if self.points_layer is not None:
            self.viewer.layers.selection.active = self.points_layer
        return layer

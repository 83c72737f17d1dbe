"""The "Segment Anything" dock widget: prompts in, masks out, volumes propagated.

The widget is a thin shell: it reads prompts from two layers (:mod:`.prompt_layers`), asks the
engine for masks through one :class:`~._backend.Backend`, previews the chosen mask in a working
labels layer and commits it into the target labels layer through napari's undo history.

Threads: every model call (loading, encoding a slice, decoding prompts, propagating) runs in a
napari worker thread, one job at a time; the main thread only snapshots prompts, draws masks and
writes slices, each slot wrapped by a :class:`~._workers.SlotTimer`. Changing prompts while a
job runs re-runs SAM once the job ends.

Undo: a commit is one undo step of the target labels layer; a whole propagation is one undo
step too, also when it is cancelled or fails part-way (the slices it finished stay; each slice
is written in one go, so there is never a half-written slice; Ctrl+Z removes them all).

Keys (on the viewer and on the prompt layers): T toggles the sign of new points, N shows the
next of SAM's three masks, C commits, Shift+C clears the prompts, Shift+S propagates.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import napari
import numpy as np
from qtpy.QtCore import QEvent, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
)

from napari_sam._napari._backend import Backend, Step
from napari_sam._napari._console import ConsoleSession
from napari_sam._napari._jobs import (
    Adopt,
    Engine,
    Request,
    Result,
    Setup,
    everything_job,
    prepare,
    propagate_job,
    segment_job,
)
from napari_sam._napari._panel import SamPanel
from napari_sam._napari._slicing import SliceFrame
from napari_sam._napari._workers import JobRunner, SlotTimer
from napari_sam._napari.prompt_layers import BoxPrompts, PointPrompts, PromptLayer, SlicePrompts

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
NEW_LABELS = "New labels layer (created on first commit)"
PREVIEW_NAME = "SAM preview"
PREVIEW_COLOR = "cyan"


@dataclass
class _Propagation:
    labels: Any
    frame: SliceFrame
    mode: str
    history: contextlib.ExitStack
    written: set[int] = field(default_factory=set)


class SamWidget(SamPanel):
    """Segment Anything for napari images and volumes.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        Injected by napari.
    backend : Backend, optional
        The engine bindings (tests pass fakes or slow encoders).
    """

    def __init__(self, viewer: napari.viewer.Viewer, backend: Backend | None = None) -> None:
        super().__init__()
        # napari hands plugins a proxy that wraps every layer it returns; the widget compares
        # layers by identity (its own prompt layers, the chosen image), so it keeps the viewer.
        self.viewer = getattr(viewer, "__wrapped__", viewer)
        self.backend = backend or Backend()
        self.timer = SlotTimer()
        self.jobs = JobRunner(self.timer)
        self.downloads = JobRunner(self.timer)
        self._engine: Engine | None = None
        self._result: Result | None = None
        self._pending = False
        self._quiet = False
        self._points: PointPrompts | None = None
        self._boxes: BoxPrompts | None = None
        self._preview = None
        self._preview_at: tuple[SliceFrame, int] | None = None
        self._image = None
        self._seeds: dict[tuple, dict[int, set[int]]] = {}
        self._propagation: _Propagation | None = None
        self._download_cancel = threading.Event()
        self._download_progress: tuple[int, int | None] = (0, None)
        self._job_error: BaseException | None = None
        self._segment_after_download = False
        self._model_options: dict[str, Any] = {}  # registry name -> ModelOption
        self._connections: list[tuple[Any, Any]] = []  # (viewer-side emitter, callback)
        self._prompt_objects: list[PromptLayer] = []
        self._was_docked = False

        for name in self.backend.devices():
            self.device_combo.addItem(name, name)
        for label, precision in self.backend.speeds():
            self.speed_combo.addItem(label, precision)
        for option in self.backend.window_options():
            self.window_combo.addItem(option.label, option.mode)
        self._fill_models()
        self._update_download_button()
        self._connect()
        self._release = self._releaser()
        self.destroyed.connect(self._release)
        self._refresh_layer_choices()
        self._bind_keys(self.viewer)
        self.console_session = ConsoleSession(self)
        self.viewer.update_console({"sam_widget": self, "sam_session": self.console_session})

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
        self.labels_combo.currentIndexChanged.connect(t(self._on_labels_changed, "labels"))
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

        self._download_timer = QTimer(self)
        self._download_timer.setInterval(100)
        self._download_timer.timeout.connect(t(self._show_download_progress, "download_progress"))

    def _listen(self, emitter, callback) -> None:
        emitter.connect(callback)
        self._connections.append((emitter, callback))

    def _releaser(self):
        """A function that detaches the widget from the viewer: stops jobs, disconnects
        events, unbinds keys. It holds no reference to the widget, so it still works while Qt
        destroys the widget (a closed dock widget is deleted, not just hidden)."""
        viewer, jobs, cancel_download = self.viewer, self.jobs, self._download_cancel
        connections, prompts = self._connections, self._prompt_objects

        def release(*_) -> None:
            jobs.cancel()
            cancel_download.set()
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
        self.status.setText(text)
        self.status.setStyleSheet("color: #ff6666;" if error else "")
        if error:
            log.warning(text)

    # ------------------------------------------------------------------------------------------
    # choices: image, model, labels, window, axis

    @property
    def image_layer(self):
        return self.image_combo.currentData()

    @property
    def labels_layer(self):
        """The target labels layer, or None while "new" is selected and none was created."""
        return self.labels_combo.currentData()

    @property
    def points_layer(self):
        return None if self._points is None else self._points.layer

    @property
    def boxes_layer(self):
        return None if self._boxes is None else self._boxes.layer

    @property
    def preview_layer(self):
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
        shape = self._spatial_shape(image)
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

    def _fill_models(self) -> None:
        """(Re)list the registry models with their state; files and models added stay."""
        combo = self.model_combo
        current = combo.currentData()
        items = [(combo.itemText(i), combo.itemData(i)) for i in range(combo.count())]
        extra = [(t, d) for t, d in items if not (isinstance(d, str) and d in self._model_options)]
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        self._model_options = {}
        for option in self.backend.model_options():
            self.model_combo.addItem(option.label, option.source)
            self._model_options[option.source] = option
        for text, source in extra:
            self.model_combo.addItem(text, source)
        for i in range(self.model_combo.count()):
            if self.model_combo.itemData(i) == current:
                self.model_combo.setCurrentIndex(i)
                break
        else:
            cached = [o for o in self._model_options.values() if o.cached]
            if cached:
                self.model_combo.setCurrentIndex(self.model_combo.findData(cached[0].source))
        self.model_combo.blockSignals(False)

    def set_checkpoint(self, path: str | Path) -> None:
        """Use the weights file ``path`` (any registry architecture or a saved checkpoint)."""
        path = Path(path).expanduser()
        if not path.is_file():
            self.set_status(f"No such checkpoint file: {path}", error=True)
            return
        self._add_model_item(f"file: {path.name}", str(path))

    def set_model(self, model, name: str | None = None) -> None:
        """Use an already loaded model (e.g. from napari's console)."""
        self._add_model_item(f"in memory: {name or self.backend.model_name(model)}", model)

    def _add_model_item(self, label: str, source: Any) -> None:
        self.model_combo.addItem(label, source)
        self.model_combo.setCurrentIndex(self.model_combo.count() - 1)

    def _choose_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "SAM checkpoint", "", "Checkpoints (*.pth *.pt *.safetensors);;All files (*)"
        )
        if path:
            self.set_checkpoint(path)

    def _on_model_changed(self, *_) -> None:
        self._update_download_button()
        self._invalidate()

    def _on_settings_changed(self, *_) -> None:
        self._invalidate(cache_only=True)

    def _invalidate(self, cache_only: bool = False) -> None:
        """Drop what no longer matches the choices; rebuilt by the next job."""
        engine = self._engine
        if engine is not None:
            self._engine = None if not cache_only else replace(engine, cache_key=None, cache=None)
        self._set_result(None)
        if self._prompts_exist():
            self.request_segment()

    def _on_image_changed(self, *_) -> None:
        image = self.image_layer
        for emitter, callback in [c for c in self._connections if c[1] == self._on_contrast_limits]:
            emitter.disconnect(callback)
            self._connections.remove((emitter, callback))
        self._image = image
        self._set_result(None)
        if self._engine is not None:
            self._engine = replace(self._engine, cache_key=None, cache=None)
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
            self._invalidate(cache_only=True)

    def _on_labels_changed(self, *_) -> None:
        self._seeds.clear()

    # -- slicing ------------------------------------------------------------------------------

    @staticmethod
    def _spatial_shape(image) -> tuple[int, ...]:
        data = image.data[0] if image.multiscale else image.data
        shape = tuple(data.shape)
        return shape[:-1] if image.rgb else shape

    def _layer_axes(self, image) -> tuple[int | None, tuple[int, int] | None]:
        """(sliced axis, displayed plane) of ``image`` from the viewer's dims order."""
        ndim = image.ndim
        if ndim < 3:
            return None, None
        offset = self.viewer.dims.ndim - ndim
        order = [a - offset for a in self.viewer.dims.order if a - offset >= 0]
        return order[-3], tuple(sorted(order[-2:]))

    def frame(self) -> SliceFrame:
        """The slicing of the current image implied by the viewer (axis, plane, time point)."""
        image = self.image_layer
        if image is None:
            raise ValueError("no image layer: open an image first")
        axis, plane = self._layer_axes(image)
        point = np.asarray(image.world_to_data(self.viewer.dims.point))
        return SliceFrame.for_layer(
            self._spatial_shape(image), axis, point, plane=plane, rgb=image.rgb
        )

    def current_index(self, frame: SliceFrame | None = None) -> int:
        """The slice under the viewer's slider along the frame's axis."""
        frame = frame or self.frame()
        if frame.axis is None:
            return 0
        point = np.asarray(self.image_layer.world_to_data(self.viewer.dims.point))
        return int(np.clip(np.round(point[frame.axis]), 0, frame.n_slices - 1))

    def _sync_axis_combo(self) -> None:
        image = self.image_layer
        self.axis_combo.blockSignals(True)
        self.axis_combo.clear()
        if image is None or image.ndim < 3:
            self.axis_combo.addItem("none (2D image)", None)
            self.axis_combo.setEnabled(False)
        else:
            self.axis_combo.setEnabled(True)
            offset = self.viewer.dims.ndim - image.ndim
            names = self.viewer.dims.axis_labels
            for a in range(image.ndim):
                name = str(names[a + offset])
                # napari's default axis labels are just negative numbers: not worth showing
                numeric = name.lstrip("-").isdigit()
                self.axis_combo.addItem(f"axis {a}" + ("" if numeric else f" ({name})"), a)
            axis, _ = self._layer_axes(image)
            self.axis_combo.setCurrentIndex(self.axis_combo.findData(axis))
        self.axis_combo.blockSignals(False)
        self._sync_range()

    def _sync_range(self) -> None:
        if self.image_layer is None:
            return
        n = self.frame().n_slices
        for spin in (self.from_spin, self.to_spin):
            spin.setRange(0, max(n - 1, 0))
        self.from_spin.setValue(0)
        self.to_spin.setValue(n - 1)

    def _on_axis_chosen(self, *_) -> None:
        """Slice along the chosen axis: make it the last slider (the plane stays displayed)."""
        image, axis = self.image_layer, self.axis_combo.currentData()
        if image is None or axis is None:
            return
        offset = self.viewer.dims.ndim - image.ndim
        order = [a for a in self.viewer.dims.order if a != axis + offset]
        self.viewer.dims.order = (*order[:-2], axis + offset, *order[-2:])

    def _on_dims_order(self, event=None) -> None:
        self._sync_axis_combo()
        self._invalidate(cache_only=True)

    def _on_step(self, event=None) -> None:
        """Moving to another slice: segment it if it holds prompts and no result yet."""
        if self.image_layer is None or self.jobs.name == "propagate":
            return
        frame = self.frame()
        if self._result is not None and self._result.frame != frame:
            self._set_result(None)  # another time point / channel: another volume
        index = self.current_index(frame)
        result = self._result
        if result is not None and result.index == index:
            return
        if self._prompts_on(frame, index) is not None:
            self.request_segment()

    # ------------------------------------------------------------------------------------------
    # layers the widget owns

    def _geometry(self, image) -> dict:
        return {"scale": image.scale, "translate": image.translate}

    def _setup_layers(self, image) -> None:
        """Prompt and preview layers with the image's dimensionality, scale and translate."""
        geometry = self._geometry(image)
        shape = self._spatial_shape(image)
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
            self._boxes = BoxPrompts(boxes, self.timer.wrap(self._on_prompts_changed, "prompts"))
            self._points = PointPrompts(
                points, self.timer.wrap(self._on_prompts_changed, "prompts")
            )
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
            np.zeros(self._spatial_shape(image), dtype=np.uint16),
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

    # ------------------------------------------------------------------------------------------
    # prompts -> SAM -> preview

    def _prompt_layers(self) -> list[PromptLayer]:
        return [p for p in (self._points, self._boxes) if p is not None]

    def _prompts_exist(self) -> bool:
        return any(len(p.layer.data) for p in self._prompt_layers())

    def _prompts_on(self, frame: SliceFrame, index: int) -> SlicePrompts | None:
        prompts = SlicePrompts()
        for p in self._prompt_layers():
            p.collect(prompts, self.image_layer, frame, index)
        return None if prompts.empty else prompts

    def _on_prompts_changed(self, source: PromptLayer, action: str) -> None:
        if not self._quiet:
            self.request_segment()

    def _setup(self, frame: SliceFrame) -> Setup:
        image = self.image_layer
        source = self.model_combo.currentData()
        device = self.device_combo.currentData() or "auto"
        precision = self.speed_combo.currentData() or "auto"
        mode = self.window_combo.currentData() or "auto"
        limits = tuple(map(float, image.contrast_limits)) if mode == "contrast_limits" else None
        data = image.data[0] if image.multiscale else image.data
        model_key = (source if isinstance(source, (str, Path)) else id(source), device, precision)
        cache_key = (model_key, id(data), frame.axis, frame.fixed, mode, limits)
        return Setup(
            model_source=source,
            device=device,
            precision=precision,
            volume=frame.volume(data),
            engine_axis=frame.engine_axis,
            window_mode=mode,
            contrast_limits=limits,
            rgb=frame.rgb,
            cache_dir=self.backend.cache_dir(),
            model_key=model_key,
            cache_key=cache_key,
        )

    def ready_engine(self) -> tuple[Engine, Setup, SliceFrame]:
        """The engine for the current choices, prepared here and now (blocks: for napari's
        console, where the user runs code on the main thread anyway)."""
        frame = self.frame()
        setup = self._setup(frame)
        engine = self._engine
        if engine is None or engine.cache_key != setup.cache_key:
            steps = prepare(self.backend, setup, engine)
            try:
                while True:
                    next(steps)
            except StopIteration as done:
                engine = done.value
            self._engine = engine
        return engine, setup, frame

    def session_geometry(self, frame: SliceFrame) -> dict:
        """Scale, translate and metadata of the 3D volume ``frame`` cuts out of the image, so
        that a session saves labels that line up with the image file."""
        image = self.image_layer
        kept = [a for a in range(len(frame.shape)) if a not in dict(frame.fixed)]
        if frame.axis is None:  # a 2D image is a volume of one slice
            scale, translate = (1.0, *image.scale), (0.0, *image.translate)
        else:
            scale = tuple(image.scale[a] for a in kept)
            translate = tuple(image.translate[a] for a in kept)
        # The file's own geometry applies only when the session's volume is the whole image.
        metadata = dict(image.metadata) if len(kept) == image.ndim == 3 else {}
        return {"scale": scale, "translate": translate, "metadata": metadata}

    def committed(self, frame: SliceFrame) -> dict[int, list[int]]:
        """Label id -> slices where it was committed, for the slicing ``frame``."""
        return {k: sorted(v) for k, v in self._seeds.get((frame.axis, frame.fixed), {}).items()}

    def _model_ready_message(self) -> str | None:
        """Why no model can be used now (not downloaded, none chosen), or None."""
        source = self.model_combo.currentData()
        if source is None:
            return "Choose a model, or a checkpoint file with Checkpoint…"
        option = self._model_options.get(source) if isinstance(source, str) else None
        if option is not None and not option.cached:
            if option.downloadable:
                size = "" if option.size_bytes is None else f" ({option.size_bytes / 1e6:,.0f} MB)"
                return f"{source} is not downloaded yet: press Download{size} first."
            return f"{source} has no download link: choose its file with Checkpoint…"
        return None

    def _needs_download(self) -> bool:
        source = self.model_combo.currentData()
        option = self._model_options.get(source) if isinstance(source, str) else None
        return option is not None and not option.cached and option.downloadable

    def request_segment(self) -> None:
        """Run SAM on the current slice's prompts (in the background)."""
        if self.jobs.busy:
            self._pending = True
            return
        self._pending = False
        if self.image_layer is None or not self._prompt_layers():
            return
        if self.viewer.dims.ndisplay == 3:
            self.set_status("Switch to the 2D view to place prompts.")
            return
        frame = self.frame()
        index = self.current_index(frame)
        prompts = self._prompts_on(frame, index)
        if prompts is None:
            if self._result is not None and self._result.index == index:
                self._set_result(None)
            return
        if self._needs_download():
            # The first prompt fetches the chosen model (in the background, with Cancel);
            # SAM runs when it is there.
            self._segment_after_download = True
            if not self.downloads.busy:
                self.download()
            return
        problem = self._model_ready_message()
        if problem:
            self.set_status(problem, error=True)
            return
        previous = self._result
        mask_input = None
        if (
            previous is not None
            and previous.frame == frame
            and previous.index == index
            and prompts.extends(previous.prompts)
        ):
            mask_input = previous.low_res[previous.chosen][None]
        single_click = len(prompts.points) == 1 and prompts.box is None and prompts.mask is None
        request = Request(
            self._setup(frame),
            frame,
            index,
            prompts,
            mask_input,
            single_click and mask_input is None,
        )
        self._busy(True)
        self._job_error = None
        self.jobs.start(
            "segment",
            segment_job,
            self.backend,
            request,
            self._engine,
            on_yield=self._on_job_message,
            on_return=self._on_segmented,
            on_error=self._on_job_error,
            on_done=self._on_segment_done,
        )

    def _on_job_message(self, message) -> None:
        if isinstance(message, Adopt):
            self._engine = message.engine
        elif isinstance(message, Step):
            self._write_step(message)
        else:
            self.set_status(str(message))

    def _on_segmented(self, result: Result) -> None:
        try:
            current = self._prompts_on(result.frame, result.index)
            if self.image_layer is None or current is None:
                return
            if current.key() != result.prompts.key():
                self._pending = True  # prompts moved on while SAM ran
                return
        except ValueError:
            return
        self._set_result(result)

    def _on_job_error(self, exc: BaseException) -> None:
        self._job_error = exc
        # Our own checks raise ValueError/FileNotFoundError with a message meant for the user.
        user_error = isinstance(exc, (ValueError, FileNotFoundError))
        self.set_status(str(exc) if user_error else f"{type(exc).__name__}: {exc}", error=True)

    def _on_segment_done(self, aborted: bool) -> None:
        self._busy(False)
        if aborted:
            self.set_status("Cancelled: nothing was written.")
        if self._pending:
            self.request_segment()

    def _busy(self, busy: bool) -> None:
        if busy:
            self.progress.setRange(0, 0)  # indeterminate while encoding / decoding
        self.progress.setVisible(busy)
        self.cancel_button.setEnabled(busy)

    def _set_result(self, result: Result | None) -> None:
        if result is None and self._result is None:
            return
        self._result = result
        self._draw_preview()
        if result is not None:
            n = len(result.masks)
            which = f"mask {result.chosen + 1} of {n}, " if n > 1 else ""
            area = int(result.mask.sum())
            self.set_status(
                f"Slice {result.index}: {which}predicted IoU {result.ious[result.chosen]:.2f}, "
                f"{area} pixels. C commits" + (", N shows the next mask." if n > 1 else ".")
            )

    def _draw_preview(self) -> None:
        layer = self._preview
        if layer is None:
            return
        changed = False
        if self._preview_at is not None:
            frame, index = self._preview_at
            if frame.shape == tuple(layer.data.shape):
                frame.slice_of(layer.data, index)[...] = 0
                changed = True
            self._preview_at = None
        result = self._result
        if result is not None and result.frame.shape == tuple(layer.data.shape):
            result.frame.slice_of(layer.data, result.index)[...] = result.mask
            self._preview_at = (result.frame, result.index)
            changed = True
        if changed:  # the extent never changes: skip napari's extent and highlight updates
            layer.refresh(extent=False, highlight=False)

    # -- actions (buttons and keys) -----------------------------------------------------------

    def toggle_sign(self) -> None:
        """T: new points become negative (or positive again); selected points flip too."""
        if self._points is None:
            return
        positive = self._points.toggle()
        self.sign_button.setText(f"New points: {'positive' if positive else 'negative'} (T)")

    def next_mask(self) -> None:
        """N: show the next of SAM's candidate masks for an ambiguous single click."""
        result = self._result
        if result is None or len(result.masks) < 2:
            return
        self._set_result(replace(result, chosen=(result.chosen + 1) % len(result.masks)))

    def clear_prompts(self) -> None:
        """Shift+C: remove every prompt and the preview."""
        self._quiet = True
        try:
            for p in self._prompt_layers():
                p.clear()
        finally:
            self._quiet = False
        self._set_result(None)
        self.set_status("Prompts cleared.")

    def _label_id(self, labels) -> int:
        if self.label_mode_combo.currentData() == "selected":
            return int(labels.selected_label)
        new = int(labels.data.max()) + 1
        limit = np.iinfo(labels.data.dtype).max if labels.data.dtype.kind in "iu" else None
        if limit is not None and new > limit:
            raise ValueError(
                f"label id {new} does not fit the labels layer's {labels.data.dtype}; "
                "choose 'Selected label id' or a labels layer with a wider type"
            )
        return new

    def _write_mask(self, labels, frame: SliceFrame, index: int, mask, label: int, mode: str):
        """Write one slice's mask through the undo history; return the pixels changed."""
        current = frame.slice_of(labels.data, index)
        write = mask & (current == 0) if mode == "keep" else mask & (current != label)
        rows, cols = np.nonzero(write)
        if rows.size:
            labels.data_setitem(frame.nd_index(index, rows, cols), label)
        return int(rows.size)

    def commit(self) -> None:
        """C: write the previewed mask into the target labels layer (one undo step)."""
        result = self._result
        if result is None or not result.mask.any():
            self.set_status("Nothing to commit: add prompts first.")
            return
        if self._propagation is not None:
            self.set_status("Wait for the propagation to end (or cancel it) before committing.")
            return
        try:
            labels = self.ensure_labels_layer()
            label = self._label_id(labels)
        except ValueError as exc:
            self.set_status(str(exc), error=True)
            return
        if tuple(labels.data.shape) != result.frame.shape:
            self.set_status(
                f"The labels layer {labels.name!r} has shape {labels.data.shape}, the image "
                f"{result.frame.shape}: choose a matching labels layer or 'New labels layer'.",
                error=True,
            )
            return
        mode = self.overlap_combo.currentData()
        with labels.block_history():
            changed = self._write_mask(labels, result.frame, result.index, result.mask, label, mode)
        labels.selected_label = label
        key = (result.frame.axis, result.frame.fixed)
        self._seeds.setdefault(key, {}).setdefault(label, set()).add(result.index)
        self.clear_prompts()
        self.set_status(
            f"Committed label {label} on slice {result.index} ({changed} pixels). "
            "Ctrl+Z in the labels layer undoes it."
        )

    def _can_start(self) -> bool:
        """Whether a button's job can start now; if not, say why."""
        if self.jobs.busy:
            self.set_status("Busy: wait for the current job or cancel it.")
        elif self.image_layer is None:
            self.set_status("Open an image first.")
        else:
            return True
        return False

    # -- propagation --------------------------------------------------------------------------

    def propagate(self) -> None:
        """Shift+S: propagate the committed objects through the volume (in the background)."""
        if not self._can_start():
            return
        if self._result is not None and self._result.mask.any():
            self.commit()  # the preview on screen is what the user means to propagate
        frame = self.frame()
        if frame.n_slices < 2:
            self.set_status("Propagation needs a volume: this image has a single slice.")
            return
        labels = self.labels_layer
        problem = self._model_ready_message()
        if labels is None or tuple(labels.data.shape) != frame.shape:
            problem = "Nothing to propagate: commit a mask (C) on a slice first."
        if problem:
            self.set_status(problem, error=True)
            return
        committed = self.committed(frame)
        selected = None
        if self.scope_combo.currentData() == "selected":
            selected = int(labels.selected_label)
        lo, hi = sorted((self.from_spin.value(), self.to_spin.value()))
        history = contextlib.ExitStack()
        history.enter_context(labels.block_history())
        self._propagation = _Propagation(labels, frame, self.overlap_combo.currentData(), history)
        # Painting now would join the propagation's undo step. (Not ``editable = False``: napari
        # clears a labels layer's whole undo history when it becomes read-only.)
        labels.mode = "pan_zoom"
        self.progress.setRange(0, 0)
        self.progress.setVisible(True)
        self.cancel_button.setEnabled(True)
        self.propagate_button.setEnabled(False)
        self.set_status(f"Propagating through slices {lo}-{hi}…")
        self._job_error = None
        self.jobs.start(
            "propagate",
            propagate_job,
            self.backend,
            self._setup(frame),
            self._engine,
            (labels.data, frame, committed, selected),
            (lo, hi),
            on_yield=self._on_job_message,
            on_error=self._on_job_error,
            on_done=self._on_propagation_done,
        )

    def _write_step(self, step: Step) -> None:
        run = self._propagation
        if run is None:
            return
        changed = 0
        for label, mask in step.masks.items():
            changed += self._write_mask(run.labels, run.frame, step.index, mask, label, run.mode)
        if changed:
            run.written.add(step.index)
        self.progress.setRange(0, max(step.total, 1))
        self.progress.setValue(step.done)
        self.set_status(f"Propagating: slice {step.index} ({step.done} of {step.total})…")

    def _on_propagation_done(self, aborted: bool) -> None:
        run, self._propagation = self._propagation, None
        if run is not None:
            run.history.close()  # everything written becomes one undo step
            n = len(run.written)
            if aborted:
                self.set_status(
                    f"Propagation cancelled: the {n} slice(s) changed so far stay "
                    "(Ctrl+Z in the labels layer removes them)."
                )
            elif self._job_error is None:
                self.set_status(
                    f"Propagation done: {n} slice(s) changed. Ctrl+Z in the labels layer undoes "
                    "it as one step."
                )
        self._busy(False)
        self.propagate_button.setEnabled(True)
        if self._pending:
            self.request_segment()

    def segment_everything(self) -> None:
        """Every object SAM finds on the current slice, committed as new label ids (one undo
        step), in the background with progress and Cancel."""
        if not self._can_start():
            return
        problem = self._model_ready_message()
        if problem:
            self.set_status(problem, error=True)
            return
        frame = self.frame()
        index = self.current_index(frame)
        self._busy(True)
        self._job_error = None
        self.jobs.start(
            "everything",
            everything_job,
            self.backend,
            self._setup(frame),
            self._engine,
            index,
            on_yield=self._on_job_message,
            on_return=lambda found: self._commit_everything(frame, *found),
            on_error=self._on_job_error,
            on_done=self._on_segment_done,
        )

    def _commit_everything(self, frame: SliceFrame, index: int, found: np.ndarray) -> None:
        labels = self.ensure_labels_layer()
        if tuple(labels.data.shape) != frame.shape:
            self.set_status("The target labels layer does not match the image's shape.", True)
            return
        base, count = int(labels.data.max()), int(found.max())
        limit = np.iinfo(labels.data.dtype).max
        if base + count > limit:
            self.set_status(f"{count} new labels do not fit the labels' {labels.data.dtype}.", True)
            return
        current = frame.slice_of(labels.data, index)
        write = found > 0
        if self.overlap_combo.currentData() == "keep":
            write &= current == 0
        rows, cols = np.nonzero(write)
        with labels.block_history():  # all objects of the slice: one undo step
            labels.data_setitem(frame.nd_index(index, rows, cols), base + found[rows, cols])
        added = np.unique(base + found[rows, cols])
        committed = self._seeds.setdefault((frame.axis, frame.fixed), {})
        for label in added:
            committed.setdefault(int(label), set()).add(index)
        ids = f" (labels {added[0]}-{added[-1]})" if len(added) else ""
        self.set_status(
            f"Segment everything on slice {index}: SAM found {count} object(s), {len(added)} "
            f"added{ids}. Ctrl+Z in the labels layer undoes it."
        )

    def cancel(self) -> None:
        """Stop the running job (propagation: finished slices stay)."""
        if self.jobs.busy:
            self.jobs.cancel()
            self.set_status("Cancelling…")

    # -- model download -----------------------------------------------------------------------

    def _set_download_visible(self, running: bool) -> None:
        self.download_progress.setVisible(running)
        self.download_cancel_button.setVisible(running)

    def _update_download_button(self) -> None:
        source = self.model_combo.currentData()
        option = self._model_options.get(source) if isinstance(source, str) else None
        needed = option is not None and not option.cached and option.downloadable
        self.download_button.setVisible(needed and not self.downloads.busy)
        if needed:
            size = "" if option.size_bytes is None else f" {option.size_bytes / 1e6:,.0f} MB"
            self.download_button.setText(f"Download {source}{size}")

    def download(self) -> None:
        """Download the chosen registry model in the background (progress, cancel)."""
        source = self.model_combo.currentData()
        if self.downloads.busy or not isinstance(source, str):
            return
        self._download_cancel.clear()
        self._download_progress = (0, None)
        self.download_button.setVisible(False)
        self._set_download_visible(True)
        self._download_timer.start()
        self.set_status(f"Downloading {source}…")

        def report(done: int, total: int | None) -> None:
            self._download_progress = (done, total)  # read by the main thread's timer

        self.downloads.start(
            "download",
            self.backend.download,
            source,
            report,
            self._download_cancel.is_set,
            on_return=lambda path: self.set_status(f"Downloaded {source} to {path}."),
            on_error=self._on_download_error,
            on_done=self._on_download_done,
        )

    def _show_download_progress(self) -> None:
        done, total = self._download_progress
        if total:
            self.download_progress.setRange(0, 1000)
            self.download_progress.setValue(int(1000 * done / total))
        else:
            self.download_progress.setRange(0, 0)

    def _on_download_error(self, exc: BaseException) -> None:
        self._segment_after_download = False
        if self.backend.is_cancelled_error(exc):
            self.set_status("Download cancelled; nothing was kept.")
        else:
            self.set_status(f"Download failed: {exc}", error=True)

    def _on_download_done(self, aborted: bool) -> None:
        self._download_timer.stop()
        self._set_download_visible(False)
        self._fill_models()
        self._update_download_button()
        if self._segment_after_download and not self._needs_download():
            self._segment_after_download = False
            self.request_segment()

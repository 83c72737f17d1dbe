"""``sam_session`` in napari's console: the scripting API on what the widget shows."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from napari_sam._napari.widget import SamWidget

__all__ = ["ConsoleSession"]


class ConsoleSession:
    """A :class:`~napari_sam.volume.session.VolumeSession` on the widget's current image volume,
    model, intensity window, slicing axis and target labels layer, built on first use and
    rebuilt when one of those changes.

    It shares the widget's model and embedding cache, knows the objects committed in the widget
    (so ``propagate()`` continues them) and writes into the labels layer's array, which is
    refreshed after every call. Writes from the console are not in the layer's undo history.
    """

    def __init__(self, widget: SamWidget) -> None:
        self._widget = widget
        self._session = None
        self._key = None

    def _get(self):
        widget = self._widget
        labels = widget.ensure_labels_layer()
        engine, setup, frame = widget.ready_engine()
        key = (setup.cache_key, id(labels))
        if self._session is None or self._key != key:
            session = widget.backend.make_session(
                engine.model,
                setup.volume,
                axis=setup.engine_axis,
                window=engine.window,
                labels=frame.volume(labels.data),
                cache=engine.cache,
                geometry=widget.session_geometry(frame),
            )
            for label, indices in widget.committed(frame).items():
                for index in indices:
                    session.annotate(label, index)
            self._session, self._key = session, key
        return self._session

    def __getattr__(self, name: str):
        value = getattr(self._get(), name)
        if not inspect.ismethod(value):
            return value

        def call(*args, **kwargs):
            out = value(*args, **kwargs)
            layer = self._widget.labels_layer
            if layer is not None:
                layer.refresh()  # the session wrote into the layer's array directly
            return out

        return call

    def __repr__(self) -> str:
        return (
            "sam_session: the scripting API (VolumeSession) on the widget's image, model and "
            "labels; e.g. sam_session.segment_slice(index, box=[x0, y0, x1, y1])"
        )

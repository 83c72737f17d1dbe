"""The session's writes into a napari labels layer, through napari's undo history."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from napari_sam._napari._slicing import SliceFrame

__all__ = ["LayerWriter"]


class LayerWriter:
    """A :class:`~napari_sam.volume.labels_writer.LabelsWriter` on a napari ``Labels`` layer.

    Writes go through ``layer.data_setitem`` (which records undo history and refreshes the
    view); :meth:`undo_step` wraps ``layer.block_history()`` so that a commit or a whole
    propagation is one Ctrl+Z. Call it on the main thread only.

    Parameters
    ----------
    layer : napari.layers.Labels
        Its data has the image layer's spatial shape.
    frame : SliceFrame
        How the session's ``(Z, Y, X)`` volume sits in the layer (sliced axis, held axes).
    """

    def __init__(self, layer: Any, frame: SliceFrame) -> None:
        self.layer = layer
        self.frame = frame
        self._depth = 0

    @property
    def labels(self) -> np.ndarray:
        """The session's ``(Z, Y, X)`` view of the layer's data (of its current array)."""
        return self.frame.volume(self.layer.data)

    def write(self, index: int, rows: np.ndarray, cols: np.ndarray, values: Any) -> None:
        """Set pixels ``(rows, cols)`` of slice ``index`` through ``data_setitem``."""
        if len(rows):
            self.layer.data_setitem(self.frame.nd_index(index, rows, cols), values)

    @contextlib.contextmanager
    def undo_step(self) -> Iterator[None]:
        """One napari undo step for the writes inside (re-entrant)."""
        # napari's block_history commits its staged history when any (nested) block ends:
        # only the outermost one may open it.
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            with self.layer.block_history():
                yield
        finally:
            self._depth = 0

    def undo(self) -> None:
        """Undo the layer's last step, as napari's Ctrl+Z does."""
        self.layer.undo()

    def max_label(self) -> int:
        """The largest label id in the whole layer (all time points)."""
        data = self.layer.data
        return int(data.max()) if data.size else 0

"""Where a :class:`~napari_sam.volume.session.VolumeSession` writes labels, and how it undoes them.

A session computes every write itself (which pixels of which slice get which label id) and
hands it to a *writer*. The default :class:`ArrayWriter` writes into a NumPy labels volume and
keeps its own undo steps; the napari widget passes a writer that goes through the labels
layer's ``data_setitem`` inside ``block_history()``, so each commit or propagation is one step
of napari's own undo (Ctrl+Z).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["ArrayWriter", "LabelsWriter"]


@runtime_checkable
class LabelsWriter(Protocol):
    """What a session needs from the labels it writes into.

    Coordinates are the session's: ``index`` along its slicing axis, ``rows``/``cols`` of that
    slice. ``labels`` is the session's ``(Z, Y, X)`` view of the labels, read to merge masks
    with what is there.
    """

    labels: np.ndarray

    def write(self, index: int, rows: np.ndarray, cols: np.ndarray, values: Any) -> None:
        """Set pixels ``(rows, cols)`` of slice ``index`` to ``values`` (scalar or per pixel)."""

    def undo_step(self) -> contextlib.AbstractContextManager:
        """Group the writes made inside the context into one undo step (re-entrant)."""

    def undo(self) -> None:
        """Undo the last undo step."""

    def max_label(self) -> int:
        """The largest label id in use (new ids are chosen above it)."""


class ArrayWriter:
    """Write into a NumPy labels volume in place, with an undo history.

    Parameters
    ----------
    labels : (Z, Y, X) integer ndarray
        Written in place.
    axis : int
        The session's slicing axis.
    max_undo : int
        Undo steps kept (each stores, per slice it touched, the old values of the box around
        the changed pixels).
    """

    def __init__(self, labels: np.ndarray, axis: int = 0, *, max_undo: int = 16) -> None:
        self.labels = labels
        self.axis = axis
        self.max_undo = max_undo
        self._history: list[list[tuple[int, int, int, np.ndarray]]] = []
        self._open: list[tuple[int, int, int, np.ndarray]] | None = None
        self._depth = 0

    def _slice(self, index: int) -> np.ndarray:
        where: list[Any] = [slice(None)] * 3
        where[self.axis] = index
        return self.labels[tuple(where)]

    def write(self, index: int, rows: np.ndarray, cols: np.ndarray, values: Any) -> None:
        """Set pixels ``(rows, cols)`` of slice ``index``, recording their old values."""
        if len(rows) == 0:
            return
        plane = self._slice(index)
        with self.undo_step():
            r0, c0 = int(rows.min()), int(cols.min())
            r1, c1 = int(rows.max()) + 1, int(cols.max()) + 1
            assert self._open is not None
            self._open.append((index, r0, c0, plane[r0:r1, c0:c1].copy()))
            plane[rows, cols] = values

    @contextlib.contextmanager
    def undo_step(self) -> Iterator[None]:
        """Group the writes inside into one undo step (nested steps join the outer one)."""
        if self._depth == 0:
            self._open = []
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                if self._open:
                    self._history.append(self._open)
                    del self._history[: -self.max_undo]
                self._open = None

    def undo(self) -> None:
        """Restore the pixels of the last undo step; ValueError when there is none."""
        if not self._history:
            raise ValueError("nothing to undo")
        for index, r0, c0, old in reversed(self._history.pop()):
            self._slice(index)[r0 : r0 + old.shape[0], c0 : c0 + old.shape[1]] = old

    @property
    def can_undo(self) -> bool:
        """Whether there is an undo step to take back."""
        return bool(self._history)

    def max_label(self) -> int:
        """The largest label id in the volume (0 when empty)."""
        return int(self.labels.max()) if self.labels.size else 0

"""Which 2D planes of an image layer SAM sees, and how they map back into the layer's array.

SAM works on 2D slices. An image layer is 2D (grayscale or RGB), 3D (a volume) or 4D and more
(time or channel first). A :class:`SliceFrame` fixes one choice: the sliced axis, the leading
axes held at one index (e.g. the current time point) and the plane made of the two remaining
axes, in increasing axis order (rows = the lower axis). It converts layer data coordinates into
``(slice index, row, col)`` and slice masks into index tuples for ``Labels.data_setitem``.

Plain NumPy, no Qt and no napari: the widget converts world coordinates into the image layer's
data coordinates (``layer.world_to_data``) before calling :meth:`SliceFrame.locate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SliceFrame"]


@dataclass(frozen=True)
class SliceFrame:
    """A family of 2D planes through an image layer's array.

    Parameters
    ----------
    shape : tuple of int
        Spatial shape of the image layer's data (without the RGB channel axis).
    axis : int or None
        Sliced axis of the layer; None for a 2D image (a single plane).
    fixed : tuple of (int, int)
        ``(axis, index)`` pairs held constant, e.g. the time point of a 4D series.
    rgb : bool
        Whether the data carries a trailing RGB(A) channel axis.
    """

    shape: tuple[int, ...]
    axis: int | None
    fixed: tuple[tuple[int, int], ...] = ()
    rgb: bool = False

    def __post_init__(self) -> None:
        ndim = len(self.shape)
        if ndim < 2:
            raise ValueError(
                f"an image needs at least 2 spatial dimensions, got shape {self.shape}"
            )
        fixed_axes = [a for a, _ in self.fixed]
        if ndim == 2:
            if self.axis is not None or fixed_axes:
                raise ValueError("a 2D image has no axis to slice or to hold fixed")
            return
        if self.axis is None or not 0 <= self.axis < ndim:
            raise ValueError(f"slicing axis must be in 0..{ndim - 1} for shape {self.shape}")
        if self.axis in fixed_axes or len(set(fixed_axes)) != len(fixed_axes):
            raise ValueError("the sliced axis and the fixed axes must all differ")
        if ndim - 1 - len(fixed_axes) != 2:
            raise ValueError(
                f"an image of {ndim} dimensions sliced along one axis needs {ndim - 3} fixed "
                f"axes, got {len(fixed_axes)}"
            )
        for a, i in self.fixed:
            if not 0 <= i < self.shape[a]:
                raise ValueError(f"index {i} is outside axis {a} of size {self.shape[a]}")

    @classmethod
    def for_layer(
        cls,
        shape: tuple[int, ...],
        axis: int | None = None,
        point: np.ndarray | None = None,
        *,
        plane: tuple[int, int] | None = None,
        rgb: bool = False,
    ) -> SliceFrame:
        """The frame slicing ``axis`` across ``plane``, every other axis held at ``point``.

        ``plane`` defaults to the last two axes other than ``axis`` and ``axis`` to the last
        axis before the plane (what napari shows under the last slider). The held axes (time,
        channel) take the rounded data coordinate ``point``, clipped into the array.
        """
        ndim = len(shape)
        if ndim == 2:
            return cls(tuple(shape), None, (), rgb)
        if plane is None:
            plane = tuple(a for a in range(ndim) if a != axis)[-2:]
        if axis is None:
            axis = [a for a in range(ndim) if a not in plane][-1]
        if axis in plane or len(set(plane)) != 2:
            raise ValueError(f"the sliced axis {axis} must not be one of the plane axes {plane}")
        if point is None:
            point = np.zeros(ndim)
        held = [a for a in range(ndim) if a != axis and a not in plane]
        fixed = tuple((a, int(np.clip(np.round(point[a]), 0, shape[a] - 1))) for a in held)
        return cls(tuple(shape), axis, fixed, rgb)

    @property
    def plane(self) -> tuple[int, int]:
        """The (row, col) axes of the layer that make up each 2D slice."""
        if self.axis is None:
            return (0, 1)
        fixed_axes = {a for a, _ in self.fixed}
        rows, cols = [a for a in range(len(self.shape)) if a != self.axis and a not in fixed_axes]
        return rows, cols

    @property
    def n_slices(self) -> int:
        return 1 if self.axis is None else self.shape[self.axis]

    @property
    def slice_shape(self) -> tuple[int, int]:
        r, c = self.plane
        return self.shape[r], self.shape[c]

    @property
    def engine_axis(self) -> int:
        """The sliced axis inside :meth:`volume` (which drops the fixed axes)."""
        if self.axis is None:
            return 0
        return self.axis - sum(1 for a, _ in self.fixed if a < self.axis)

    def _fixed_index(self) -> tuple:
        index: list = [slice(None)] * len(self.shape)
        for a, i in self.fixed:
            index[a] = i
        return tuple(index)

    def volume(self, data):
        """The 3D stack of slices (plus the RGB axis) the embedding cache works on: a view."""
        if self.axis is None:
            return data[np.newaxis]
        return data[self._fixed_index()]

    def slice_of(self, data, index: int):
        """The 2D plane ``index`` of an array shaped like the layer (a view when possible)."""
        if self.axis is None:
            return data
        full = list(self._fixed_index())
        full[self.axis] = index
        return data[tuple(full)]

    def locate(self, point: np.ndarray) -> tuple[int, float, float] | None:
        """``(slice index, row, col)`` of a data-coordinate point, or None when it lies off
        the fixed indices or outside the array."""
        point = np.asarray(point, dtype=float)
        if point.shape[-1] != len(self.shape):
            raise ValueError(
                f"expected a point with {len(self.shape)} coordinates, got {point.shape[-1]}"
            )
        for a, i in self.fixed:
            if int(np.round(point[a])) != i:
                return None
        index = 0 if self.axis is None else int(np.round(point[self.axis]))
        if not 0 <= index < self.n_slices:
            return None
        r, c = self.plane
        return index, float(point[r]), float(point[c])

    def point(self, index: int, row: float, col: float) -> np.ndarray:
        """The data-coordinate point at ``(row, col)`` of slice ``index`` (inverse of
        :meth:`locate`)."""
        point = np.zeros(len(self.shape))
        for a, i in self.fixed:
            point[a] = i
        if self.axis is not None:
            point[self.axis] = index
        r, c = self.plane
        point[r], point[c] = row, col
        return point

    def nd_index(self, index: int, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, ...]:
        """Index arrays into the layer's array for pixels ``(rows, cols)`` of slice ``index``."""
        rows = np.asarray(rows, dtype=np.intp)
        cols = np.asarray(cols, dtype=np.intp)
        out: list[np.ndarray] = [np.empty(0, np.intp)] * len(self.shape)
        r, c = self.plane
        out[r], out[c] = rows, cols
        if self.axis is not None:
            out[self.axis] = np.full(rows.shape, index, dtype=np.intp)
        for a, i in self.fixed:
            out[a] = np.full(rows.shape, i, dtype=np.intp)
        return tuple(out)

"""Which slices of the image the widget works on: the viewer's dims -> a SliceFrame."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_sam._napari._slicing import SliceFrame

__all__ = ["Framing", "spatial_shape"]


def spatial_shape(image: Any) -> tuple[int, ...]:
    """Shape of an image layer's data without the RGB channel axis (level 0 if multiscale)."""
    data = image.data[0] if image.multiscale else image.data
    shape = tuple(data.shape)
    return shape[:-1] if image.rgb else shape


class Framing:
    """Mixin of :class:`~.widget.SamWidget`: the slicing implied by the viewer.

    That is the sliced axis, the displayed plane and the held time point; also the axis
    chooser and the slice-range spin boxes.
    """

    def _layer_axes(self, image: Any) -> tuple[int | None, tuple[int, int] | None]:
        """(sliced axis, displayed plane) of ``image`` from the viewer's dims order.

        (None, None) when the viewer has fewer dims than the image (layers being removed).
        """
        ndim = image.ndim
        if ndim < 3:
            return None, None
        offset = self.viewer.dims.ndim - ndim
        order = [a - offset for a in self.viewer.dims.order if a - offset >= 0]
        if len(order) < 3:
            return None, None
        return order[-3], tuple(sorted(order[-2:]))

    def _data_point(self, image: Any) -> np.ndarray:
        """The viewer's current point in ``image``'s data coordinates.

        Zeros while the viewer has fewer dims than the image.
        """
        if self.viewer.dims.ndim < image.ndim:
            return np.zeros(image.ndim)
        return np.asarray(image.world_to_data(self.viewer.dims.point))

    def frame(self) -> SliceFrame:
        """The slicing of the current image implied by the viewer (axis, plane, time point)."""
        image = self.image_layer
        if image is None:
            raise ValueError("no image layer: open an image first")
        axis, plane = self._layer_axes(image)
        return SliceFrame.for_layer(
            spatial_shape(image), axis, self._data_point(image), plane=plane, rgb=image.rgb
        )

    def current_index(self, frame: SliceFrame | None = None) -> int:
        """The slice under the viewer's slider along the frame's axis."""
        frame = frame or self.frame()
        if frame.axis is None:
            return 0
        point = self._data_point(self.image_layer)
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
            offset = max(self.viewer.dims.ndim - image.ndim, 0)
            names = list(self.viewer.dims.axis_labels)
            for a in range(image.ndim):
                name = str(names[a + offset]) if a + offset < len(names) else ""
                # napari's default axis labels are just negative numbers: not worth showing
                numeric = name.lstrip("-").isdigit() or not name
                self.axis_combo.addItem(f"axis {a}" + ("" if numeric else f" ({name})"), a)
            axis, _ = self._layer_axes(image)
            self.axis_combo.setCurrentIndex(max(self.axis_combo.findData(axis), 0))
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

    def _on_axis_chosen(self, *_: object) -> None:
        """Slice along the chosen axis: make it the last slider (the plane stays displayed)."""
        image, axis = self.image_layer, self.axis_combo.currentData()
        if image is None or axis is None:
            return
        offset = self.viewer.dims.ndim - image.ndim
        order = [a for a in self.viewer.dims.order if a != axis + offset]
        self.viewer.dims.order = (*order[:-2], axis + offset, *order[-2:])

    def _on_dims_order(self, event: object = None) -> None:
        self._sync_axis_combo()
        self._invalidate()

    def _on_step(self, event: object = None) -> None:
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

    def session_geometry(self, frame: SliceFrame) -> dict:
        """Scale, translate and metadata of the 3D volume ``frame`` cuts out of the image.

        With them the session saves labels that line up with the image file.
        """
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

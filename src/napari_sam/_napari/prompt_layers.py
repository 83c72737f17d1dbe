"""napari layers whose contents are SAM prompts.

Each prompt kind is one napari layer wrapped by a :class:`PromptLayer`: it tells its owner when a
prompt was added, moved or removed (napari's past-tense data events, so a rectangle counts once
the mouse is released) and turns its shapes on one slice into SAM's prompt arrays. Coordinates go
world -> the image layer's data coordinates (``data_to_world`` then ``world_to_data``), so layers
with their own scale or translate, and anisotropic volumes, give the right pixels.

- :class:`PointPrompts`: positive and negative clicks in a Points layer; the sign lives in the
  ``sign`` feature ("positive"/"negative"), new points take ``feature_defaults``; T toggles it.
- :class:`BoxPrompts`: rectangles in a Shapes layer are boxes; an ellipse or polygon gives its
  bounding box plus the drawn region as a dense mask prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from skimage.draw import ellipse as draw_ellipse
from skimage.draw import polygon as draw_polygon

from napari_sam._napari._slicing import SliceFrame
from napari_sam.prompts import Prompts

__all__ = ["BoxPrompts", "PointPrompts", "PromptLayer", "Prompts"]

POSITIVE_COLOR = "lime"
NEGATIVE_COLOR = "magenta"
BOX_COLOR = "yellow"
_PAST_TENSE = {"added", "changed", "removed"}


def _from_image_data(layer, image, data: np.ndarray) -> np.ndarray:
    """Data coordinates of ``image`` -> data coordinates of ``layer`` (inverse of
    :func:`_to_image_data`)."""
    out = np.empty((len(data), layer.ndim))
    for i, p in enumerate(np.asarray(data, dtype=float)):
        out[i] = layer.world_to_data(image.data_to_world(p))
    return np.round(out, 6)


def _to_image_data(layer, image, data: np.ndarray) -> np.ndarray:
    """Data coordinates of ``layer`` -> data coordinates of ``image`` (through world space)."""
    out = np.empty((len(data), image.ndim))
    for i, p in enumerate(np.asarray(data, dtype=float)):
        out[i] = image.world_to_data(layer.data_to_world(p))
    # Two affine maps leave float noise (54.99999999); a click on a pixel centre stays on it.
    return np.round(out, 6)


class PromptLayer:
    """Base class: one napari layer holding prompts of one kind.

    Parameters
    ----------
    layer : napari layer
        The layer, already in the viewer, with the image's dimensionality.
    on_change : callable
        Called with ``(self, action)`` after prompts were added, changed or removed.
    """

    def __init__(self, layer, on_change: Callable[[PromptLayer, str], None]) -> None:
        self.layer = layer
        self._on_change = on_change
        layer.events.data.connect(self._on_data)

    def _on_data(self, event) -> None:
        action = str(getattr(event, "action", "changed"))
        if action in _PAST_TENSE:
            self._on_change(self, action)

    def disconnect(self) -> None:
        self.layer.events.data.disconnect(self._on_data)

    def clear(self) -> None:
        """Remove every prompt (one "removed" event)."""
        raise NotImplementedError

    def collect(self, prompts: Prompts, image, frame: SliceFrame, index: int) -> None:
        """Add this layer's prompts on slice ``index`` to ``prompts``."""
        raise NotImplementedError

    def on_slice(self, image, frame: SliceFrame) -> set[int]:
        """The slice indices that hold at least one of this layer's prompts."""
        raise NotImplementedError


class PointPrompts(PromptLayer):
    """Positive and negative clicks in a Points layer (sign in the ``sign`` feature)."""

    @staticmethod
    def make_layer(ndim: int, *, size: float, **geometry):
        from napari.layers import Points

        return Points(
            np.zeros((0, ndim)),
            ndim=ndim,
            name="SAM points",
            features={"sign": np.array([], dtype=object)},
            feature_defaults={"sign": "positive"},
            face_color="sign",
            face_color_cycle={"positive": POSITIVE_COLOR, "negative": NEGATIVE_COLOR},
            border_color="white",
            border_width=0.1,
            size=size,
            **geometry,
        )

    @property
    def positive(self) -> bool:
        """The sign the next point gets."""
        return str(self.layer.feature_defaults["sign"].iloc[0]) == "positive"

    def toggle(self) -> bool:
        """Flip the sign of the points added from now on; return it (True = positive).

        Points already placed keep their sign (a freshly added point is selected in napari, so
        flipping the selection would flip the click just made)."""
        sign = "negative" if self.positive else "positive"
        self.layer.feature_defaults = {"sign": sign}
        self.layer.current_face_color = POSITIVE_COLOR if sign == "positive" else NEGATIVE_COLOR
        return sign == "positive"

    def clear(self) -> None:
        if len(self.layer.data):
            self.layer.selected_data = set(range(len(self.layer.data)))
            self.layer.remove_selected()

    def _located(self, image, frame: SliceFrame):
        coords = _to_image_data(self.layer, image, self.layer.data)
        signs = [str(s) for s in self.layer.features["sign"]] if len(coords) else []
        for p, s in zip(coords, signs):
            where = frame.locate(p)
            if where is not None:
                yield where, s

    def collect(self, prompts: Prompts, image, frame: SliceFrame, index: int) -> None:
        pts, labels = [], []
        for (i, row, col), sign in self._located(image, frame):
            if i == index:
                pts.append((col, row))
                labels.append(1 if sign == "positive" else 0)
        if pts:
            prompts.points = np.concatenate([prompts.points, np.asarray(pts, float)])
            prompts.labels = np.concatenate([prompts.labels, np.asarray(labels, int)])

    def on_slice(self, image, frame: SliceFrame) -> set[int]:
        return {i for (i, _, _), _ in self._located(image, frame)}


class BoxPrompts(PromptLayer):
    """Rectangles (boxes), ellipses and polygons (box + dense mask) in a Shapes layer.

    SAM takes one box per object, so on a slice with several shapes the newest one counts for
    the preview; :meth:`each` gives every shape as its own object. Boxes found by a text
    detector carry their ``phrase`` and ``score`` as features, shown as the shape's text.
    """

    #: feature values of a shape drawn by hand
    NO_TEXT: ClassVar[dict] = {"phrase": "", "score": np.nan, "caption": ""}

    @staticmethod
    def make_layer(ndim: int, **geometry):
        from napari.layers import Shapes

        layer = Shapes(
            ndim=ndim,
            name="SAM boxes",
            edge_color=BOX_COLOR,
            face_color="transparent",
            edge_width=2,
            features={
                "phrase": np.array([], dtype=object),
                "score": np.array([], dtype=float),
                "caption": np.array([], dtype=object),
            },
            feature_defaults=BoxPrompts.NO_TEXT,
            text={"string": "{caption}", "color": BOX_COLOR, "anchor": "upper_left", "size": 8},
            **geometry,
        )
        return layer

    def add_boxes(
        self,
        image: Any,
        frame: SliceFrame,
        index: int,
        boxes: np.ndarray,
        phrases: list[str] | tuple[str, ...],
        scores: np.ndarray,
    ) -> None:
        """Add rectangles on slice ``index`` for ``(N, 4)`` boxes ``x0, y0, x1, y1`` in pixels
        of the slice (the frame :meth:`collect` reads back), captioned ``phrase score``.

        Added in the given order, so the last box is the one the preview shows.
        """
        layer = self.layer
        shapes = []
        for x0, y0, x1, y1 in np.asarray(boxes, float).reshape(-1, 4):
            corners = [(y0, x0), (y0, x1), (y1, x1), (y1, x0)]
            at = np.array([frame.point(index, r, c) for r, c in corners])
            shapes.append(_from_image_data(layer, image, at))
        if not shapes:
            return
        # One add (napari redraws the layer per call), then the new rows' features.
        layer.add(shapes, shape_type="rectangle")
        features = layer.features.copy()
        new = slice(len(features) - len(shapes), None)
        features.loc[features.index[new], "phrase"] = list(phrases)
        features.loc[features.index[new], "score"] = np.asarray(scores, float)
        features.loc[features.index[new], "caption"] = [
            f"{p.rstrip('.')} {float(v):.2f}" if p else "" for p, v in zip(phrases, scores)
        ]
        layer.features = features

    def clear(self) -> None:
        if self.layer.nshapes:
            self.layer.selected_data = set(range(self.layer.nshapes))
            self.layer.remove_selected()

    def _located(self, image, frame: SliceFrame, numbered: bool = False):
        for k, (verts, kind) in enumerate(zip(self.layer.data, self.layer.shape_type)):
            if kind not in ("rectangle", "ellipse", "polygon"):
                continue
            where = [frame.locate(p) for p in _to_image_data(self.layer, image, verts)]
            if any(w is None for w in where) or len({w[0] for w in where}) != 1:
                continue
            rc = np.array([(r, c) for _, r, c in where])
            yield (where[0][0], kind, rc, k) if numbered else (where[0][0], kind, rc)

    def collect(self, prompts: Prompts, image, frame: SliceFrame, index: int) -> None:
        last = None
        for i, kind, rc in self._located(image, frame):
            if i == index:
                last = kind, rc
        if last is not None:
            self._fill(prompts, frame, *last)

    def each(self, image, frame: SliceFrame, index: int) -> list[tuple[Prompts, float]]:
        """Every shape on slice ``index`` as its own prompts (box, and mask for a region) with
        its detector score (NaN for a drawn shape), in the layer's order."""
        scores = self._scores()
        found = []
        for i, kind, rc, k in self._located(image, frame, numbered=True):
            if i == index:
                prompts = Prompts()
                self._fill(prompts, frame, kind, rc)
                found.append((prompts, scores[k]))
        return found

    def _scores(self) -> np.ndarray:
        features = self.layer.features
        n = self.layer.nshapes
        if "score" not in features or len(features) != n:
            return np.full(n, np.nan)
        return np.asarray(features["score"], dtype=float)

    @staticmethod
    def _fill(prompts: Prompts, frame: SliceFrame, kind: str, rc: np.ndarray) -> None:
        h, w = frame.slice_shape
        (r0, c0), (r1, c1) = rc.min(axis=0), rc.max(axis=0)
        prompts.box = np.clip(np.array([c0, r0, c1, r1], float), 0, [w - 1, h - 1, w - 1, h - 1])
        if kind == "rectangle":
            return
        mask = np.zeros((h, w), bool)
        if kind == "ellipse":
            rr, cc = draw_ellipse(
                (r0 + r1) / 2, (c0 + c1) / 2, (r1 - r0) / 2, (c1 - c0) / 2, shape=(h, w)
            )
        else:
            rr, cc = draw_polygon(rc[:, 0], rc[:, 1], shape=(h, w))
        mask[rr, cc] = True
        prompts.mask = mask if mask.any() else None

    def on_slice(self, image, frame: SliceFrame) -> set[int]:
        return {i for i, _, _ in self._located(image, frame)}

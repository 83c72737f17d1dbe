"""Prompts: the one type for SAM's prompts on a slice, and prompts derived from masks.

:class:`Prompts` holds what a user (click, box, drawn region) or a script gives for one object
on one slice; every interface builds one (the widget's prompt layers, the CLI's options and
JSON, scripts) and the engine reads it. A mask from a neighbouring slice (or one painted by the
user) is turned into the prompts SAM understands by :func:`mask_to_mask_input`,
:func:`mask_to_box` and :func:`mask_to_points`, which take a 2D mask at the slice's size,
``True`` (or non-zero) inside. Coordinates follow ``segment_anything``: ``(x, y)`` = (column,
row) in pixels of the slice.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["MASK_LOGIT", "Prompts", "mask_to_box", "mask_to_mask_input", "mask_to_points"]

# Logit of 1 - 1e-3: confident enough to steer the decoder, small enough to stay in the range of
# the decoder's own low-resolution logits (what a previous ``predict`` call would return).
MASK_LOGIT = float(np.log((1 - 1e-3) / 1e-3))


class _Transform(Protocol):
    target_length: int

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]: ...


@dataclass
class Prompts:
    """SAM's prompts for one object on one slice, in that slice's pixel frame.

    Attributes
    ----------
    points : ndarray, shape (N, 2)
        ``(x, y)`` = (column, row) of each click, in pixels.
    labels : ndarray, shape (N,)
        1 for a positive (foreground) click, 0 for a negative one.
    box : ndarray, shape (4,), or None
        ``x0, y0, x1, y1`` in pixels.
    mask : ndarray of bool, shape (H, W), or None
        A drawn region (ellipse, polygon, painted mask), used as a dense prompt.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    box: np.ndarray | None = None
    mask: np.ndarray | None = None

    @classmethod
    def from_clicks(
        cls,
        positive: Sequence[Sequence[float]] = (),
        negative: Sequence[Sequence[float]] = (),
        box: Sequence[float] | None = None,
        mask: np.ndarray | None = None,
    ) -> Prompts:
        """Prompts from lists of ``(x, y)`` clicks (positive first, then negative)."""
        points = np.array([*positive, *negative], dtype=np.float64).reshape(-1, 2)
        labels = np.array([1] * len(positive) + [0] * len(negative), dtype=int)
        return cls(
            points,
            labels,
            None if box is None else np.asarray(box, dtype=np.float64).reshape(4),
            None if mask is None else _as_mask(mask),
        )

    @property
    def empty(self) -> bool:
        """True when there is nothing to segment from."""
        return len(self.points) == 0 and self.box is None and self.mask is None

    @property
    def ambiguous(self) -> bool:
        """Whether the prompts are one click and nothing else: part or whole?

        Then ask SAM for three masks and keep the best (``multimask_output=True``); a box, a
        region or several clicks say enough for one.
        """
        return len(self.points) == 1 and self.box is None and self.mask is None

    def _region_key(self) -> tuple:
        box = None if self.box is None else tuple(np.round(self.box, 3))
        mask = None if self.mask is None else hash(np.packbits(self.mask).tobytes())
        return box, mask

    def key(self) -> tuple:
        """A hashable signature: equal keys mean equal prompts."""
        pts = tuple(map(tuple, np.round(self.points, 3)))
        return (pts, tuple(self.labels.tolist()), *self._region_key())

    def extends(self, other: Prompts) -> bool:
        """Whether these prompts are ``other`` plus more clicks (nothing moved or removed).

        Then the mask SAM gave for ``other`` is a sound dense prompt for these.
        """
        n = len(other.points)
        if len(self.points) <= n or self._region_key() != other._region_key():
            return False
        return Prompts(self.points[:n], self.labels[:n], self.box, self.mask).key() == other.key()

    def predict_kwargs(
        self, transform: _Transform, original_size: tuple[int, int]
    ) -> dict[str, Any]:
        """Keywords of :meth:`SamPredictor.predict <napari_sam.predictor.SamPredictor.predict>`.

        ``point_coords``, ``point_labels``, ``box`` and ``mask_input`` for these prompts; a drawn
        region becomes the dense prompt (:func:`mask_to_mask_input`) at the predictor's
        ``transform`` and the slice's ``original_size`` ``(H, W)``.
        """
        has_points = len(self.points) > 0
        mask_input = None
        if self.mask is not None:
            mask_input = mask_to_mask_input(self.mask, transform, original_size)
        return {
            "point_coords": self.points if has_points else None,
            "point_labels": self.labels if has_points else None,
            "box": self.box,
            "mask_input": mask_input,
        }


def _as_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2D array (rows, columns), got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def mask_to_mask_input(
    mask: np.ndarray, transform: _Transform, original_size: tuple[int, int]
) -> np.ndarray:
    """Turn a binary mask into SAM's dense prompt (low-resolution logits).

    The mask goes through the same geometry as the image: resized to ``transform.input_size``,
    zero-padded bottom/right to ``S x S`` (``S = transform.target_length``), then reduced to
    ``L x L`` (``L = S / 4``) by averaging 4 x 4 blocks. The block average is the exact inverse
    of the predictor's bilinear ``L -> S`` upscaling grid (``align_corners=False``), so the
    prompt lines up with the masks the predictor returns. Blocks at least half inside become
    ``+MASK_LOGIT``, the others ``-MASK_LOGIT``.

    Parameters
    ----------
    mask : (H, W) array
        Non-zero inside. Must have the slice's size.
    transform : ResizeLongestSide or StretchResize
        The predictor's transform (``predictor.transform``).
    original_size : (int, int)
        ``(H, W)`` of the slice the mask belongs to.

    Returns
    -------
    (1, L, L) float32 ndarray
        Pass it as ``mask_input`` to ``SamPredictor.predict`` (or batch it for
        ``predict_torch``).
    """
    mask = _as_mask(mask)
    original_size = (int(original_size[0]), int(original_size[1]))
    if mask.shape != original_size:
        raise ValueError(
            f"mask shape {mask.shape} does not match the slice size {original_size}; "
            "pass the mask of the whole slice"
        )
    side = int(transform.target_length)
    if side % 4:
        raise ValueError(f"the transform's target length must be a multiple of 4, got {side}")
    h, w = transform.input_size(original_size)
    # Resizing is separable, so resize + pad + block average is one small banded operator per
    # axis: the same numbers as doing it on the image, without the S x S intermediate.
    box = mask_to_box(mask)
    out = np.full((1, side // 4, side // 4), -MASK_LOGIT, dtype=np.float32)
    if box is None:
        return out
    c0, r0, c1, r1 = (int(v) for v in box)
    # Pixels outside the box add nothing, and cells that read none of it stay outside: only
    # the box is read and only the cells it reaches are computed.
    rows = _resample_operator(original_size[0], int(h), side)
    cols = _resample_operator(original_size[1], int(w), side)
    i0, i1 = int(rows.first_out[r0]), int(rows.last_out[r1]) + 1
    j0, j1 = int(cols.first_out[c0]), int(cols.last_out[c1]) + 1
    crop = torch.from_numpy(np.ascontiguousarray(mask[r0 : r1 + 1, c0 : c1 + 1], np.float32))
    across = _apply_banded(rows, crop, r0, i0, i1)  # cells' rows x crop columns
    fraction = _apply_banded(cols, across.T, c0, j0, j1).T  # cells' rows x cells' columns
    # +-MASK_LOGIT written in place (a quarter of the time of np.where's float64 detour).
    cells = torch.from_numpy(out)[0, i0:i1, j0:j1]
    torch.mul(fraction >= 0.5, 2 * MASK_LOGIT, out=cells).sub_(MASK_LOGIT)
    return out


class _Operator(NamedTuple):
    """A banded ``(n_out, n_in)`` resampling operator and its band."""

    matrix: torch.Tensor
    first_out: np.ndarray  # per input: the first and last output reading it
    last_out: np.ndarray
    first_in: np.ndarray  # per output: the first and last input it reads
    last_in: np.ndarray


@functools.lru_cache(maxsize=16)
def _resample_operator(n_in: int, n_out: int, side: int) -> _Operator:
    """The ``(side / 4, n_in)`` operator: resize ``n_in -> n_out`` samples as the image is
    resized (bilinear, antialiased when shrinking), zero-pad to ``side``, average blocks of 4.

    Memoised (a pure function of three integers, read-only results): every slice of a volume
    has the same size.
    """
    weights = torch.eye(n_in)
    if n_out != n_in:
        weights = F.interpolate(
            weights[None, None],
            size=(n_out, n_in),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0, 0]
    weights = F.pad(weights, (0, 0, 0, side - n_out))
    matrix = weights.reshape(side // 4, 4, n_in).mean(dim=1)
    nonzero = (matrix != 0).numpy()

    def first_last(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return a.argmax(axis=0), len(a) - 1 - a[::-1].argmax(axis=0)

    return _Operator(matrix, *first_last(nonzero), *first_last(nonzero.T))


_CHUNK = 64  # outputs per product: each chunk reads only its band of inputs


def _apply_banded(op: _Operator, x: torch.Tensor, lo: int, start: int, stop: int) -> torch.Tensor:
    """``op.matrix[start:stop, lo:lo + len(x)] @ x``, chunk by chunk of outputs, each product
    over only the inputs its outputs read (a dense product would multiply mostly zeros)."""
    out = x.new_zeros(stop - start, x.shape[1])
    hi = lo + len(x)
    for a in range(start, stop, _CHUNK):
        b = min(a + _CHUNK, stop)
        u, v = max(int(op.first_in[a]), lo), min(int(op.last_in[b - 1]) + 1, hi)
        if u < v:
            torch.mm(op.matrix[a:b, u:v], x[u - lo : v - lo], out=out[a - start : b - start])
    return out


def mask_to_box(mask: np.ndarray) -> np.ndarray | None:
    """Bounding box of a mask as ``[x0, y0, x1, y1]``, or ``None`` when the mask is empty.

    ``x1, y1`` are the last column and row inside the mask (inclusive), as in
    ``segment_anything``'s automatic mask generator; the prompt encoder then places the corners
    on pixel centres.

    Returns
    -------
    (4,) float32 ndarray or None
    """
    mask = _as_mask(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def mask_to_points(mask: np.ndarray, n: int = 1) -> np.ndarray:
    """Up to ``n`` points deep inside a mask, farthest from its boundary first.

    Greedy maxima of the Euclidean distance transform (pixels outside the slice count as
    background): take the deepest pixel, suppress a disc around it whose radius is half its
    distance to the boundary, repeat. Points therefore spread over the mask and over its
    components, deepest first, and stay as far from the boundary as the spreading allows.

    Parameters
    ----------
    mask : (H, W) array
    n : int
        Number of points wanted (>= 1).

    Returns
    -------
    (k, 2) float32 ndarray
        ``(x, y)`` pixel coordinates, ``k <= n`` (fewer when the mask is too small, 0 when empty).
    """
    mask = _as_mask(mask)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    box = mask_to_box(mask)
    if box is None:
        return np.zeros((0, 2), np.float32)
    # Only the bounding box matters: the nearest background pixel of any pixel inside it lies
    # in the box or in the one-pixel ring around it (the padding).
    c0, r0, c1, r1 = (int(v) for v in box)
    crop = mask[r0 : r1 + 1, c0 : c1 + 1]
    depth = ndimage.distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]
    rows, cols = np.indices(crop.shape, sparse=True)
    points = []
    for _ in range(n):
        r, c = divmod(int(np.argmax(depth)), crop.shape[1])
        radius = depth[r, c]
        if radius <= 0:
            break
        points.append((c + c0, r + r0))
        depth[(rows - r) ** 2 + (cols - c) ** 2 < max(radius / 2, 1.0) ** 2] = 0
    return np.array(points, dtype=np.float32).reshape(-1, 2)

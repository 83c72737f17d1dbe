"""Simulated prompts: the clicks and boxes a user would give.

(Dense prompts from a neighbouring slice's mask use :func:`napari_sam.prompts.mask_to_mask_input`,
the very conversion propagation uses.)

All functions work on boolean masks in one pixel frame (training uses the encoder's ``S``-frame)
and return coordinates ``(x, y)`` in pixels of that frame, as the prompt encoder expects them.
Following SAM's training recipe: the first prompt is a point inside the object or a noisy box;
later clicks fall in the error region of the previous prediction, positive where the object was
missed and negative where too much was taken.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_sam.prompts import mask_to_box

__all__ = ["correction_click", "interior_point", "jittered_box", "random_point"]


def _pick_weighted(rng: np.random.Generator, weights: np.ndarray) -> tuple[int, int]:
    """Index ``(row, col)`` drawn with probability proportional to ``weights``."""
    flat = weights.ravel().astype(np.float64)
    total = flat.sum()
    if total <= 0:
        raise ValueError("cannot sample a point from an empty region")
    index = int(rng.choice(flat.size, p=flat / total))
    return divmod(index, weights.shape[1])


def random_point(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A point drawn uniformly among the pixels of ``mask``: ``(x, y)`` float array."""
    row, col = _pick_weighted(rng, mask)
    return np.array([col, row], dtype=np.float32)


def interior_point(
    rng: np.random.Generator, mask: np.ndarray, min_depth: float = 0.3
) -> np.ndarray:
    """A point well inside ``mask``, as a person clicks on an object.

    Drawn uniformly among pixels whose distance to the outline is at least ``min_depth`` times
    the largest such distance.
    """
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return random_point(rng, depth >= min_depth * depth.max())


def jittered_box(
    rng: np.random.Generator,
    mask: np.ndarray,
    noise: float = 0.1,
    max_shift: float = 20.0,
    frame: tuple[int, int] | None = None,
) -> np.ndarray:
    """The mask's box with each side moved by Gaussian noise, as SAM's training did.

    Parameters
    ----------
    noise : float
        Standard deviation of each shift as a fraction of the box's side length.
    max_shift : float
        Largest shift of a side, in pixels.
    frame : (int, int), optional
        ``(H, W)`` to clip the box to (default: the mask's shape).
    """
    box = mask_to_box(mask)
    if box is None:
        raise ValueError("cannot draw a box around an empty mask")
    h, w = frame or mask.shape
    side = np.array([box[2] - box[0], box[3] - box[1]] * 2, dtype=np.float32) + 1
    shift = np.clip(rng.normal(0, noise, 4) * side, -max_shift, max_shift)
    out = box + shift.astype(np.float32)
    out[[0, 2]] = np.clip(np.sort(out[[0, 2]]), 0, w - 1)
    out[[1, 3]] = np.clip(np.sort(out[[1, 3]]), 0, h - 1)
    return out


def correction_click(
    rng: np.random.Generator, prediction: np.ndarray, truth: np.ndarray
) -> tuple[np.ndarray, int] | None:
    """Next click of a user correcting ``prediction`` towards ``truth``.

    The click lands in the error region, drawn with probability proportional to the distance to
    the region's edge (people click inside a wrong area, not on its rim). Its label is 1 where
    the object was missed and 0 where background was taken.

    Returns
    -------
    ((x, y) float array, label) or None when the prediction is already exact.
    """
    error = prediction != truth
    if not error.any():
        return None
    depth = ndimage.distance_transform_edt(np.pad(error, 1))[1:-1, 1:-1]
    row, col = _pick_weighted(rng, depth)
    return np.array([col, row], dtype=np.float32), int(truth[row, col])

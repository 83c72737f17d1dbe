"""Sample data: the MNI152 T1 brain MRI (packaged) and a synthetic CT phantom in HU.

Both come with NIfTI geometry in ``metadata["nifti"]``, so labels drawn on them save correctly.
"""

from __future__ import annotations

import importlib.resources
from typing import Any

import numpy as np

from napari_sam.io.nifti import from_image, image_from_display, read_nifti

from .reader import layer_data

__all__ = ["PHANTOM_LABELS", "ct_phantom", "make_ct_phantom", "mni152_t1"]

MNI152_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"

#: Label values of :func:`make_ct_phantom`'s ground truth.
PHANTOM_LABELS: dict[str, int] = {
    "body": 1,  # soft tissue and fat not covered by an organ below
    "right_lung": 2,
    "left_lung": 3,
    "spine": 4,
    "liver": 5,
    "lesion": 6,
}

# Hounsfield units of the phantom's tissues.
_AIR, _FAT, _SOFT, _LUNG, _BONE, _LIVER = -1000, -100, 40, -800, 700, 60
_LESIONS = (  # (w, u, v) centre, radius mm, HU; see make_ct_phantom for the coordinates
    ((0.72, -0.42, -0.12), 9.0, 120),  # hyperdense liver lesion
    ((0.82, -0.25, 0.18), 6.0, 10),  # hypodense liver lesion
    ((0.25, 0.45, -0.10), 5.0, 30),  # lung nodule (left lung)
)


def mni152_t1() -> list[tuple[Any, dict[str, Any], str]]:
    """The MNI ICBM152 2009a T1 template (197 x 233 x 189, 1 mm), as an image layer."""
    resource = importlib.resources.files("napari_sam._napari") / "data" / MNI152_T1
    with importlib.resources.as_file(resource) as path:
        volume = read_nifti(path)
    volume.name = "MNI152 T1"
    return [layer_data(volume)]


def make_ct_phantom(
    shape: tuple[int, int, int] = (64, 256, 256),
    spacing: tuple[float, float, float] = (2.5, 0.7, 0.7),
    seed: int = 0,
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """A synthetic chest/abdomen CT in Hounsfield units with its ground-truth labels.

    Parameters
    ----------
    shape : (int, int, int)
        Volume shape ``(Z, Y, X)`` in the display orientation: axis 0 runs head to feet,
        axial slices have anterior at the top and the patient's right on the left.
    spacing : (float, float, float)
        Voxel size in mm along the same axes.
    seed : int
        Seed of the image noise (Gaussian, 10 HU); the anatomy itself is fixed.

    Returns
    -------
    volume : ndarray of int16, shape ``shape``
        HU values: air -1000, fat -100, soft tissue 40, lungs -800, spine 700, liver 60 and
        three lesions (two in the liver, one lung nodule), plus noise, clipped to [-1024, 3071].
    spacing : tuple of float
        The voxel size, as given.
    labels : ndarray of uint8, shape ``shape``
        Ground truth, values as in :data:`PHANTOM_LABELS` (0 is air).

    Notes
    -----
    Anatomy is laid out in fractions of the field of view, so any shape and spacing give the
    same picture: the lungs taper towards their apex at the top and end on domed bases, the
    liver (on the patient's right, the left of the screen) sits under the right dome and
    tapers downwards, the spine runs through all slices.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (Z, Y, X), got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive sizes in mm, got {spacing}")
    nz, ny, nx = shape
    sz, sy, sx = (float(s) for s in spacing)
    # w: 0 at the top slice, 1 at the bottom; u, v: -1..1 across the slice (u to the
    # patient's left, v to posterior), all at voxel centres.
    w = ((np.arange(nz) + 0.5) / nz)[:, None, None]
    v = ((np.arange(ny) + 0.5) / ny * 2 - 1)[None, :, None]
    u = ((np.arange(nx) + 0.5) / nx * 2 - 1)[None, None, :]
    half_y, half_x = ny * sy / 2, nx * sx / 2

    def ellipse(cu: float, cv: float, ru: Any, rv: Any) -> np.ndarray:
        return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0

    def radial(cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
        return np.clip(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2, 0.0, 1.0)

    full = np.ones(shape, dtype=bool)
    body = full & ellipse(0.0, 0.0, 0.9, 0.65)
    inner = full & ellipse(0.0, 0.0, 0.82, 0.57)
    # Lungs: narrow at the apex (top), widest at a third of the way down, ending on a dome
    # (the diaphragm) that bulges up in the middle; the liver fills the right dome.
    taper = np.sqrt(np.clip(1.0 - ((w - 0.32) / 0.3) ** 2, 0.0, 1.0))
    right_dome = 0.52 - 0.1 * (1.0 - radial(-0.42, -0.05, 0.3, 0.4))
    left_dome = 0.56 - 0.08 * (1.0 - radial(0.42, -0.05, 0.3, 0.4))
    right_lung = ellipse(-0.42, -0.05, 0.28 * taper + 1e-6, 0.38 * taper + 1e-6) & (w < right_dome)
    left_lung = ellipse(0.42, -0.05, 0.28 * taper + 1e-6, 0.38 * taper + 1e-6) & (w < left_dome)
    spine = full & ellipse(0.0, 0.45, 0.11 * half_y / half_x, 0.11)
    liver_taper = np.sqrt(np.clip(1.0 - ((w - 0.62) / 0.36) ** 2, 0.0, 1.0))
    liver = (
        ellipse(-0.35, 0.0, 0.42 * liver_taper + 1e-6, 0.44 * liver_taper + 1e-6)
        & (w >= right_dome)
        & inner
        & ~spine
    )

    labels = np.zeros(shape, dtype=np.uint8)
    volume = np.full(shape, _AIR, dtype=np.float32)
    volume[body] = _FAT
    volume[inner] = _SOFT
    labels[body] = PHANTOM_LABELS["body"]
    for mask, hu, name in (
        (right_lung, _LUNG, "right_lung"),
        (left_lung, _LUNG, "left_lung"),
        (spine, _BONE, "spine"),
        (liver, _LIVER, "liver"),
    ):
        volume[mask] = hu
        labels[mask] = PHANTOM_LABELS[name]
    zz = w * nz * sz
    yy = (v + 1) * half_y
    xx = (u + 1) * half_x
    for (cw, cu, cv), radius, hu in _LESIONS:
        centre = (cw * nz * sz, (cv + 1) * half_y, (cu + 1) * half_x)
        mask = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2
        volume[mask] = hu
        labels[mask] = PHANTOM_LABELS["lesion"]

    rng = np.random.default_rng(seed)
    volume += rng.normal(0.0, 10.0, size=shape).astype(np.float32)
    volume = np.clip(np.rint(volume), -1024, 3071).astype(np.int16)
    return volume, (sz, sy, sx), labels


def ct_phantom() -> list[tuple[Any, dict[str, Any], str]]:
    """The synthetic CT phantom as an image layer (soft-tissue window, NIfTI geometry)."""
    volume, spacing, _ = make_ct_phantom()
    # Centre the field of view on the world origin, as scanners roughly do.
    translate = tuple(-(n - 1) * s / 2 for n, s in zip(volume.shape, spacing))
    nifti = from_image(image_from_display(volume, spacing, translate), name="CT phantom")
    return [layer_data(nifti)]  # CT in HU: contrast limits at the soft-tissue window

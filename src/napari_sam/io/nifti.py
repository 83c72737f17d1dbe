"""Read NIfTI volumes in a display orientation and write labels back exactly.

Display convention
------------------
Every volume is shown with its array axes pointing to **inferior, posterior, left**
(orientation codes ``("I", "P", "L")``):

- axis 0 runs from the top of the head towards the feet, so napari's slider walks through
  axial slices;
- an axial slice (axes 1, 2) has anterior at the top and the patient's right on the left of the
  screen: the radiological convention of CT and MRI viewers;
- rolling the dimensions gives the usual coronal (head up, patient's right on the left) and
  sagittal (head up, anterior on the left) views, and the axis triple is right-handed, so napari's
  3D view shows the anatomy unmirrored.

World coordinates of a displayed voxel are millimetres along these axes,
``translate + scale * index``, i.e. ``(-z, -y, -x)`` of its RAS+ scanner position. They are exact
for images whose voxel axes follow the scanner axes; oblique images are shown on their closest
canonical grid (no resampling), and their true geometry lives in ``metadata["nifti"]``.

Saving labels undoes the display transform and reuses the source header byte for byte (affine,
qform and sform with their codes, units), with only the data type, shape, scaling and intent
changed, so the labels line up with the image in any NIfTI reader.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt_mod
from nibabel.arrayproxy import ArrayProxy

from napari_sam.io.atomic import atomic_path

__all__ = [
    "DISPLAY_AXES",
    "NIFTI_SUFFIXES",
    "NiftiError",
    "NiftiVolume",
    "from_image",
    "image_from_display",
    "is_nifti_path",
    "label_dtype",
    "nifti_stem",
    "nifti_suffix",
    "open_nifti",
    "read_nifti",
    "write_labels",
]

DISPLAY_AXES: tuple[str, str, str] = ("I", "P", "L")
#: The file endings of NIfTI files, longest first (matched case-insensitively).
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# NIfTI intent codes 3000-3099 are reserved for CIFTI-2 (connectivity, dense series, ...).
_CIFTI_INTENTS = range(3000, 3100)


class NiftiError(ValueError):
    """A file that is not a readable NIfTI-1/2 image (corrupt, CIFTI, unsupported layout)."""


@dataclass
class NiftiVolume:
    """One NIfTI image ready for display.

    Attributes
    ----------
    data : ndarray
        ``(Z, Y, X)`` for 3D images in the display orientation (see the module docstring),
        ``(T, Z, Y, X)`` for a 4D series read without ``volume=``, ``(Y, X)`` for 2D images,
        with a trailing channel axis of 3 (or 4) when ``rgb`` is true.
    scale : tuple of float
        Voxel size along each displayed axis in mm (1.0 for a time axis).
    translate : tuple of float
        World position (mm, display axes) of the first voxel's centre (0.0 for a time axis).
    metadata : dict
        ``{"nifti": {...}}``: everything :func:`write_labels` needs to restore the file's
        geometry (original affine, header bytes, orientation transform, codes, dtype, shape).
    rgb : bool
        True for RGB(A) NIfTI; the channel axis is last.
    name : str
        File name without its NIfTI suffix.
    """

    data: np.ndarray
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    rgb: bool = False
    name: str = ""


def nifti_suffix(path: str | os.PathLike) -> str | None:
    """``".nii.gz"`` or ``".nii"`` when ``path`` ends so (any case), else None."""
    name = Path(path).name.lower()
    return next((suffix for suffix in NIFTI_SUFFIXES if name.endswith(suffix)), None)


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True when ``path`` ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return nifti_suffix(path) is not None


def nifti_stem(path: str | os.PathLike) -> str:
    """The file name without its NIfTI suffix (``ct.nii.gz`` -> ``ct``); other names whole."""
    name = Path(path).name
    suffix = nifti_suffix(name)
    return name[: -len(suffix)] if suffix else name


def open_nifti(path: str | os.PathLike) -> nib.Nifti1Image | nib.Nifti2Image:
    """Open a NIfTI file lazily (header only) and refuse what :func:`read_nifti` cannot read.

    Raises
    ------
    NiftiError
        Missing file, wrong suffix, unreadable header, CIFTI-2, other formats, or an
        uncompressed file shorter than its header says (truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise NiftiError(f"{path} does not exist or is not a file")
    if not is_nifti_path(path):
        raise NiftiError(f"{path} is not a NIfTI file: expected a .nii or .nii.gz file")
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for broken files
        raise NiftiError(f"cannot read {path} as NIfTI: {exc}") from exc
    if isinstance(img, nib.Cifti2Image) or (
        isinstance(img, nib.Nifti1Image | nib.Nifti2Image)
        and int(img.header["intent_code"]) in _CIFTI_INTENTS
    ):
        raise NiftiError(
            f"{path} is a CIFTI-2 file (surface/grayordinate data), not a volume; "
            "open it with a CIFTI tool such as Connectome Workbench"
        )
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise NiftiError(f"{path} is a {type(img).__name__}, not a single-file NIfTI-1/2 image")
    if nifti_suffix(path) == ".nii":
        header = img.header
        expected = int(header["vox_offset"]) + header.get_data_dtype().itemsize * int(
            np.prod(img.shape)
        )
        if path.stat().st_size < expected:
            raise NiftiError(
                f"{path} is truncated: the header needs {expected} bytes, the file has "
                f"{path.stat().st_size}"
            )
    return img


def _orientation(affine: np.ndarray) -> np.ndarray:
    """File voxel axes -> closest RAS+ axes; degenerate (zero) axes keep their own index."""
    ornt = ornt_mod.io_orientation(affine)
    missing = np.isnan(ornt[:, 0])
    if missing.any():
        # A zero column in the affine says nothing about direction: give such axes the unused
        # world axes in order, unflipped, so the volume still displays.
        free = [a for a in range(3) if a not in ornt[~missing, 0]]
        ornt[missing] = [[a, 1] for a in free]
    return ornt


def _to_display_transform(affine: np.ndarray) -> np.ndarray:
    return ornt_mod.ornt_transform(_orientation(affine), ornt_mod.axcodes2ornt(DISPLAY_AXES))


def _display_geometry(display_affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The napari scale and translate of the display grid (world axes I, P, L in mm)."""
    target = ornt_mod.axcodes2ornt(DISPLAY_AXES)
    scale, translate = [], []
    for k in range(3):
        norm = float(np.linalg.norm(display_affine[:3, k]))
        scale.append(norm if norm > 0 else 1.0)
        ras_axis, sign = int(target[k, 0]), target[k, 1]
        translate.append(float(sign * display_affine[ras_axis, 3]))
    return tuple(scale), tuple(translate)


def _slope_inter(img: nib.Nifti1Image) -> tuple[float, float]:
    """Scaling applied on read (nibabel moves scl_slope/inter from the header to the proxy)."""
    proxy = img.dataobj
    if isinstance(proxy, ArrayProxy):  # what nib.is_proxy means for a NIfTI image
        return float(proxy.slope), float(proxy.inter)
    return 1.0, 0.0  # an in-memory array holds final values


def _read_voxels(img: nib.Nifti1Image, volume: int | None) -> tuple[np.ndarray, float, float]:
    """Voxel array in file order and the scaling still to apply to it (slope, intercept)."""
    proxy = img.dataobj
    if volume is not None:
        # Slicing reads only this volume, already scaled (float64 if scaling applies).
        return np.asarray(proxy[:, :, :, volume]), 1.0, 0.0
    slope, inter = _slope_inter(img)
    return (
        np.asarray(proxy.get_unscaled() if isinstance(proxy, ArrayProxy) else proxy),
        slope,
        inter,
    )


def _materialise(view: np.ndarray, slope: float, inter: float, scaled: bool) -> np.ndarray:
    """Contiguous copy of a reoriented view, cast and scaled in one pass.

    Scaled data becomes float32, scaled in place: a 512 x 512 x 300 CT never exists as float64.
    """
    dtype = np.dtype(np.float32) if scaled else view.dtype.newbyteorder("=")
    out = np.empty(view.shape, dtype=dtype)
    np.copyto(out, view, casting="unsafe")
    if slope != 1.0:
        out *= np.float32(slope)
    if inter != 0.0:
        out += np.float32(inter)
    return out


def _unpack_rgb(raw: np.ndarray) -> np.ndarray:
    names = raw.dtype.names or ()
    channels = [raw[name] for name in names]
    return np.stack(channels, axis=-1).astype(np.uint8, copy=False)


def from_image(
    img: nib.Nifti1Image | nib.Nifti2Image,
    *,
    volume: int | None = None,
    name: str | None = None,
    path: str | os.PathLike | None = None,
) -> NiftiVolume:
    """Bring an in-memory NIfTI image into the display orientation.

    Parameters
    ----------
    img : Nifti1Image or Nifti2Image
        The image (a loaded file or one built in memory).
    volume : int, optional
        For 4D images, the index of the volume to read; None keeps the whole series with time as
        the first display axis.
    name : str, optional
        Layer name; defaults to the file name without suffix.
    path : path-like, optional
        The file the image came from (recorded in the metadata).

    Returns
    -------
    NiftiVolume

    Raises
    ------
    NiftiError
        On unsupported layouts (more than 4 dimensions, complex voxels, a bad ``volume``).
    """
    header = img.header
    file_shape = tuple(int(n) for n in img.shape)
    ndim = len(file_shape)
    # Trailing singleton dimensions (e.g. dim 5 of size 1) carry no data.
    while ndim > 3 and file_shape[ndim - 1] == 1 and (ndim > 4 or volume is None):
        ndim -= 1
    if ndim > 4:
        raise NiftiError(
            f"images with {len(file_shape)} dimensions {file_shape} are not supported: "
            "expected a 2D, 3D or 4D (time series) image"
        )
    if ndim < 2:
        raise NiftiError(f"image shape {file_shape} is not an image: expected 2 to 4 dimensions")
    n_volumes = file_shape[3] if len(file_shape) >= 4 else 1
    if volume is not None:
        if ndim < 4 and len(file_shape) < 4:
            raise NiftiError(f"volume={volume} given but the image is {ndim}D, not a 4D series")
        if not -n_volumes <= volume < n_volumes:
            raise NiftiError(f"volume={volume} is out of range: the series has {n_volumes} volumes")
        volume %= n_volumes
    elif len(file_shape) >= 4 and ndim == 3:
        volume = 0  # a 4D file holding a single volume

    on_disk = img.get_data_dtype()
    if on_disk.kind == "c":
        raise NiftiError(f"complex voxel data ({on_disk}) is not supported")
    rgb = on_disk.names is not None
    raw, slope, inter = _read_voxels(img, volume)
    raw = raw.reshape(file_shape[:3] if volume is not None else file_shape[:ndim])
    if rgb:
        raw = _unpack_rgb(raw)
    spatial_ndim = 3 if ndim >= 3 else 2
    if spatial_ndim == 2:
        raw = raw[:, :, np.newaxis, ...]  # 2D: treat as one slice, squeeze after reorienting

    affine = np.asarray(img.affine, dtype=np.float64)
    transform = _to_display_transform(affine)
    spatial_shape = raw.shape[:3]
    data = ornt_mod.apply_orientation(raw, transform)
    display_affine = affine @ ornt_mod.inv_ornt_aff(transform, spatial_shape)
    scale, translate = _display_geometry(display_affine)
    display_shape = tuple(int(n) for n in data.shape[:3])

    squeeze_axis = None
    if spatial_ndim == 2:
        squeeze_axis = int(transform[2, 0])
        data = np.squeeze(data, axis=squeeze_axis)
        keep = [k for k in range(3) if k != squeeze_axis]
        scale = tuple(scale[k] for k in keep)
        translate = tuple(translate[k] for k in keep)
        display_shape = tuple(display_shape[k] for k in keep)

    time_first = ndim == 4 and volume is None
    if time_first:
        data = np.moveaxis(data, 3, 0)
        scale = (1.0, *scale)
        translate = (0.0, *translate)
    file_slope, file_inter = _slope_inter(img)
    data = _materialise(data, slope, inter, scaled=file_slope != 1.0 or file_inter != 0.0)

    qform_code = int(header["qform_code"])
    sform_code = int(header["sform_code"])
    meta = {
        "path": None if path is None else str(Path(path).resolve()),
        "format": "nifti2" if isinstance(img, nib.Nifti2Image) else "nifti1",
        "header": bytes(header.binaryblock),
        "affine": affine,
        "display_affine": display_affine,
        "display_axes": DISPLAY_AXES,
        "ornt": transform,
        "qform_code": qform_code,
        "sform_code": sform_code,
        "dtype": on_disk.str if not rgb else str(on_disk),
        "shape": file_shape,
        "scl_slope": file_slope,
        "scl_inter": file_inter,
        "volume": None if volume is None else int(volume),
        "n_volumes": n_volumes,
        "time_first": time_first,
        "squeeze_axis": squeeze_axis,
        "display_shape": display_shape,
        "rgb": rgb,
    }
    if name is None:
        name = nifti_stem(path) if path is not None else "image"
    return NiftiVolume(
        data=data,
        scale=tuple(float(s) for s in scale),
        translate=tuple(float(t) for t in translate),
        metadata={"nifti": meta},
        rgb=rgb,
        name=name,
    )


def read_nifti(path: str | os.PathLike, *, volume: int | None = None) -> NiftiVolume:
    """Read a NIfTI-1/2 file (``.nii`` or ``.nii.gz``) in the display orientation.

    Parameters
    ----------
    path : path-like
        The file.
    volume : int, optional
        For 4D series, the volume to read (negative indices count from the end). Without it the
        whole series is read with time as display axis 0.

    Returns
    -------
    NiftiVolume
        ``data`` keeps the on-disk dtype (native byte order) unless the header scales the
        values (``scl_slope``/``scl_inter``), in which case it is float32.

    Raises
    ------
    NiftiError
        For missing, corrupt or truncated files, CIFTI-2 files and unsupported layouts.
    """
    img = open_nifti(path)
    try:
        return from_image(img, volume=volume, path=path)
    except NiftiError:
        raise
    except Exception as exc:  # truncated or corrupt voxel data
        raise NiftiError(f"cannot read the voxel data of {path}: {exc}") from exc


def label_dtype(max_label: int) -> np.dtype:
    """Smallest of uint8, uint16, int32 that stores labels up to ``max_label`` exactly."""
    if max_label < 0:
        raise ValueError(f"labels must be >= 0, got {max_label}")
    for dtype in (np.uint8, np.uint16, np.int32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label {max_label} does not fit in int32, the largest NIfTI label type")


def _check_labels(labels: np.ndarray) -> tuple[np.ndarray, np.dtype]:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer or boolean array, got dtype {labels.dtype}")
    if labels.size == 0:
        raise ValueError("labels array is empty")
    low = int(labels.min())
    if low < 0:
        raise ValueError(f"labels must be >= 0, found {low}; NIfTI label maps use 0 as background")
    dtype = label_dtype(int(labels.max()))
    return labels.astype(dtype, copy=False), dtype


def _nifti_meta(metadata: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if not metadata:
        return None
    if "nifti" in metadata:
        return metadata["nifti"]
    if "header" in metadata and "ornt" in metadata:
        return metadata
    return None


def _labels_to_file(labels: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """Undo the display transform of :func:`from_image` on a labels array."""
    display_shape = tuple(meta["display_shape"])
    series_shape = (meta["n_volumes"], *display_shape)
    if meta.get("time_first") and labels.shape == series_shape:
        labels = np.moveaxis(labels, 0, -1)  # one label map per volume: time back to last
    elif labels.shape != display_shape:
        expected = f"{display_shape}"
        if meta.get("time_first"):
            expected += f" (or {series_shape} for one label map per volume)"
        raise ValueError(
            f"labels shape {labels.shape} does not match the source image: expected {expected}; "
            "create the labels layer with the image's shape"
        )
    if meta.get("squeeze_axis") is not None:
        labels = np.expand_dims(labels, int(meta["squeeze_axis"]))
    arr = ornt_mod.apply_orientation(labels, _inverse(np.asarray(meta["ornt"])))
    if meta.get("squeeze_axis") is not None:
        arr = arr[:, :, 0, ...]
    return arr


def _inverse(transform: np.ndarray) -> np.ndarray:
    """Inverse of an orientation transform (display axes -> file axes)."""
    inv = np.empty_like(transform)
    for src_axis, (dst_axis, flip) in enumerate(transform):
        inv[int(dst_axis)] = [src_axis, flip]
    return inv


def _image_from_meta(labels: np.ndarray, meta: Mapping[str, Any]) -> nib.Nifti1Image:
    header_class = nib.Nifti2Header if meta["format"] == "nifti2" else nib.Nifti1Header
    image_class = nib.Nifti2Image if meta["format"] == "nifti2" else nib.Nifti1Image
    header = header_class(binaryblock=meta["header"])
    arr = _labels_to_file(labels, meta)
    # affine=None keeps the header's qform and sform (matrices and codes) exactly as on disk.
    img = image_class(arr, None, header=header)
    return img


def image_from_display(
    data: np.ndarray,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
) -> nib.Nifti1Image:
    """Build a RAS+ NIfTI image from an array in the display orientation.

    The inverse of the display convention: ``data`` axes are (I, P, L) (or (P, L) for 2D, or
    time first for 4D), and world coordinates are ``translate + scale * index`` in mm along those
    axes. Used for layers that did not come from a NIfTI file; qform and sform are both set, with
    code 2 ("aligned"), because their relation to a scanner is unknown.

    Parameters
    ----------
    data : ndarray
        2D, 3D or 4D (time first) array.
    scale, translate : sequence of float, optional
        napari layer scale and translate (one entry per axis of ``data``); default 1 and 0.

    Returns
    -------
    Nifti1Image
    """
    data = np.asarray(data)
    if data.ndim not in (2, 3, 4):
        raise ValueError(f"expected a 2D, 3D or 4D (time first) array, got shape {data.shape}")
    # Arrays from here on (the arguments are sequences).
    scale_mm = np.ones(data.ndim) if scale is None else np.asarray(scale, dtype=np.float64)
    shift_mm = np.zeros(data.ndim) if translate is None else np.asarray(translate, np.float64)
    if scale_mm.shape != (data.ndim,) or shift_mm.shape != (data.ndim,):
        raise ValueError(
            f"scale and translate need {data.ndim} values (one per axis of {data.shape}), "
            f"got {scale_mm.tolist()} and {shift_mm.tolist()}"
        )
    if np.any(scale_mm <= 0):
        raise ValueError(f"scale must be positive, got {scale_mm.tolist()}")
    if data.ndim == 4:
        data = np.moveaxis(data, 0, -1)
        scale_mm, shift_mm = scale_mm[1:], shift_mm[1:]
    flat = data.ndim == 2
    if flat:
        data = data[np.newaxis]
        scale_mm = np.concatenate([[1.0], scale_mm])
        shift_mm = np.concatenate([[0.0], shift_mm])
    # Display voxel index -> RAS mm: display axis k runs along -RAS axis (2 - k).
    display_affine = np.zeros((4, 4))
    display_affine[3, 3] = 1.0
    target = ornt_mod.axcodes2ornt(DISPLAY_AXES)
    for k in range(3):
        ras_axis, sign = int(target[k, 0]), target[k, 1]
        display_affine[ras_axis, k] = sign * scale_mm[k]
        display_affine[ras_axis, 3] = sign * shift_mm[k]
    to_ras = ornt_mod.ornt_transform(target, ornt_mod.axcodes2ornt(("R", "A", "S")))
    spatial_shape = data.shape[:3]
    arr = ornt_mod.apply_orientation(data, to_ras)
    affine = display_affine @ ornt_mod.inv_ornt_aff(to_ras, spatial_shape)
    if flat:
        arr = arr[:, :, 0]  # a 2D layer stays a 2D file (its axial slice lies in R-A)
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=2)
    img.header.set_sform(affine, code=2)
    return img


def write_labels(
    path: str | os.PathLike,
    labels: np.ndarray,
    metadata: Mapping[str, Any] | None = None,
    *,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    overwrite: bool = True,
) -> Path:
    """Save a labels array as NIfTI in the geometry of the image it was drawn on.

    Parameters
    ----------
    path : path-like
        Output file ending in ``.nii`` or ``.nii.gz`` (the latter is gzip-compressed).
    labels : ndarray of int or bool
        Labels in the display orientation, shaped like the source image's display data (for a
        4D source: its 3D shape, or the full ``(T, Z, Y, X)`` for one label map per volume).
        Values must be >= 0.
    metadata : mapping, optional
        The source layer's metadata (``{"nifti": {...}}`` from :func:`read_nifti`) or the inner
        ``"nifti"`` dict. Without it the file gets an affine built from ``scale`` and
        ``translate`` (see :func:`image_from_display`).
    scale, translate : sequence of float, optional
        Layer geometry, used only when ``metadata`` carries no NIfTI geometry.
    overwrite : bool
        If False and ``path`` exists, raise FileExistsError instead of replacing it.

    Returns
    -------
    Path
        The written file.

    Notes
    -----
    The source header is reused as read (affine, qform/sform and their codes, units, pixdim);
    the voxel type is the smallest of uint8, uint16 or int32 that holds the largest label, the
    intent is set to ``label``, ``scl_slope``/``scl_inter`` to 1/0 and ``cal_min``/``cal_max``
    to the label range. The file is written to a temporary name in the same folder and moved
    into place, so an interrupted save never leaves a half-written file under ``path``.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise ValueError(f"cannot save labels to {path.name!r}: use a .nii or .nii.gz file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    labels, dtype = _check_labels(labels)

    meta = _nifti_meta(metadata)
    if meta is not None:
        img = _image_from_meta(labels, meta)
    else:
        img = image_from_display(labels, scale, translate)
    header = img.header
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    header.set_intent("label")
    header["cal_min"] = 0
    header["cal_max"] = int(labels.max())

    # The temporary name keeps the NIfTI suffix: nibabel decides on gzip from the file name.
    with atomic_path(path, suffix=nifti_suffix(path) or ".nii") as tmp:
        nib.save(img, tmp)
    return path

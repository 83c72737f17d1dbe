"""napari reader: NIfTI volumes with their geometry (``*.nii``, ``*.nii.gz``).

napari's builtin reader also claims ``.nii`` but cannot read it; pick this plugin explicitly:
``viewer.open(path, plugin="napari-sam-volumes")``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from napari_sam.intensity import make_window
from napari_sam.io.nifti import NiftiError, NiftiVolume, is_nifti_path, open_nifti, read_nifti

__all__ = ["get_reader", "layer_data", "read_layers"]

LayerData = tuple[Any, dict[str, Any], str]
PathLike = str | os.PathLike


def _paths(path: PathLike | Sequence[PathLike]) -> list[str] | None:
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths or not all(is_nifti_path(p) for p in paths):
        return None
    return [os.fspath(p) for p in paths]


def _readable(path: str) -> bool:
    try:
        open_nifti(path)
    except NiftiError:
        return False
    return True


def layer_data(volume: NiftiVolume) -> LayerData:
    """An image layer data tuple for one :class:`~napari_sam.io.nifti.NiftiVolume`.

    Contrast limits follow :func:`napari_sam.intensity.make_window` in ``"auto"`` mode: the
    soft-tissue window for CT in HU, 0.5/99.5 percentiles of non-zero voxels for MR.
    """
    kwargs: dict[str, Any] = {
        "name": volume.name,
        "scale": volume.scale,
        "translate": volume.translate,
        "metadata": volume.metadata,
        "rgb": volume.rgb,
    }
    if not volume.rgb and volume.data.dtype != bool:
        window = make_window(volume.data, "auto")
        kwargs["contrast_limits"] = (window.low, window.high)
    return volume.data, kwargs, "image"


def read_layers(path: PathLike | Sequence[PathLike]) -> list[LayerData]:
    """Read one or more NIfTI files into napari image layer data tuples."""
    paths = _paths(path)
    if paths is None:
        raise NiftiError(f"{path} is not a .nii/.nii.gz file or list of them")
    return [layer_data(read_nifti(p)) for p in paths]


def get_reader(path: PathLike | Sequence[PathLike]) -> Callable[..., list[LayerData]] | None:
    """The napari reader hook: a reader function for NIfTI volumes, None for anything else.

    Never raises: files that are not NIfTI, corrupt or truncated files and CIFTI-2 files give
    None so napari can try another reader.
    """
    try:
        paths = _paths(path)
        if paths is None or not all(_readable(p) for p in paths):
            return None
    except Exception:  # a reader hook must never raise
        return None
    return read_layers

"""napari writer: a labels layer as NIfTI in the geometry of the image it was drawn on.

The geometry comes from ``layer.metadata["nifti"]``. A labels layer created in napari from a NIfTI
image does not inherit the image's metadata: the SAM widget copies it onto the labels layers it
creates; for your own layers do ``labels.metadata["nifti"] = image.metadata["nifti"]``. Without
it the file gets an affine built from the layer's scale and translate.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from napari_sam.io.nifti import is_nifti_path
from napari_sam.io.nifti import write_labels as write_labels_file

__all__ = ["write_labels"]


def write_labels(path: str | os.PathLike, data: Any, attributes: dict[str, Any]) -> list[str]:
    """The napari single-layer writer for labels layers.

    Parameters
    ----------
    path : path-like
        Target ending in ``.nii`` or ``.nii.gz``.
    data : array-like
        The labels layer's data (display orientation).
    attributes : dict
        Layer attributes from napari (``metadata``, ``scale``, ``translate``, ...).

    Returns
    -------
    list of str
        The written path.
    """
    if not is_nifti_path(path):
        raise ValueError(
            f"the NIfTI labels writer saves .nii or .nii.gz files, not {os.fspath(path)!r}; "
            "add one of those extensions"
        )
    if attributes.get("multiscale"):
        data = data[0]  # the full-resolution level
    written = write_labels_file(
        path,
        np.asarray(data),
        attributes.get("metadata") or {},
        scale=attributes.get("scale"),
        translate=attributes.get("translate"),
    )
    return [os.fspath(written)]

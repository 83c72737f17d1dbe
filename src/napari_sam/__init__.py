"""Segment Anything (SAM) for napari, built for CT and MRI volumes.

The public API is a drop-in for Meta's ``segment_anything``::

    from napari_sam import sam_model_registry, SamPredictor, SamAutomaticMaskGenerator

plus :func:`load_model` and the volume scripting API :class:`VolumeSession`. Names are imported
lazily so that napari can read this plugin's manifest without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "sam_model_registry": "napari_sam.weights",
    "build_sam": "napari_sam.weights",
    "Sam": "napari_sam.models.sam",
    "SamPredictor": "napari_sam.predictor",
    "SamAutomaticMaskGenerator": "napari_sam.automatic",
    "load_model": "napari_sam.weights",
    "ModelSpec": "napari_sam.registry",
    "MODELS": "napari_sam.registry",
    "VolumeSession": "napari_sam.volume.session",
    "segment_text": "napari_sam.text",
}

__all__ = [
    "MODELS",
    "ModelSpec",
    "Sam",
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "VolumeSession",
    "build_sam",
    "load_model",
    "sam_model_registry",
    "segment_text",
]

if TYPE_CHECKING:  # pragma: no cover
    from napari_sam.automatic import SamAutomaticMaskGenerator
    from napari_sam.models.sam import Sam
    from napari_sam.predictor import SamPredictor
    from napari_sam.registry import MODELS, ModelSpec
    from napari_sam.text import segment_text
    from napari_sam.volume.session import VolumeSession
    from napari_sam.weights import build_sam, load_model, sam_model_registry


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_sam' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))

"""The widget's doorway into the engine: what to offer (models, devices, windows) and the parts.

:class:`Backend` is the :class:`~napari_sam.volume.parts.SessionParts` of the widget's
:class:`~napari_sam.volume.session.VolumeSession` (how it makes predictors and caches, decodes,
propagates) plus what only the widget needs: the model chooser's entries, downloads, devices,
speeds, intensity windows. Renamed engine functions are reconnected here and nowhere else, and
tests hand the widget a backend with a fake model or a slow encoder. Nothing here touches Qt or
napari; the widget calls the heavy methods (``load_model``, ``download``, ``make_window``) and
the session's model work from worker threads only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_sam.volume.parts import SessionParts

__all__ = ["Backend", "ModelOption", "WindowOption"]

# Order of preference for the model preselected when several are cached: accuracy per second
# on a laptop CPU (vit_h takes a minute per slice there).
_PREFERRED = ("vit_b", "vit_t", "vit_l", "vit_h", "medsam_vit_b")


@dataclass(frozen=True)
class ModelOption:
    """One entry of the model chooser."""

    source: Any  # registry name, checkpoint path, or a model object
    label: str
    cached: bool
    downloadable: bool
    size_bytes: int | None = None


@dataclass(frozen=True)
class WindowOption:
    """One entry of the intensity-window chooser."""

    label: str
    mode: str


def _megabytes(n: int | None) -> str:
    return "unknown size" if n is None else f"{n / 1e6:,.0f} MB"


class Backend(SessionParts):
    """Default bindings to the engine modules (imported lazily: napari reads the manifest
    without importing torch). ``everything_options``: see :class:`SessionParts`."""

    # -- models and weights -------------------------------------------------------------------

    def model_options(self) -> list[ModelOption]:
        """Registry models with their status ("cached" / "will download N MB, licence")."""
        from napari_sam import weights
        from napari_sam.registry import MODELS

        options = []
        for name in sorted(MODELS, key=lambda n: _PREFERRED.index(n) if n in _PREFERRED else 99):
            spec = MODELS[name]
            if spec.test_fixture:
                continue  # never offered: it knows only synthetic shapes
            cached = weights.is_cached(name)
            if cached:
                status = "cached"
            elif spec.downloadable:
                status = f"will download {_megabytes(spec.size_bytes)}, {spec.license}"
            else:
                status = "supply the file (Checkpoint…)"
            options.append(
                ModelOption(name, f"{name} — {status}", cached, spec.downloadable, spec.size_bytes)
            )
        return options

    def download(
        self,
        name: str,
        progress_callback: Callable[[int, int | None], None],
        cancel: Callable[[], bool],
    ) -> Path:
        from napari_sam import weights

        return weights.download(
            name, progress=False, progress_callback=progress_callback, cancel=cancel
        )

    def is_cancelled_error(self, exc: BaseException) -> bool:
        from napari_sam import weights

        return isinstance(exc, weights.DownloadCancelled)

    def devices(self) -> list[str]:
        import torch

        found = ["auto", "cpu"]
        if torch.cuda.is_available():
            found.append("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            found.append("mps")
        return found

    def speeds(self) -> list[tuple[str, str]]:
        """(label, precision) choices; the first is the default."""
        from napari_sam.speed import capabilities

        found = [("Fast", "auto"), ("Exact", "exact")]
        if capabilities("cpu").int8:
            found.append(("int8 (approximate)", "int8"))
        return found

    def load_model(self, source: Any, device: str, precision: str = "exact"):
        """A registry name (not downloaded here: the widget asks first), a checkpoint path, or
        an already built model; run at ``precision`` (see :func:`napari_sam.speed.with_precision`).
        """
        from napari_sam import weights
        from napari_sam.speed import is_fast, with_precision

        if not isinstance(source, (str, Path)):
            if is_fast(source):  # already made fast by its owner: used as is
                return source
            return with_precision(source, precision)
        model = weights.load_model(source, device=device, download=False)
        return with_precision(model, precision)

    def model_name(self, model) -> str:
        spec = getattr(model, "spec", None)
        return getattr(spec, "name", type(model).__name__)

    # -- intensity ----------------------------------------------------------------------------

    def window_options(self) -> list[WindowOption]:
        try:
            from napari_sam.intensity import CT_PRESETS
        except ImportError:  # pragma: no cover - the intensity module is part of the package
            presets = {}
        else:
            presets = CT_PRESETS
        options = [WindowOption("Auto (CT soft tissue or MR percentiles)", "auto")]
        for name, value in presets.items():
            width, level = (value.width, value.level) if hasattr(value, "width") else value
            title = name.replace("_", " ")
            options.append(WindowOption(f"CT {title} ({width:g}/{level:g})", name))
        options += [
            WindowOption("MR percentiles 0.5–99.5 %", "percentile"),
            WindowOption("Min–max of the volume", "minmax"),
            WindowOption("napari contrast limits", "contrast_limits"),
        ]
        return options

    def make_window(self, volume, mode: str, contrast_limits=None, rgb: bool = False):
        """One window for the whole volume (None for 8-bit RGB, which SAM takes as is)."""
        if rgb and np.asarray(volume[:1]).dtype == np.uint8:
            return None
        from napari_sam.intensity import make_window

        if mode == "contrast_limits":
            low, high = contrast_limits
            return make_window(volume, "contrast_limits", limits=(float(low), float(high)))
        return make_window(volume, mode)

    # -- embeddings --------------------------------------------------------------------------

    def cache_dir(self) -> Path | None:
        from napari_sam.volume.embeddings import default_cache_dir

        return default_cache_dir()

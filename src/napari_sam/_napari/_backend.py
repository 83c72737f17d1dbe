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

import importlib.util
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_sam.volume.parts import SessionParts, is_sam2

__all__ = ["DETECTOR_CHOICES", "Backend", "ModelOption", "WindowOption"]

#: (label, :func:`napari_sam.text.load_detector` source) of the detector chooser; a folder
#: written by ``save_pretrained`` can be added.
DETECTOR_CHOICES = (("Grounding DINO tiny", "grounding-dino-tiny"), ("OWLv2", "owlv2"))

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
    without importing torch). ``everything_options``: see :class:`SessionParts`.

    Attributes
    ----------
    remote_timeout : float
        Seconds a remote encoder waits for the scheduler and for one slice.
    """

    remote_timeout = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._detectors: dict[tuple[str, str], Any] = {}
        self._detector_lock = threading.Lock()

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

    # -- the session's parts: SAM 2 models get Sam2Parts' (image predictor, features, tracking)

    def make_predictor(self, model: Any) -> Any:
        """The prompt decoder of ``model`` (SAM 2: its image predictor)."""
        sam2 = _sam2_parts(model)
        return super().make_predictor(model) if sam2 is None else sam2.make_predictor(model)

    def make_cache(self, model: Any, *args: Any, **options: Any) -> Any:
        """The embedding cache of a volume (SAM 2: its feature cache); arguments as in
        :meth:`SessionParts.make_cache`."""
        sam2 = _sam2_parts(model)
        if sam2 is None:
            return super().make_cache(model, *args, **options)
        return sam2.make_cache(model, *args, **options)

    def embed(self, cache: Any, predictor: Any, index: int) -> None:
        """Put slice ``index``'s embedding (SAM 2: features) into the predictor."""
        sam2 = _sam2_parts(predictor.model)
        if sam2 is None:
            super().embed(cache, predictor, index)
        else:
            sam2.embed(cache, predictor, index)

    def mask_prompt(self, predictor: Any, mask: np.ndarray) -> np.ndarray:
        """A drawn mask as the predictor's dense prompt."""
        sam2 = _sam2_parts(predictor.model)
        if sam2 is None:
            return super().mask_prompt(predictor, mask)
        return sam2.mask_prompt(predictor, mask)

    def propagate(
        self,
        cache: Any,
        predictor: Any,
        seeds: Any,
        **options: Any,
    ) -> Any:
        """SAM 1: slice-to-slice propagation; SAM 2: tracking with the model's memory."""
        sam2 = _sam2_parts(predictor.model)
        if sam2 is None:
            return super().propagate(cache, predictor, seeds, **options)
        return sam2.propagate(cache, predictor, seeds, **options)

    def segment_everything(self, cache: Any, model: Any, index: int) -> Any:
        """SAM's automatic masks (SAM 2 models refuse with a message)."""
        sam2 = _sam2_parts(model)
        if sam2 is None:
            return super().segment_everything(cache, model, index)
        return sam2.segment_everything(cache, model, index)

    # -- optional extras ---------------------------------------------------------------------

    def text_unavailable(self) -> str | None:
        """Why text prompts cannot be used here (the install command), or None."""
        from napari_sam.text.detectors import INSTALL_HINT

        return None if _importable("transformers") else INSTALL_HINT

    def cluster_unavailable(self) -> str | None:
        """Why remote encoding cannot be used here (the install command), or None."""
        from napari_sam.cluster import INSTALL_HINT

        return None if _importable("distributed") else INSTALL_HINT

    # -- text detectors ----------------------------------------------------------------------

    def detector_thresholds(self, source: str) -> tuple[float, float]:
        """``(box_threshold, text_threshold)`` defaults of the detector ``source`` (a short
        name, or a folder whose ``config.json`` names its model type)."""
        from napari_sam.text.detectors import DETECTORS, GroundingDinoDetector

        cls = DETECTORS[source][0] if source in DETECTORS else GroundingDinoDetector
        config = Path(source) / "config.json"
        if source not in DETECTORS and config.is_file():
            try:
                model_type = json.loads(config.read_text()).get("model_type")
            except (OSError, ValueError):
                model_type = None
            by_type = {c.model_type: c for c, _ in DETECTORS.values()}
            cls = by_type.get(model_type, cls)
        return cls.default_box_threshold, cls.default_text_threshold

    def detector(self, source: str, device: str):
        """The text detector ``source`` on ``device``, loaded once and kept (worker threads)."""
        key = (str(source), str(device))
        with self._detector_lock:
            found = self._detectors.get(key)
            if found is None:
                from napari_sam.text import load_detector

                found = self._detectors[key] = load_detector(source, device=device)
            return found

    def has_detector(self, source: str, device: str) -> bool:
        """Whether :meth:`detector` would answer without loading."""
        return (str(source), str(device)) in self._detectors


def _sam2_parts(model: Any) -> SessionParts | None:
    """Sam2Parts for a SAM 2 model, None for the others (stateless: made per call)."""
    if not is_sam2(model):
        return None
    from napari_sam.volume.sam2_parts import Sam2Parts

    return Sam2Parts()


def _importable(name: str) -> bool:
    # find_spec does not import the package (transformers takes seconds); a None entry in
    # sys.modules (a blocked import) counts as missing.
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False

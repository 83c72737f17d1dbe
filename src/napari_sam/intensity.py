"""Intensity windows: any scan dtype -> the 8-bit RGB slices SAM expects.

SAM was trained on 8-bit photographs. A CT in Hounsfield units or a 12-bit MRI has to be mapped
to 0..255 first, and the mapping decides what the model can see. This module makes that mapping
explicit as a :class:`Window` (a linear ramp from ``low`` to ``high``, clipped), chosen once per
volume so that neighbouring slices encode consistently, and named by :meth:`Window.key` in the
embedding cache.

Windows come from CT presets (width/level in HU), percentiles of the whole volume (MR), the volume's
range, napari's contrast limits, or MedSAM's published preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CT_PRESETS",
    "PERCENTILE_SAMPLE_SIZE",
    "WINDOW_MODES",
    "Window",
    "contrast_limits_window",
    "ct_window",
    "looks_like_ct",
    "make_window",
    "medsam_ct_window",
    "medsam_mr_window",
    "minmax_window",
    "parse_window",
    "percentile_window",
    "resolve_window",
    "to_rgb_uint8",
]

#: CT windows as (width, level) in Hounsfield units.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
    "mediastinum": (350.0, 50.0),
    "liver": (150.0, 30.0),
}

#: Percentiles are computed on at most this many voxels (a deterministic stride through the
#: volume in memory order); a 512 x 512 x 300 CT is sampled every 19th voxel.
PERCENTILE_SAMPLE_SIZE = 1 << 22

#: Modes understood by :func:`make_window` besides the CT preset names.
WINDOW_MODES = (
    "auto",
    "percentile",
    "minmax",
    "contrast_limits",
    "custom",
    "medsam_ct",
    "medsam_mr",
)

# A volume whose range reaches both air (-1000 HU) and bone or contrast is treated as CT.
_CT_MIN_HU = -500.0
_CT_MAX_HU = 300.0


@dataclass(frozen=True)
class Window:
    """Linear intensity window ``low -> 0``, ``high -> 255``, clipped outside.

    Parameters
    ----------
    low, high : float
        Values mapped to 0 and 255; ``high`` must be greater than ``low``.
    keep_zero : bool
        Map voxels that are exactly 0 to 0 whatever the window (MedSAM's MR preprocessing keeps
        the background of skull-stripped images black).
    """

    low: float
    high: float
    keep_zero: bool = False

    def __post_init__(self) -> None:
        low, high = float(self.low), float(self.high)
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError(f"window bounds must be finite, got low={low}, high={high}")
        if high <= low:
            raise ValueError(f"window high ({high}) must be greater than low ({low})")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @classmethod
    def from_width_level(cls, width: float, level: float) -> Window:
        """The window ``level - width / 2 .. level + width / 2`` (radiology convention)."""
        if width <= 0:
            raise ValueError(f"window width must be positive, got {width}")
        return cls(level - width / 2.0, level + width / 2.0)

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def level(self) -> float:
        return (self.low + self.high) / 2.0

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Map ``array`` (any real dtype, any shape) to uint8 of the same shape.

        ``v -> (clip(v, low, high) - low) / (high - low) * 255``, truncated to an integer as
        MedSAM's preprocessing does, so ``low`` and below give 0, ``high`` and above give 255;
        NaN gives 0. Computed in float64, one slice at a time for volumes.
        """
        array = np.asarray(array)
        if array.dtype.kind not in "biuf":
            raise ValueError(f"cannot window an array of dtype {array.dtype}: expected numbers")
        out = np.empty(array.shape, dtype=np.uint8)
        if array.ndim >= 3:
            for index in range(array.shape[0]):
                out[index] = self._apply_chunk(array[index])
        else:
            out[...] = self._apply_chunk(array)
        return out

    def _apply_chunk(self, chunk: np.ndarray) -> np.ndarray:
        work = np.clip(chunk.astype(np.float64), self.low, self.high)
        work -= self.low
        work /= self.high - self.low
        work *= 255.0
        np.nan_to_num(work, copy=False, nan=0.0)
        out = work.astype(np.uint8)
        if self.keep_zero:
            out[chunk == 0] = 0
        return out

    def key(self) -> str:
        """A string naming this window exactly, for cache keys."""
        text = f"window[{self.low!r},{self.high!r}]"
        return text + "z" if self.keep_zero else text


def ct_window(name_or_width: str | float, level: float | None = None) -> Window:
    """A CT window from a preset name or from width and level in HU.

    Parameters
    ----------
    name_or_width : str or float
        A key of :data:`CT_PRESETS` (case-insensitive; spaces and hyphens read as underscores),
        or the window width in HU.
    level : float, optional
        Window level (centre) in HU; required when a width is given.

    Examples
    --------
    >>> ct_window("lung")
    Window(low=-1350.0, high=150.0, keep_zero=False)
    >>> ct_window(400, 40) == ct_window("soft tissue")
    True
    """
    if isinstance(name_or_width, str):
        key = name_or_width.strip().lower().replace(" ", "_").replace("-", "_")
        if key not in CT_PRESETS:
            raise ValueError(
                f"unknown CT window {name_or_width!r}; choose one of {sorted(CT_PRESETS)} "
                "or give a width and level in HU"
            )
        if level is not None:
            raise ValueError("give either a preset name or a width and level, not both")
        width, level = CT_PRESETS[key]
        return Window.from_width_level(width, level)
    if level is None:
        raise ValueError(f"a window width ({name_or_width}) needs a level too: ct_window(w, level)")
    return Window.from_width_level(float(name_or_width), float(level))


def _sample(volume: np.ndarray) -> np.ndarray:
    """The volume's finite values, strided down to at most PERCENTILE_SAMPLE_SIZE voxels."""
    flat = np.asarray(volume).reshape(-1)
    step = -(-flat.size // PERCENTILE_SAMPLE_SIZE)
    if step > 1:
        flat = flat[::step]
    if flat.dtype.kind == "f":
        flat = flat[np.isfinite(flat)]
    return flat


def _nondegenerate(low: float, high: float) -> Window:
    # A constant volume still needs a valid window: it then encodes as uniformly black.
    if not high > low:
        high = low + 1.0
    return Window(low, high)


def percentile_window(
    volume: np.ndarray, low: float = 0.5, high: float = 99.5, nonzero: bool = True
) -> Window:
    """Window from percentiles of the whole volume (the usual choice for MRI).

    Parameters
    ----------
    volume : ndarray
        The whole volume (all slices), so that every slice gets the same window.
    low, high : float
        Percentiles in [0, 100], ``low < high``.
    nonzero : bool
        Ignore voxels equal to 0 (background outside the body or a brain mask), unless all
        voxels are 0.

    Notes
    -----
    Volumes over :data:`PERCENTILE_SAMPLE_SIZE` voxels are sampled with a fixed stride, which is
    deterministic and within a fraction of a grey level of the exact percentiles on scans.
    NaN and infinite voxels are ignored.
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    values = _sample(volume)
    if nonzero:
        kept = values[values != 0]
        values = kept if kept.size else values
    if values.size == 0:
        raise ValueError("the volume has no finite values to compute a window from")
    lo, hi = np.percentile(values, [low, high])
    return _nondegenerate(float(lo), float(hi))


def _finite_range(volume: np.ndarray) -> tuple[float, float]:
    """Exact minimum and maximum over the finite values of ``volume``."""
    volume = np.asarray(volume)
    if volume.size == 0:
        raise ValueError("the volume is empty")
    if volume.dtype.kind != "f":
        return float(volume.min()), float(volume.max())
    with np.errstate(invalid="ignore"):
        lo, hi = float(np.nanmin(volume)), float(np.nanmax(volume))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        finite = volume[np.isfinite(volume)]  # rare: only volumes holding inf or all NaN
        if finite.size == 0:
            raise ValueError("the volume has no finite values to compute a window from")
        lo, hi = float(finite.min()), float(finite.max())
    return lo, hi


def minmax_window(volume: np.ndarray) -> Window:
    """Window spanning the finite minimum to the finite maximum of the whole volume."""
    return _nondegenerate(*_finite_range(volume))


def contrast_limits_window(limits: Sequence[float]) -> Window:
    """Window equal to napari contrast limits ``(low, high)``."""
    if len(limits) != 2:
        raise ValueError(f"contrast limits are two numbers (low, high), got {limits!r}")
    return Window(float(limits[0]), float(limits[1]))


def medsam_ct_window(volume: np.ndarray | None = None) -> Window:
    """MedSAM's CT preprocessing: level 40, width 400 HU, clipped, scaled to 0..255.

    MedSAM min-max scales the *clipped* volume, so when the volume does not reach both ends of
    the window the effective window is narrower; pass ``volume`` to reproduce that exactly.
    """
    window = ct_window("soft_tissue")
    if volume is None:
        return window
    lo, hi = _finite_range(volume)
    return _nondegenerate(max(window.low, lo), min(window.high, hi))


def medsam_mr_window(volume: np.ndarray) -> Window:
    """MedSAM's MR preprocessing: 0.5/99.5 percentiles of non-zero voxels, zeros stay zero."""
    window = percentile_window(volume, 0.5, 99.5, nonzero=True)
    return Window(window.low, window.high, keep_zero=True)


def looks_like_ct(volume: np.ndarray) -> bool:
    """True when the values look like Hounsfield units.

    The range must reach air and bone or contrast (min <= -500 and max >= 300), and at least
    0.5 % of the voxels must be air or lung (<= -500 HU): processed MR images sometimes hold a
    few large negative values, but never a fraction of air-like voxels below their tissue.
    """
    volume = np.asarray(volume)
    if volume.dtype.kind not in "if" or volume.size == 0:
        return False
    try:
        lo, hi = _finite_range(volume)
    except ValueError:
        return False
    if not (lo <= _CT_MIN_HU and hi >= _CT_MAX_HU):
        return False
    return bool(np.percentile(_sample(volume), 0.5) <= _CT_MIN_HU)


def make_window(volume: np.ndarray | None, mode: str = "auto", **kw: float) -> Window:
    """One window for a whole volume, chosen by name (used by the widget, CLI and session).

    Parameters
    ----------
    volume : ndarray or None
        The whole volume; may be None for modes that do not look at the data (presets,
        ``"custom"``, ``"contrast_limits"``, ``"medsam_ct"``).
    mode : str
        ``"auto"``: uint8 -> identity 0..255, bool -> 0..1, CT-looking data
        (:func:`looks_like_ct`) -> the ``soft_tissue`` preset, anything else -> percentiles
        0.5/99.5 of the non-zero voxels. A :data:`CT_PRESETS` name -> that preset.
        ``"percentile"`` (kw ``low``, ``high``, ``nonzero``), ``"minmax"``,
        ``"contrast_limits"`` (kw ``limits``), ``"custom"`` (kw ``low``, ``high``),
        ``"medsam_ct"``, ``"medsam_mr"``.
    **kw
        Mode parameters as listed.

    Returns
    -------
    Window
    """
    key = _mode_key(mode)
    if key in CT_PRESETS:
        return ct_window(key)
    if key == "custom":
        if "low" not in kw or "high" not in kw:
            raise ValueError("mode 'custom' needs low= and high=")
        return Window(kw["low"], kw["high"])
    if key == "contrast_limits":
        if "limits" not in kw:
            raise ValueError("mode 'contrast_limits' needs limits=(low, high)")
        return contrast_limits_window(kw["limits"])
    if key == "medsam_ct":
        return medsam_ct_window(volume)
    if key not in WINDOW_MODES:
        raise _unknown_mode(mode)
    if volume is None:
        raise ValueError(f"window mode {mode!r} needs the volume")
    volume = np.asarray(volume)
    if key == "percentile":
        return percentile_window(volume, **kw)
    if key == "minmax":
        return minmax_window(volume)
    if key == "medsam_mr":
        return medsam_mr_window(volume)
    # auto
    if volume.dtype == np.uint8:
        return Window(0.0, 255.0)
    if volume.dtype == bool:
        return Window(0.0, 1.0)
    if looks_like_ct(volume):
        return ct_window("soft_tissue")
    return percentile_window(volume)


def _mode_key(mode: str) -> str:
    return mode.strip().lower().replace(" ", "_").replace("-", "_")


def _unknown_mode(mode: str) -> ValueError:
    return ValueError(
        f"unknown window mode {mode!r}; choose one of {[*WINDOW_MODES, *sorted(CT_PRESETS)]} "
        "or give LOW,HIGH"
    )


def parse_window(text: str) -> str | Window:
    """Read a window written as text (a command-line ``--window``, a settings field).

    Parameters
    ----------
    text : str
        ``"LOW,HIGH"`` (two numbers, HIGH > LOW), or a mode name of :func:`make_window`
        (``"auto"``, a :data:`CT_PRESETS` name, ``"percentile"``, ``"minmax"``, ...).

    Returns
    -------
    Window or str
        The window for ``"LOW,HIGH"``; the mode name, checked, for a name (the window itself
        needs the volume: :func:`resolve_window`).

    Raises
    ------
    ValueError
        Not two numbers, HIGH not above LOW, or an unknown mode name.
    """
    if "," in text:
        try:
            low, high = (float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"expected LOW,HIGH (two numbers), got {text!r}") from None
        if not high > low:
            raise ValueError(f"HIGH must be greater than LOW in {text!r}")
        return Window(low, high)
    key = _mode_key(text)
    if key not in CT_PRESETS and key not in WINDOW_MODES:
        raise _unknown_mode(text)
    return text


def resolve_window(
    volume: np.ndarray | None, window: str | Window | Sequence[float] | None, **kw: float
) -> Window | None:
    """The one :class:`Window` any way of naming a window stands for.

    Parameters
    ----------
    volume : ndarray or None
        The whole volume, for modes that look at the data.
    window : str, Window, (low, high) or None
        Text as :func:`parse_window` reads it (``"LOW,HIGH"`` or a mode name), a Window, or
        two bounds. None stays None (8-bit RGB needs no window; caches use ``"auto"``).
    **kw
        Mode parameters of :func:`make_window` (``limits=`` for ``"contrast_limits"``, ...).

    Returns
    -------
    Window or None
    """
    if window is None or isinstance(window, Window):
        return window
    if isinstance(window, str):
        parsed = parse_window(window)
        return parsed if isinstance(parsed, Window) else make_window(volume, parsed, **kw)
    if isinstance(window, Sequence) and len(window) == 2:
        return Window(float(window[0]), float(window[1]))
    raise ValueError(f"window must be a mode name, a Window or (low, high), got {window!r}")


def to_rgb_uint8(image: np.ndarray, window: Window | None = None) -> np.ndarray:
    """One slice (or an RGB image) as the ``H x W x 3`` uint8 RGB array SAM encodes.

    Parameters
    ----------
    image : ndarray
        ``H x W`` grayscale, ``H x W x 1``, or ``H x W x 3`` / ``H x W x 4`` colour (alpha is
        dropped).
    window : Window, optional
        The volume's window. Without one, uint8 passes through unchanged, bool maps to 0/255 and
        other dtypes are stretched over this image's own range (fine for a single picture; for
        volumes pass a window so all slices share it).

    Returns
    -------
    ndarray of uint8, shape (H, W, 3)
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., :3]
    elif image.ndim != 2:
        raise ValueError(
            f"expected an H x W grayscale or H x W x 3/4 colour image, got shape {image.shape}; "
            "pass one slice of a volume"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has an empty side: shape {image.shape}")
    if window is not None:
        out = window.apply(image)
    elif image.dtype == np.uint8:
        out = image
    elif image.dtype == bool:
        out = image.astype(np.uint8) * np.uint8(255)
    else:
        out = minmax_window(image).apply(image)
    if out.ndim == 2:
        out = np.repeat(out[..., np.newaxis], 3, axis=-1)
    return np.ascontiguousarray(out)

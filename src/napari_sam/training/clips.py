"""Clips of consecutive slices for training SAM 2's memory: one object followed slice by slice.

A clip is what SAM 2 trains on: ``T`` frames in walking order (a walk down a volume is the
reversed clip), the first of which gets the prompt, and the object's true mask on every frame
(empty where the walk has left the object, so the object-score head learns to stop). Frames are
windowed exactly as :class:`~napari_sam.volume.sam2_features.FeatureCache` windows a volume at
inference: one automatic window per volume, then 8-bit RGB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_sam.intensity import make_window, to_rgb_uint8
from napari_sam.training.synthetic import SceneConfig, ellipsoid_volume

__all__ = ["Clip", "SyntheticClips"]


@dataclass
class Clip:
    """One object walked through ``T`` consecutive slices.

    Attributes
    ----------
    frames : ndarray, shape (T, H, W, 3), uint8
        The slices in walking order, windowed to 8-bit RGB.
    masks : ndarray, shape (T, H, W), bool
        The object on each frame; ``masks[0]`` is non-empty (it is prompted).
    """

    frames: np.ndarray
    masks: np.ndarray


@dataclass
class SyntheticClips:
    """Clips through textured ellipsoid volumes (``synthetic.ellipsoid_volume``).

    Parameters
    ----------
    frames : int
        Clip length ``T``. SAM 2.1 attends to the prompted frame plus the 6 latest ones, so
        8 frames train every temporal slot of its memory.
    depth, side : (int, int)
        Ranges (inclusive) of the volume's slice count and of each in-plane side, in voxels.
    objects : (int, int)
        Range of ellipsoids per volume (the others touch and occlude the followed one).
    p_core_start : float
        Probability that the prompted slice is one where the object's area is at least a fifth
        of its largest cross-section (as a user clicks); else any slice that shows it.
    config : SceneConfig
        Texture, contrast and noise ranges.
    p_same_level : float
        Probability that all ellipsoids of a volume are equally bright
        (``ellipsoid_volume(same_level=True)``), so that only the memory of the prompted frame
        tells the followed one from the others.
    """

    frames: int = 8
    depth: tuple[int, int] = (16, 32)
    side: tuple[int, int] = (128, 192)
    objects: tuple[int, int] = (1, 3)
    p_core_start: float = 0.8
    config: SceneConfig | None = None
    p_same_level: float = 0.0

    def draw(self, rng: np.random.Generator) -> Clip:
        """One clip, drawn with ``rng``."""
        while True:
            clip = self._try(rng)
            if clip is not None:
                return clip

    def _try(self, rng: np.random.Generator) -> Clip | None:
        d = int(rng.integers(self.depth[0], self.depth[1] + 1))
        h, w = (int(v) for v in rng.integers(self.side[0], self.side[1] + 1, size=2))
        n = int(rng.integers(self.objects[0], self.objects[1] + 1))
        # Drawn only when asked for, so that clips without it keep their random stream.
        same = self.p_same_level > 0 and rng.random() < self.p_same_level
        volume, labels = ellipsoid_volume(
            rng, (d, h, w), n_objects=n, config=self.config, same_level=same
        )
        truth = labels == int(rng.integers(1, n + 1))
        areas = truth.sum(axis=(1, 2))
        if not areas.any():
            return None
        core = np.flatnonzero(areas >= 0.2 * areas.max())
        shown = np.flatnonzero(areas > 0)
        start = int(rng.choice(core if rng.random() < self.p_core_start else shown))
        step = 1 if rng.random() < 0.5 else -1
        if not 0 <= start + step * (self.frames - 1) < d:
            step = -step  # the other way fits more often than not
            if not 0 <= start + step * (self.frames - 1) < d:
                return None
        index = start + step * np.arange(self.frames)
        window = make_window(volume, "auto")
        frames = np.stack([to_rgb_uint8(volume[i], window) for i in index])
        return Clip(frames, truth[index])

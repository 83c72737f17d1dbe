"""Synthetic images and volumes with known objects: the data the small test model learns from.

Scenes are ellipses and star-shaped blobs on textured, noisy backgrounds, with either contrast
polarity, sizes from a tenth to more than half of the image, sometimes touching each other.
Volumes hold ellipsoids whose neighbouring slices give the dense prompts of propagation.

Every function takes a :class:`numpy.random.Generator`, so a seed reproduces the data exactly.
Intensities are built as floats in about 0..1 and quantised to 8 bits at the end, as a CT or MR
slice is after its intensity window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "SceneConfig",
    "TrainingSample",
    "blob_mask",
    "ellipse_mask",
    "ellipsoid_volume",
    "random_texture",
    "synthetic_ellipsoid_slice",
    "synthetic_scene",
    "training_sample",
]


OBJECT_TEXTURE = 0.5  # object texture amplitude relative to the background's


@dataclass
class TrainingSample:
    """One training image with its objects.

    Attributes
    ----------
    image : ndarray, shape (H, W, 3), uint8
        The image as the encoder sees it (RGB; gray images have three equal channels).
    labels : ndarray, shape (H, W), int32
        Instance labels: 0 is background, each object has its own id.
    neighbour : ndarray, shape (H, W), int32, or None
        Labels of the adjacent slice of a volume (same ids), the source of dense prompts.
    """

    image: np.ndarray
    labels: np.ndarray
    neighbour: np.ndarray | None = None


@dataclass(frozen=True)
class SceneConfig:
    """Parameters of the synthetic data (all ranges are inclusive ``(low, high)``).

    Attributes
    ----------
    size : (int, int)
        Height and width are drawn independently from this range, in pixels.
    object_scale : (float, float)
        Object extent (major diameter) as a fraction of the image's short side.
    n_objects : (int, int)
        Objects per scene.
    p_touching : float
        Probability that the first object gets a neighbour touching it.
    p_same_intensity : float
        Probability that a touching neighbour has the first object's intensity (an ambiguous
        pair that only a negative click separates).
    p_blob : float
        Probability that an object is a star-shaped blob rather than an ellipse.
    contrast : (float, float)
        Absolute intensity difference object - background (the sign is random).
    noise : (float, float)
        Standard deviation of the additive Gaussian noise.
    texture : (float, float)
        Amplitude of the smooth background and object textures.
    texture_sigma : (float, float)
        Correlation length of the textures, in pixels.
    blur : (float, float)
        Gaussian blur of the finished image (partial-volume edges), in pixels.
    p_ellipsoid : float
        Probability that a sample is a slice through ellipsoids with its neighbouring slice
        (:func:`synthetic_ellipsoid_slice`) instead of a flat scene.
    min_separation : float
        Smallest intensity difference between object 1 and the other objects (except a
        deliberately identical touching neighbour).
    """

    # Objects span at least a few of the encoder's 16-pixel patches, as organs do at SAM's
    # 1024-pixel input: the test fixture sees 256 pixels, so scenes are near-square (aspect at
    # most 1.6 before resizing) and objects at least a quarter of the short side.
    size: tuple[int, int] = (160, 256)
    object_scale: tuple[float, float] = (0.25, 0.70)
    n_objects: tuple[int, int] = (1, 4)
    p_touching: float = 0.4
    p_same_intensity: float = 0.3
    p_blob: float = 0.5
    contrast: tuple[float, float] = (0.35, 0.8)
    noise: tuple[float, float] = (0.0, 0.08)
    texture: tuple[float, float] = (0.0, 0.12)
    texture_sigma: tuple[float, float] = (1.0, 12.0)
    blur: tuple[float, float] = (0.0, 1.5)
    p_ellipsoid: float = 0.25
    min_separation: float = 0.2

    def to_dict(self) -> dict[str, Any]:
        """The parameters as a JSON-serialisable dict (ranges as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneConfig:
        """Inverse of :meth:`to_dict` (lists become the range tuples again)."""
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**fields)


def random_texture(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Smooth random field of unit standard deviation.

    Parameters
    ----------
    rng : Generator
    shape : tuple of int
        Output shape (2D or 3D).
    sigma : float
        Correlation length in pixels (Gaussian filter width).

    Returns
    -------
    ndarray of float32, zero mean, unit standard deviation.
    """
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    std = float(field.std())
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return yy.astype(np.float32), xx.astype(np.float32)


def _rotated(
    yy: np.ndarray, xx: np.ndarray, center: tuple[float, float], angle: float
) -> tuple[np.ndarray, np.ndarray]:
    dy, dx = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


def ellipse_mask(
    shape: tuple[int, int], center: tuple[float, float], axes: tuple[float, float], angle: float
) -> np.ndarray:
    """Boolean mask of a filled ellipse.

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(H, W)``.
    center : (float, float)
        Centre ``(row, col)`` in pixels.
    axes : (float, float)
        Semi-axes in pixels, along the rotated x and y directions.
    angle : float
        Rotation in radians.
    """
    u, v = _rotated(*_grid(shape), center, angle)
    return (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1.0


def blob_mask(
    shape: tuple[int, int],
    center: tuple[float, float],
    axes: tuple[float, float],
    angle: float,
    harmonics: np.ndarray,
) -> np.ndarray:
    """Boolean mask of a star-shaped blob: an ellipse with a wavy radius.

    ``harmonics`` is a ``K x 2`` array of (amplitude, phase) for the angular frequencies
    2..K+1; amplitudes are fractions of the radius (keep their sum below about 0.4).
    """
    u, v = _rotated(*_grid(shape), center, angle)
    rho = np.hypot(u / axes[0], v / axes[1])
    theta = np.arctan2(v / axes[1], u / axes[0])
    radius = np.ones_like(theta)
    for k, (amplitude, phase) in enumerate(harmonics, start=2):
        radius += amplitude * np.cos(k * theta + phase)
    return rho <= radius


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _random_shape(
    rng: np.random.Generator,
    shape: tuple[int, int],
    config: SceneConfig,
    center: tuple[float, float] | None = None,
    extent: float | None = None,
) -> tuple[np.ndarray, tuple[float, float], float]:
    """One object mask, its centre and its mean radius (pixels)."""
    short = min(shape)
    if extent is None:
        extent = _uniform(rng, config.object_scale) * short
    major = extent / 2
    minor = major * rng.uniform(0.45, 1.0)
    if center is None:
        margin = 0.6 * minor
        center = (
            rng.uniform(margin, shape[0] - margin),
            rng.uniform(margin, shape[1] - margin),
        )
    angle = rng.uniform(0, np.pi)
    if rng.random() < config.p_blob:
        k = int(rng.integers(2, 5))
        harmonics = np.stack([rng.uniform(0.0, 0.35 / k, k), rng.uniform(0, 2 * np.pi, k)], axis=1)
        mask = blob_mask(shape, center, (major, minor), angle, harmonics)
    else:
        mask = ellipse_mask(shape, center, (major, minor), angle)
    return mask, center, float(np.sqrt(major * minor))


def _finish(rng: np.random.Generator, intensity: np.ndarray, config: SceneConfig) -> np.ndarray:
    """Blur, noise and an 8-bit window: float intensities -> H x W x 3 uint8."""
    sigma = _uniform(rng, config.blur)
    if sigma > 0.3:
        intensity = ndimage.gaussian_filter(intensity, sigma)
    intensity = intensity + _uniform(rng, config.noise) * rng.standard_normal(intensity.shape)
    # A window that clips a little at either end, as an intensity window of a scan does.
    lo, hi = np.percentile(intensity, [rng.uniform(0, 2), rng.uniform(98, 100)])
    scaled = (intensity - lo) / max(hi - lo, 1e-6)
    gray = np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def _object_intensity(
    rng: np.random.Generator,
    background: float,
    config: SceneConfig,
    avoid: tuple[float, ...] = (),
) -> float:
    """An object's mean intensity, at least ``config.min_separation`` away from ``avoid``.

    Objects that differ from their neighbours only by chance would make a click ambiguous; the
    ambiguous case is generated on purpose instead (``p_same_intensity``).
    """
    for _ in range(20):
        sign = 1.0 if rng.random() < 0.5 else -1.0
        level = background + sign * _uniform(rng, config.contrast)
        if all(abs(level - other) >= config.min_separation for other in avoid):
            break
    return level


def synthetic_scene(rng: np.random.Generator, config: SceneConfig | None = None) -> TrainingSample:
    """A flat 2D scene: objects on a textured background.

    Object 1 is always present, at least half visible, and, with probability
    ``config.p_touching``, has a neighbour (object 2) touching it.

    Returns
    -------
    TrainingSample without ``neighbour``.
    """
    config = config or SceneConfig()
    shape = (
        int(rng.integers(config.size[0], config.size[1] + 1)),
        int(rng.integers(config.size[0], config.size[1] + 1)),
    )
    background = rng.uniform(0.3, 0.7)
    intensity = background + _uniform(rng, config.texture) * random_texture(
        rng, shape, _uniform(rng, config.texture_sigma)
    )
    # A slow ramp across the field, like coil shading in MR.
    yy, xx = _grid(shape)
    ramp = rng.uniform(-0.15, 0.15, 2)
    intensity += ramp[0] * yy / shape[0] + ramp[1] * xx / shape[1]

    n_objects = int(rng.integers(config.n_objects[0], config.n_objects[1] + 1))
    first, center, radius = _random_shape(rng, shape, config)
    masks = [first]
    levels = [_object_intensity(rng, background, config)]
    # Objects other than a deliberately identical neighbour stay distinguishable from object 1.
    if rng.random() < config.p_touching:
        extent = _uniform(rng, config.object_scale) * min(shape)
        direction = rng.uniform(0, 2 * np.pi)
        # Centre distance slightly below the sum of radii: the two outlines meet or overlap a bit.
        distance = 0.85 * (radius + extent / 2 * 0.75)
        c2 = (center[0] + distance * np.sin(direction), center[1] + distance * np.cos(direction))
        mask2, _, _ = _random_shape(rng, shape, config, center=c2, extent=extent)
        masks.append(mask2)
        if rng.random() < config.p_same_intensity:
            levels.append(levels[0] + rng.normal(0, 0.02))
        else:
            levels.append(_object_intensity(rng, background, config, (levels[0],)))
    while len(masks) < n_objects:
        mask, _, _ = _random_shape(rng, shape, config)
        masks.append(mask)
        levels.append(_object_intensity(rng, background, config, (levels[0],)))

    # Paint back to front; object 1 last, so it stays whole and later objects only lose area.
    labels = np.zeros(shape, np.int32)
    for label in range(len(masks), 0, -1):
        labels[masks[label - 1]] = label
    labels = _drop_small(labels, min_fraction=0.4, masks=masks)

    obj_texture = random_texture(rng, shape, _uniform(rng, config.texture_sigma))
    for label, level in enumerate(levels, start=1):
        inside = labels == label
        # Objects are more homogeneous than their surroundings (half the texture amplitude),
        # as organs and lesions are against the body around them.
        amplitude = OBJECT_TEXTURE * _uniform(rng, config.texture)
        intensity[inside] = (
            level + amplitude * obj_texture[inside] + ramp[0] * yy[inside] / shape[0]
        )
    return TrainingSample(_finish(rng, intensity, config), _relabel(labels))


def _drop_small(labels: np.ndarray, min_fraction: float, masks: list[np.ndarray]) -> np.ndarray:
    """Remove objects that are mostly hidden or split into pieces (they have no clear outline)."""
    for label, mask in enumerate(masks, start=1):
        visible = labels == label
        area = int(mask.sum())
        if area == 0 or visible.sum() < min_fraction * area or visible.sum() < 16:
            labels[visible] = 0
            continue
        components, n = ndimage.label(visible)
        if n > 1:
            sizes = np.bincount(components.ravel())[1:]
            labels[visible & (components != 1 + int(np.argmax(sizes)))] = 0
    return labels


def _relabel(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    ids = ids[ids > 0]
    out = np.zeros_like(labels)
    for new, old in enumerate(ids, start=1):
        out[labels == old] = new
    return out


def _random_rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


@dataclass(frozen=True)
class _Ellipsoid:
    center: np.ndarray  # (z, y, x) in voxels
    inv_axes: np.ndarray  # 3x3: rotation / semi-axes; |inv_axes @ (p - c)| <= 1 inside

    def slice_mask(self, z: float, shape: tuple[int, int]) -> np.ndarray:
        yy, xx = _grid(shape)
        p = np.stack([np.full_like(yy, z), yy, xx], axis=-1) - self.center
        q = p @ self.inv_axes.T
        return (q**2).sum(-1) <= 1.0


def _random_ellipsoid(
    rng: np.random.Generator, shape: tuple[int, int, int], extent: float, depth_extent: float
) -> _Ellipsoid:
    semi = np.array(
        [depth_extent / 2, extent / 2 * rng.uniform(0.6, 1.0), extent / 2 * rng.uniform(0.6, 1.0)]
    )
    margin = semi * 0.8
    center = np.array(
        [rng.uniform(m, s - m) if s > 2 * m else s / 2 for m, s in zip(margin, shape)]
    )
    rotation = _random_rotation(rng, np.pi / 6)
    return _Ellipsoid(center, np.diag(1 / semi) @ rotation)


def synthetic_ellipsoid_slice(
    rng: np.random.Generator, config: SceneConfig | None = None
) -> TrainingSample:
    """One slice through ellipsoids together with the labels of its neighbouring slice.

    The objects span 8 to 60 slices, so consecutive cross-sections differ as much as they do in
    scans of organs and lesions at typical slice spacing. Only the two slices needed are
    evaluated (the shapes are analytic), which keeps this as cheap as a flat scene.
    """
    config = config or SceneConfig()
    h = int(rng.integers(config.size[0], config.size[1] + 1))
    w = int(rng.integers(config.size[0], config.size[1] + 1))
    depth_extent = rng.uniform(8, 60)
    depth = int(np.ceil(depth_extent)) + 4
    n_objects = int(rng.integers(config.n_objects[0], config.n_objects[1] + 1))
    bodies = [
        _random_ellipsoid(
            rng,
            (depth, h, w),
            _uniform(rng, config.object_scale) * min(h, w),
            depth_extent if i == 0 else rng.uniform(8, 60),
        )
        for i in range(n_objects)
    ]
    # A slice through the first body, away from its poles where it is a dot.
    offset = rng.uniform(-0.7, 0.7) * depth_extent / 2
    z = float(bodies[0].center[0] + offset)
    dz = 1.0 if rng.random() < 0.5 else -1.0

    def paint(zz: float) -> np.ndarray:
        labels = np.zeros((h, w), np.int32)
        for label in range(len(bodies), 0, -1):
            labels[bodies[label - 1].slice_mask(zz, (h, w))] = label
        return labels

    labels, neighbour = paint(z), paint(z + dz)
    masks = [labels == i for i in range(1, len(bodies) + 1)]
    labels = _drop_small(labels, 0.4, masks)
    neighbour[~np.isin(neighbour, np.unique(labels))] = 0

    background = rng.uniform(0.3, 0.7)
    intensity = background + _uniform(rng, config.texture) * random_texture(
        rng, (h, w), _uniform(rng, config.texture_sigma)
    )
    obj_texture = random_texture(rng, (h, w), _uniform(rng, config.texture_sigma))
    levels: list[float] = []
    for label in range(1, len(bodies) + 1):
        inside = labels == label
        level = _object_intensity(rng, background, config, tuple(levels))
        levels.append(level)
        amplitude = OBJECT_TEXTURE * _uniform(rng, config.texture)
        intensity[inside] = level + amplitude * obj_texture[inside]
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lab_out = np.zeros_like(labels)
    nb_out = np.zeros_like(neighbour)
    for new, old in enumerate(ids, start=1):
        lab_out[labels == old] = new
        nb_out[neighbour == old] = new
    return TrainingSample(_finish(rng, intensity, config), lab_out, nb_out)


def ellipsoid_volume(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (40, 160, 192),
    n_objects: int = 2,
    config: SceneConfig | None = None,
    same_level: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """A textured, noisy volume with ellipsoids (for propagation tests and demos).

    Objects alternate between brighter (odd labels) and darker (even) than the background;
    with ``same_level`` all are as bright as object 1, so that only a prompt (or a memory)
    says which one is meant.

    Returns
    -------
    volume : ndarray, shape (D, H, W), uint8
    labels : ndarray, shape (D, H, W), int32
        Object ``i`` (1-based) is the ``i``-th ellipsoid; object 1 is drawn on top.
    """
    config = config or SceneConfig()
    d, h, w = shape
    labels = np.zeros(shape, np.int32)
    bodies = [
        _random_ellipsoid(rng, shape, rng.uniform(0.3, 0.55) * min(h, w), rng.uniform(0.5, 0.8) * d)
        for _ in range(n_objects)
    ]
    for z in range(d):
        for label in range(n_objects, 0, -1):
            labels[z][bodies[label - 1].slice_mask(float(z), (h, w))] = label
    background = rng.uniform(0.3, 0.7)
    texture = random_texture(rng, shape, _uniform(rng, config.texture_sigma))
    intensity = background + _uniform(rng, config.texture) * texture
    for label in range(1, n_objects + 1):
        if label == 1 or not same_level:  # else object 1's level, kept from the first pass
            level = background + (1 if label % 2 else -1) * _uniform(rng, config.contrast)
        intensity[labels == label] = (
            level + 0.5 * _uniform(rng, config.texture) * texture[labels == label]
        )
    intensity = ndimage.gaussian_filter(intensity, (0, 0.8, 0.8))
    intensity += _uniform(rng, config.noise) * rng.standard_normal(shape)
    lo, hi = np.percentile(intensity, [1, 99])
    volume = np.clip(np.rint((intensity - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
    return volume, labels


def training_sample(rng: np.random.Generator, config: SceneConfig | None = None) -> TrainingSample:
    """A flat scene or, with probability ``config.p_ellipsoid``, an ellipsoid slice pair."""
    config = config or SceneConfig()
    make = synthetic_ellipsoid_slice if rng.random() < config.p_ellipsoid else synthetic_scene
    while True:  # a scene whose every object was hidden has nothing to learn from
        sample = make(rng, config)
        if sample.labels.any():
            return sample

"""Sources of training samples: synthetic shapes, folders of 2D image/mask pairs, NIfTI volumes.

Every source has ``draw(rng) -> TrainingSample``: an ``H x W x 3`` uint8 image with its instance
labels (and, for volumes, the labels of a neighbouring slice for dense prompts).

Pairing rules
-------------
Folders of 2D pairs (:class:`ImageFolder`)::

    DATA/images/NAME.png   (or .tif, .tiff, .jpg, .jpeg, .bmp)
    DATA/masks/NAME.png    (or .tif, .tiff) - same NAME

A mask is an integer (or boolean) image of the same height and width: 0 is background, every
other value is one object (so a 0/255 mask is one object, and an instance-label image is many).

NIfTI volumes (:class:`NiftiFolder`)::

    DATA/images/NAME.nii.gz   (or .nii)
    DATA/labels/NAME.nii.gz   same NAME and voxel grid; 0 background, each value one object

Slices are taken along one axis (``axis=0``: axial for RAS-oriented scans, as napari shows them)
wherever the labels are non-zero; the adjacent slice (above or below at random) provides the
neighbour labels. Intensities go through one window per volume
(:func:`napari_sam.intensity.make_window`, ``"auto"`` by default), as at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_sam.predictor import default_to_uint8
from napari_sam.training.synthetic import SceneConfig, TrainingSample, training_sample

__all__ = ["ImageFolder", "NiftiFolder", "SyntheticSource", "open_source"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MASK_SUFFIXES = (".png", ".tif", ".tiff")


@dataclass
class SyntheticSource:
    """Endless synthetic scenes and ellipsoid slices (see :mod:`napari_sam.training.synthetic`)."""

    config: SceneConfig = field(default_factory=SceneConfig)

    def draw(self, rng: np.random.Generator) -> TrainingSample:
        return training_sample(rng, self.config)


def _stem(path: Path, suffixes: tuple[str, ...]) -> str | None:
    name = path.name
    for suffix in suffixes:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _pairs(root: Path, first: str, second: str, suffixes: tuple[str, ...], mask_suffixes):
    """Files of ``root/first`` matched by name to files of ``root/second``."""
    root = Path(root)
    a_dir, b_dir = root / first, root / second
    for folder in (a_dir, b_dir):
        if not folder.is_dir():
            raise ValueError(
                f"training data {root} must contain the folders '{first}/' and '{second}/' "
                f"(missing {folder}); see the pairing rule in docs/training.md"
            )
    a = {s: p for p in sorted(a_dir.iterdir()) if (s := _stem(p, suffixes)) is not None}
    b = {s: p for p in sorted(b_dir.iterdir()) if (s := _stem(p, mask_suffixes)) is not None}
    missing = sorted(set(a) - set(b))
    if missing:
        raise ValueError(
            f"{len(missing)} file(s) in {a_dir} have no partner of the same name in {b_dir}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    if not a:
        raise ValueError(f"no training images found in {a_dir} (expected {', '.join(suffixes)})")
    return [(a[s], b[s]) for s in sorted(a)]


def _labels(mask: np.ndarray, path: Path) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] in (3, 4):
        # A colour-saved mask: any non-black pixel is object; distinct colours are objects.
        flat = mask[..., :3].reshape(-1, 3)
        _, inverse = np.unique(flat, axis=0, return_inverse=True)
        labels = inverse.reshape(mask.shape[:2]).astype(np.int32)
        labels[(mask[..., :3] == 0).all(axis=-1)] = -1
        values = np.unique(labels[labels >= 0])
        out = np.zeros(mask.shape[:2], np.int32)
        for new, old in enumerate(values, start=1):
            out[labels == old] = new
        return out
    if mask.ndim != 2:
        raise ValueError(f"mask {path} must be a 2D label image, got shape {mask.shape}")
    if mask.dtype.kind == "f" and not np.all(np.mod(mask, 1) == 0):
        raise ValueError(f"mask {path} has fractional values: save integer labels")
    return mask.astype(np.int32)


@dataclass
class ImageFolder:
    """2D image/mask pairs from ``root/images`` and ``root/masks`` (see the module docstring).

    Files are read when drawn (scikit-image), so large folders need little memory.
    """

    root: Path
    images: str = "images"
    masks: str = "masks"

    def __post_init__(self) -> None:
        self.pairs = _pairs(Path(self.root), self.images, self.masks, IMAGE_SUFFIXES, MASK_SUFFIXES)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> TrainingSample:
        from skimage import io

        image_path, mask_path = self.pairs[index]
        image = default_to_uint8(np.asarray(io.imread(image_path)))
        labels = _labels(io.imread(mask_path), mask_path)
        if labels.shape != image.shape[:2]:
            raise ValueError(
                f"mask {mask_path} is {labels.shape[0]} x {labels.shape[1]} but image "
                f"{image_path} is {image.shape[0]} x {image.shape[1]}: they must match"
            )
        return TrainingSample(image, labels)

    def draw(self, rng: np.random.Generator) -> TrainingSample:
        # Images without any object teach nothing: try others (a few times) before failing.
        for _ in range(10 * len(self.pairs)):
            sample = self.load(int(rng.integers(len(self.pairs))))
            if (sample.labels > 0).any():
                return sample
        raise ValueError(f"no mask in {Path(self.root) / self.masks} contains any object")


@dataclass
class NiftiFolder:
    """Slices of NIfTI volumes with their label volumes (see the module docstring).

    Volumes are read once, windowed to uint8 and kept in memory.
    """

    root: Path
    images: str = "images"
    labels: str = "labels"
    axis: int = 0
    window: str = "auto"

    def __post_init__(self) -> None:
        from napari_sam.intensity import resolve_window
        from napari_sam.io.nifti import NIFTI_SUFFIXES, read_nifti

        if self.axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {self.axis}")
        self.volumes: list[tuple[np.ndarray, np.ndarray]] = []
        self.slices: list[tuple[int, int]] = []  # (volume index, slice index) with objects
        pairs = _pairs(Path(self.root), self.images, self.labels, NIFTI_SUFFIXES, NIFTI_SUFFIXES)
        for image_path, label_path in pairs:
            image = read_nifti(image_path)
            labels = read_nifti(label_path).data
            if image.data.ndim != 3 or image.rgb:
                raise ValueError(f"{image_path} must be a 3D grayscale volume")
            if labels.shape != image.data.shape:
                raise ValueError(
                    f"labels {label_path} have shape {labels.shape} but the volume {image_path} "
                    f"has {image.data.shape}: they must share the voxel grid"
                )
            window = resolve_window(image.data, self.window)
            volume = np.moveaxis(window.apply(image.data), self.axis, 0)
            labels = np.moveaxis(np.asarray(labels).astype(np.int32), self.axis, 0)
            index = len(self.volumes)
            self.volumes.append((volume, labels))
            for z in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1)):
                self.slices.append((index, int(z)))
        if not self.slices:
            raise ValueError(f"no label volume in {Path(self.root) / self.labels} has any object")

    def __len__(self) -> int:
        return len(self.slices)

    def draw(self, rng: np.random.Generator) -> TrainingSample:
        index, z = self.slices[int(rng.integers(len(self.slices)))]
        volume, labels = self.volumes[index]
        step = 1 if rng.random() < 0.5 else -1
        near = z + step if 0 <= z + step < len(labels) else z - step
        neighbour = labels[near] if 0 <= near < len(labels) else None
        image = np.repeat(volume[z][..., None], 3, axis=2)
        return TrainingSample(
            image, labels[z].copy(), None if neighbour is None else neighbour.copy()
        )


def open_source(path: str | Path, *, axis: int = 0, window: str = "auto"):
    """A folder source for ``path``: NIfTI volumes if ``images/`` holds any, else 2D pairs."""
    path = Path(path)
    images = path / "images"
    from napari_sam.io.nifti import is_nifti_path

    if images.is_dir() and any(is_nifti_path(p) for p in images.iterdir()):
        return NiftiFolder(path, axis=axis, window=window)
    return ImageFolder(path)

"""Per-slice SAM 2 image features of a volume: computed once, kept in memory, stored on disk.

SAM 2's encoder gives each slice several tensors: three feature levels (``backbone_fpn``: the two
high-resolution levels already projected for the mask decoder, then the ``S/16`` embedding) and
their positional encodings (``vision_pos_enc``). :class:`FeatureCache` keeps them with the
conventions of :class:`napari_sam.volume.embeddings.EmbeddingCache` (same key: volume content,
axis, model and weights hash, intensity window, encoder settings; same LRU memory store, atomic
files, manifest, damaged files recomputed, thread safety), with two differences:

- a slice is a dict of tensors, stored as one ``.npz`` of float16 levels per slice;
- positional encodings depend only on the feature sizes, so one copy serves every slice: it is
  held once in memory and stored once on disk (``positions.npz``).

Sizes per slice in float32 (``S`` = the model's ``image_size``): ``32 (S/4)^2 + 64 (S/8)^2 +
256 (S/16)^2`` values, i.e. 16 MiB at ``S = 1024`` and 4 MiB at ``S = 512``; half that on disk.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from napari_sam.sam2_predictor import Sam2Model
from napari_sam.volume.embeddings import EmbeddingCache, _atomic_write

__all__ = ["FeatureCache", "SliceFeatures"]

SliceFeatures = dict[str, list[torch.Tensor]]
POSITIONS = "positions.npz"


class FeatureCache(EmbeddingCache):
    """SAM 2 image features of the slices of one volume, computed on first need.

    Parameters are those of :class:`~napari_sam.volume.embeddings.EmbeddingCache`, except:

    model : Sam2
        A SAM 2 model (``forward_image`` interface).
    max_memory_slices : int
        Bound of the in-memory store, in slices (see the module docstring for bytes per slice).
    encode_fn : callable, optional
        ``encode_fn(model, rgb_uint8) -> {"backbone_fpn": [...], "vision_pos_enc": [...]}``;
        default :func:`napari_sam.sam2_predictor.compute_features`.

    :meth:`get` returns a :data:`SliceFeatures` dict (batch 1, on the model's device; read it,
    do not modify it: it is the cached object).
    """

    def __init__(
        self,
        model: Sam2Model,
        volume: np.ndarray,
        *,
        max_memory_slices: int = 8,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("encode_fn") is None:
            from napari_sam.sam2_predictor import compute_features

            kwargs["encode_fn"] = compute_features
        # Entries are SliceFeatures dicts here, not the base class's (embedding, sizes) tuples:
        # the base class stores and returns whatever _compute/_load make.
        super().__init__(model, volume, max_memory_slices=max_memory_slices, **kwargs)
        self._encode_features: Any = kwargs["encode_fn"]
        self._positions: list[torch.Tensor] | None = None

    def get(self, index: int) -> SliceFeatures:  # type: ignore[override]
        """Return the features of slice ``index``, computed or loaded on first need.

        Returns
        -------
        dict
            ``{"backbone_fpn": [...], "vision_pos_enc": [...]}``, batch 1, on the model's
            device (the cached object: read it, do not modify it).
        """
        return super().get(index)  # type: ignore[return-value]

    @property
    def bytes_per_slice(self) -> int:
        """Memory taken by one slice's float32 features (positional encodings not counted)."""
        s = int(self.model.image_size)
        return 4 * (32 * (s // 4) ** 2 + 64 * (s // 8) ** 2 + 256 * (s // 16) ** 2)

    def key(self) -> dict:
        """Return the full cache key: :class:`EmbeddingCache`'s, naming SAM 2 features."""
        with self._lock:
            if self._key is None:
                key = super().key()
                key["model"]["image_size"] = int(self.model.image_size)
                key["content"] = "sam2_forward_image"
            return super().key()

    # -- entries ------------------------------------------------------------------------------

    def _entry(self, levels: list[torch.Tensor]) -> SliceFeatures:
        assert self._positions is not None
        return {"backbone_fpn": levels, "vision_pos_enc": list(self._positions)}

    def _round(self, tensor: torch.Tensor) -> torch.Tensor:
        # With a disk store, fresh features take the stored precision too, so a slice gives the
        # same masks whether it was just computed or read back.
        tensor = tensor.detach().float()
        return tensor.half().float() if self.cache_dir is not None else tensor

    def _compute(self, index: int) -> SliceFeatures:  # type: ignore[override]
        out = self._encode_features(self.model, self.slice_image(index))
        levels = [self._round(t) for t in out["backbone_fpn"]]
        with self._lock:
            if self._positions is None:
                self._positions = [self._round(t) for t in out["vision_pos_enc"]]
                if self.cache_dir is not None:
                    self._save_positions()
        entry = self._entry(levels)
        if self.cache_dir is not None:
            self._save(index, entry)
        return entry

    # -- disk store ---------------------------------------------------------------------------

    def _save_positions(self) -> None:
        assert self._positions is not None
        arrays: dict[str, Any] = {
            f"level_{i}": t.cpu().half().numpy() for i, t in enumerate(self._positions)
        }
        try:
            _atomic_write(self._open_store() / POSITIONS, lambda f: np.savez(f, **arrays))
        except OSError:
            pass  # without it, the next session recomputes one slice to get the encodings

    def _read_levels(self, path: Path) -> list[np.ndarray]:
        with np.load(path, allow_pickle=False) as data:
            levels: list[np.ndarray] = []
            while f"level_{len(levels)}" in data:
                levels.append(data[f"level_{len(levels)}"])
            original = data["original_size"] if "original_size" in data else None
        if not levels or any(a.dtype != np.float16 or not np.isfinite(a).all() for a in levels):
            raise ValueError("damaged")
        if original is not None and tuple(int(s) for s in original) != self.slice_shape:
            raise ValueError("damaged")
        return levels

    def _load_positions(self) -> bool:
        if self._positions is not None:
            return True
        try:
            arrays = self._read_levels(self._open_store() / POSITIONS)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return False
        device = self._device()
        self._positions = [torch.from_numpy(a.astype(np.float32)).to(device) for a in arrays]
        return True

    def _load(self, index: int) -> SliceFeatures | None:  # type: ignore[override]
        if self.cache_dir is None:
            return None
        path = self._slice_path(index)
        with self._lock:
            if not path.is_file() or not self._load_positions():
                return None
            # A level has the spatial size of its positional encoding.
            assert self._positions is not None
            expected = [(1, -1, *p.shape[-2:]) for p in self._positions]
        try:
            arrays = self._read_levels(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        if len(arrays) != len(expected) or any(
            a.ndim != 4 or a.shape[0] != 1 or a.shape[2:] != e[2:] for a, e in zip(arrays, expected)
        ):
            return None
        device = self._device()
        return self._entry([torch.from_numpy(a.astype(np.float32)).to(device) for a in arrays])

    def _save(self, index: int, entry: SliceFeatures) -> None:  # type: ignore[override]
        arrays: dict[str, Any] = {
            f"level_{i}": t.detach().cpu().half().numpy()
            for i, t in enumerate(entry["backbone_fpn"])
        }

        def write(f: BinaryIO) -> None:
            np.savez(f, original_size=np.array(self.slice_shape, dtype=np.int64), **arrays)

        self._write_slice(index, write, "features")

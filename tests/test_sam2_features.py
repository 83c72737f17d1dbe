"""FeatureCache: SAM 2's per-slice feature dicts in memory and on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.volume.sam2_features import POSITIONS, FeatureCache


class _Model:
    image_size = 64
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.encoded = 0


def _encode(model, rgb):
    model.encoded += 1
    base = torch.from_numpy(rgb[..., 0].astype(np.float32) / 255.0)[None, None]
    levels = [
        torch.nn.functional.interpolate(base, size=(s, s), mode="area").repeat(1, c, 1, 1) + 0.1
        for s, c in ((16, 2), (8, 3), (4, 5))
    ]
    positions = [torch.linspace(-1, 1, lv[0].numel()).reshape(lv.shape) for lv in levels]
    return {"backbone_fpn": levels, "vision_pos_enc": positions}


def _volume():
    rng = np.random.default_rng(0)
    return rng.integers(0, 1000, (5, 21, 17)).astype(np.int16)


def _cache(model, vol, **kwargs):
    return FeatureCache(model, vol, encode_fn=_encode, model_key="fake", **kwargs)


def test_memory_store_is_bounded_and_reused():
    model, vol = _Model(), _volume()
    cache = _cache(model, vol, max_memory_slices=2)
    first = cache.get(1)
    assert [t.shape for t in first["backbone_fpn"]] == [(1, 2, 16, 16), (1, 3, 8, 8), (1, 5, 4, 4)]
    assert cache.get(1) is first and model.encoded == 1
    cache.get(2), cache.get(3)
    assert model.encoded == 3 and len(cache._memory) == 2
    # One copy of the positional encodings serves every slice.
    assert cache.get(3)["vision_pos_enc"][0] is first["vision_pos_enc"][0]
    assert cache.bytes_per_slice == 4 * (32 * 16**2 + 64 * 8**2 + 256 * 4**2)


def test_disk_store_round_trip_and_damage(tmp_path):
    model, vol = _Model(), _volume()
    cache = _cache(model, vol, cache_dir=tmp_path, max_memory_slices=0)
    fresh = cache.get(2)
    for t in fresh["backbone_fpn"]:
        assert torch.equal(t, t.half().float())  # rounded like what the disk holds
    assert (cache.store_path / POSITIONS).is_file()
    assert cache.key()["content"] == "sam2_forward_image"
    assert cache.key()["model"]["image_size"] == 64

    model2 = _Model()
    again = _cache(model2, vol, cache_dir=tmp_path)
    assert again.has(2) and again.stored(2) and again.cached_indices() == [2]
    loaded = again.get(2)
    assert model2.encoded == 0
    for a, b in zip(
        loaded["backbone_fpn"] + loaded["vision_pos_enc"],
        fresh["backbone_fpn"] + fresh["vision_pos_enc"],
    ):
        assert torch.equal(a, b)

    path = again.store_path / "slice_00002.npz"
    path.write_bytes(path.read_bytes()[:100])  # truncated by a crash
    third = _cache(_Model(), vol, cache_dir=tmp_path)
    assert third.has(2) and not third.stored(2)  # present, but does not read back
    third.get(2)
    assert third.model.encoded == 1  # recomputed, not read

    other_axis = _cache(_Model(), vol, cache_dir=tmp_path, axis=2)
    assert other_axis.store_path != cache.store_path
    assert other_axis.get(3)["backbone_fpn"][0].shape == (1, 2, 16, 16)


def test_features_that_cannot_be_stored_warn_and_are_still_served(tmp_path, monkeypatch):
    from napari_sam.volume import embeddings

    def full_disk(path, write):
        raise OSError(28, "No space left on device")

    model, vol = _Model(), _volume()
    cache = _cache(model, vol, cache_dir=tmp_path, max_memory_slices=0)
    cache.get(0)  # the store and its position encodings are written first
    monkeypatch.setattr(embeddings, "_atomic_write", full_disk)
    with pytest.warns(RuntimeWarning, match=r"could not store the features of slice 3 in"):
        features = cache.get(3)
    assert [t.shape[1] for t in features["backbone_fpn"]] == [2, 3, 5] and model.encoded == 2
    assert not cache.stored(3)

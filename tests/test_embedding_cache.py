"""EmbeddingCache: compute once, LRU bound, disk round trip, keys, corruption, resume, threads."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from conftest import tiny_vit_spec
from napari_sam.intensity import Window
from napari_sam.volume.embeddings import (
    EmbeddingCache,
    default_cache_dir,
    volume_fingerprint,
    weights_fingerprint,
)

SPEC = tiny_vit_spec("test_cache_vit", test_fixture=True)
E = SPEC.embedding_size  # 4


class FakeModel(torch.nn.Module):
    """Just enough of a Sam for the cache: a spec, weights to hash, a device."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.spec = SPEC
        self.weight = torch.nn.Parameter(
            torch.randn(8, generator=torch.Generator().manual_seed(seed))
        )


class Encoder:
    """Deterministic fake encoder: the embedding depends on the image content; counts calls."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay

    def __call__(self, model, image):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
        self.calls += 1
        time.sleep(self.delay)
        base = torch.from_numpy(image[:E, :E, 0].astype(np.float32) / 7.0)
        emb = base[None, None] + torch.arange(256, dtype=torch.float32).view(1, 256, 1, 1) / 3
        return emb, (64, 48)


def volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, (6, 40, 30)).astype(np.int16)


WINDOW = Window(0.0, 1000.0)


def cache(vol=None, model=None, encoder=None, **kw) -> EmbeddingCache:
    return EmbeddingCache(
        model or FakeModel(),
        volume() if vol is None else vol,
        window=kw.pop("window", WINDOW),
        encode_fn=encoder or Encoder(),
        **kw,
    )


def test_get_computes_once_and_returns_sizes():
    enc = Encoder()
    c = cache(encoder=enc)
    emb, original, input_size = c.get(2)
    assert emb.shape == (1, 256, E, E) and emb.dtype == torch.float32
    # Kept in token layout: the decoder reads positions as rows without a transposing pass.
    assert emb.is_contiguous(memory_format=torch.channels_last)
    assert original == (40, 30) and input_size == (64, 48)
    again, _, _ = c.get(2)
    assert again is emb and enc.calls == 1
    assert c.has(2) and not c.has(3) and c.cached_indices() == [2]
    # The encoder saw the windowed 8-bit slice.
    np.testing.assert_array_equal(c.slice_image(2)[..., 0], WINDOW.apply(volume()[2]))


def test_axis_selects_the_slices():
    vol = volume()
    c = cache(vol, axis=2)
    assert len(c) == 30 and c.slice_shape == (6, 40)
    assert c.get(5)[1] == (6, 40)
    np.testing.assert_array_equal(c.slice_image(5)[..., 0], WINDOW.apply(vol[:, :, 5]))


def test_memory_lru_bound():
    enc = Encoder()
    c = cache(encoder=enc, max_memory_slices=3)
    for i in range(5):
        c.get(i)
    assert c.cached_indices() == [2, 3, 4]
    c.get(2)  # refreshes 2: now 3 is the oldest
    c.get(0)
    assert c.cached_indices() == [0, 2, 4] and enc.calls == 6
    assert c.bytes_per_slice == 256 * E * E * 4
    assert c.memory_bound_bytes == 3 * 256 * E * E * 4
    # Official models: 4 MiB per slice.
    assert EmbeddingCache.__doc__ and "4 MiB" in EmbeddingCache.__doc__


def test_disk_round_trip_is_exact(tmp_path):
    enc = Encoder()
    first = cache(encoder=enc, cache_dir=tmp_path)
    originals = [first.get(i)[0] for i in (0, 3)]
    store = first.store_path
    assert store.parent == tmp_path
    files = sorted(p.name for p in store.iterdir())
    assert files == ["manifest.json", "slice_00000.npz", "slice_00003.npz"]
    with np.load(store / "slice_00003.npz") as data:
        assert data["embedding"].dtype == np.float16
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest == first.key()
    assert manifest["volume"]["sha256"] == volume_fingerprint(volume())

    enc2 = Encoder()
    second = cache(encoder=enc2, cache_dir=tmp_path)
    assert second.has(3) and second.cached_indices() == [0, 3]
    for i, original in zip((0, 3), originals):
        emb, size, input_size = second.get(i)
        assert torch.equal(emb, original)  # computed embeddings are rounded like stored ones
        assert emb.is_contiguous(memory_format=torch.channels_last)
        assert size == (40, 30) and input_size == (64, 48)
    assert enc2.calls == 0


@pytest.mark.parametrize(
    "change",
    ["voxel", "dtype", "axis", "window", "weights", "settings", "model_name"],
)
def test_any_key_change_misses(tmp_path, change):
    cache(cache_dir=tmp_path).get(1)
    vol, model, kw = volume(), FakeModel(), {}
    if change == "voxel":
        vol[5, 39, 29] += 1
    elif change == "dtype":
        vol = vol.astype(np.int32)
    elif change == "axis":
        kw["axis"] = 1
    elif change == "window":
        kw["window"] = Window(0.0, 999.0)
    elif change == "weights":
        model = FakeModel(seed=1)
    elif change == "settings":
        kw["encoder_settings"] = "bf16"
    else:
        model.spec = SPEC.replace(name="test_cache_other")
    enc = Encoder()
    other = cache(vol, model, enc, cache_dir=tmp_path, **kw)
    assert not other.has(1)
    other.get(1)
    assert enc.calls == 1
    assert len(list(tmp_path.iterdir())) == 2  # a separate store


def test_manifest_mismatch_wipes_the_store(tmp_path):
    first = cache(cache_dir=tmp_path)
    first.get(0)
    first.get(1)
    manifest = first.store_path / "manifest.json"
    key = json.loads(manifest.read_text())
    key["window"] = "something else"
    manifest.write_text(json.dumps(key))
    enc = Encoder()
    second = cache(encoder=enc, cache_dir=tmp_path)
    assert second.cached_indices() == []  # nothing of unknown provenance is used
    second.get(1)
    assert enc.calls == 1
    assert json.loads(manifest.read_text()) == second.key()


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "wrong_shape"])
def test_corrupt_slice_file_is_recomputed(tmp_path, damage):
    first = cache(cache_dir=tmp_path)
    good = first.get(4)[0]
    path = first.store_path / "slice_00004.npz"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0x01  # a valid float16 still: only the zip CRC catches it
        path.write_bytes(bytes(raw))
    elif damage == "garbage":
        path.write_bytes(b"not a numpy file")
    else:
        np.savez(
            path,
            embedding=np.zeros((1, 256, 2, 2), np.float16),
            original_size=np.array([40, 30]),
            input_size=np.array([64, 48]),
        )
    enc = Encoder()
    second = cache(encoder=enc, cache_dir=tmp_path)
    assert torch.equal(second.get(4)[0], good)
    assert enc.calls == 1
    third = cache(encoder=Encoder(), cache_dir=tmp_path)  # rewritten: read back now
    assert torch.equal(third.get(4)[0], good) and third._encode.calls == 0


def test_precompute_yields_per_slice_cancels_and_resumes(tmp_path):
    stop = threading.Event()
    enc = Encoder()
    first = cache(encoder=enc, cache_dir=tmp_path, max_memory_slices=2)
    seen = []
    for index in first.precompute(cancel=stop):
        seen.append(index)
        if len(seen) == 3:
            stop.set()  # e.g. the user pressed Cancel
    assert seen == [0, 1, 2] and enc.calls == 3
    # A crash leaves a temporary file behind: it is never mistaken for a slice.
    (first.store_path / ".slice_00003.npz.deadbeef.tmp").write_bytes(b"half")
    enc2 = Encoder()
    second = cache(encoder=enc2, cache_dir=tmp_path)
    assert list(second.precompute()) == [0, 1, 2, 3, 4, 5]
    assert enc2.calls == 3  # only the missing slices
    assert list(second.precompute([5, 1], cancel=lambda: False)) == [5, 1]
    assert enc2.calls == 3


def test_same_slice_from_two_threads_is_encoded_once_and_has_does_not_block():
    enc = Encoder(delay=0.5)
    c = cache(encoder=enc)
    results = []
    threads = [threading.Thread(target=lambda: results.append(c.get(1))) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    start = time.perf_counter()
    assert not c.has(1)  # while encoding: answered at once
    assert time.perf_counter() - start < 0.1
    for t in threads:
        t.join()
    assert enc.calls == 1 and results[0][0] is results[1][0]


def test_bad_arguments():
    c = cache()
    with pytest.raises(IndexError, match="6 slices"):
        c.get(6)
    with pytest.raises(IndexError):
        c.has(-1)
    with pytest.raises(TypeError, match="integer"):
        c.get(1.0)
    with pytest.raises(ValueError, match="shape"):
        cache(np.zeros((4, 5), np.int16))
    with pytest.raises(ValueError, match="axis"):
        cache(axis=3)


def test_fingerprints():
    vol = volume()
    assert volume_fingerprint(vol) == volume_fingerprint(vol.copy())
    assert volume_fingerprint(vol) == volume_fingerprint(np.asfortranarray(vol))
    assert volume_fingerprint(vol) != volume_fingerprint(vol.view(np.uint16))
    assert volume_fingerprint(vol) != volume_fingerprint(vol.reshape(6, 30, 40))
    a, b = FakeModel(0), FakeModel(0)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.weight[3] += 1e-6
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_default_window_is_one_window_for_the_whole_volume():
    vol = volume()
    c = EmbeddingCache(FakeModel(), vol, encode_fn=Encoder())
    assert c.window is not None and c.window.key() != WINDOW.key()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_SAM_EMBEDDINGS", str(tmp_path / "emb"))
    assert default_cache_dir() == tmp_path / "emb"
    monkeypatch.delenv("NAPARI_SAM_EMBEDDINGS")
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path / "models"))
    assert default_cache_dir() == tmp_path / "models" / "embeddings"


# -- one store, several writers ---------------------------------------------------------------


def _fill_stores(root: str, rounds: int, reverse: bool, barrier) -> None:
    """One writer process: fills ``rounds`` fresh stores, starting each with its peer."""
    torch.set_num_threads(1)
    for r in range(rounds):
        c = cache(cache_dir=f"{root}/{r}")
        order = range(c.num_slices)[::-1] if reverse else range(c.num_slices)
        barrier.wait(timeout=60)  # both open the same new store at once
        for index in order:
            c.get(index)


@pytest.mark.slow  # two fresh interpreters importing torch: about 14 s
def test_two_processes_filling_one_store_at_once_leave_every_slice_intact(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    rounds = 4
    writers = [
        ctx.Process(target=_fill_stores, args=(str(tmp_path), rounds, reverse, barrier))
        for reverse in (False, True)
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    expected = Encoder()
    for r in range(rounds):
        enc = Encoder()
        reader = cache(encoder=enc, cache_dir=tmp_path / str(r))
        store = reader.store_path
        assert json.loads((store / "manifest.json").read_text()) == reader.key()
        assert [reader.stored(i) for i in range(6)] == [True] * 6
        for i in range(6):
            want = expected(None, reader.slice_image(i))[0].half().float()
            assert torch.equal(reader.get(i)[0], want)
        assert enc.calls == 0  # everything came from the store
        assert sorted(p.name for p in store.iterdir()) == [
            "manifest.json",
            *(f"slice_{i:05d}.npz" for i in range(6)),
        ]  # no temporary file left behind


def test_sweep_removes_only_temporaries_of_writers_that_are_gone(tmp_path):
    import os
    import subprocess
    import sys

    from napari_sam.volume import embeddings

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    host = embeddings._host()
    names = {
        "dead": f".slice_00001.npz.{host}~{dead_pid}~ab12.tmp",
        "alive": f".slice_00002.npz.{host}~{os.getpid()}~ab12.tmp",
        "other_host_young": ".slice_00003.npz.elsewhere~1~ab12.tmp",
        "other_host_old": ".slice_00004.npz.elsewhere~1~ab12.tmp",
        "untagged_old": ".slice_00005.npz.deadbeef.tmp",
        "slice": "slice_00006.npz",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    two_days_ago = time.time() - 2 * 24 * 3600
    for key in ("other_host_old", "untagged_old"):
        os.utime(tmp_path / names[key], (two_days_ago, two_days_ago))
    assert embeddings.sweep_temporaries(tmp_path) == 3
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([names["alive"], names["other_host_young"], names["slice"]])


def test_temporary_of_a_killed_writer_is_removed_when_the_store_is_opened(tmp_path):
    import subprocess
    import sys

    from napari_sam.volume import embeddings

    first = cache(cache_dir=tmp_path)
    first.get(0)
    store = first.store_path
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    half = store / f".slice_00001.npz.{embeddings._host()}~{int(dead.stdout)}~ab.tmp"
    half.write_bytes(b"half a slice")
    second = cache(cache_dir=tmp_path)
    assert second.stored(0) and not second.stored(1)
    assert not half.exists()


def test_first_writer_creates_the_manifest_the_second_reads_it(tmp_path):
    from napari_sam.volume import embeddings

    path = tmp_path / "manifest.json"
    assert embeddings._create_exclusive(path, b'{"a": 1}')
    assert not embeddings._create_exclusive(path, b'{"a": 2}')
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_slice_that_cannot_be_stored_warns_and_is_still_served(tmp_path, monkeypatch):
    from napari_sam.volume import embeddings

    def full_disk(path, write):
        raise OSError(28, "No space left on device")

    enc = Encoder()
    c = cache(encoder=enc, cache_dir=tmp_path)
    c.get(0)  # opens the store (manifest) before the disk "fills up"
    monkeypatch.setattr(embeddings, "_atomic_write", full_disk)
    with pytest.warns(RuntimeWarning, match=r"could not store the embedding of slice 1 in .*"):
        emb, _, _ = c.get(1)
    assert emb.shape == (1, 256, E, E) and enc.calls == 2
    c.clear_memory()
    monkeypatch.undo()
    c.get(1)  # nothing was stored under the slice's name: encoded again
    assert enc.calls == 3

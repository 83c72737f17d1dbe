"""Weights: cache folder, verified downloads from a loopback server, safe loading, detection."""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import pickle
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import small_vit_spec
from napari_sam import weights
from napari_sam.registry import MODELS, ModelSpec
from napari_sam.weights import (
    ChecksumError,
    DownloadCancelled,
    UnsafeCheckpointError,
    WeightsUnavailableError,
    fetch,
)

# --------------------------------------------------------------------------------------------
# A file server on 127.0.0.1 (also used by test_cli_models.py)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        data = self.server.files.get(name)
        if data is None:
            self.send_error(404, "no such file")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if name in self.server.truncated:
            # Announce the full length, send a third, then drop the connection.
            self.wfile.write(data[: len(data) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve(files: dict[str, bytes], truncated: tuple[str, ...] = ()) -> Iterator[str]:
    """Serve ``files`` (name -> bytes) on 127.0.0.1; yields the base URL; always stops."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.files = files
    server.truncated = set(truncated)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    watchdog = threading.Timer(120, server.shutdown)  # stops by itself if a test hangs
    watchdog.daemon = True
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


def file_spec(data: bytes, base: str | None, **changes) -> ModelSpec:
    """A registry-style spec for a small served file, pinned to ``data``'s size and SHA-256."""
    fields = dict(
        name="tiny_test",
        encoder="vit",
        filename="tiny_test.pth",
        url=f"{base}/tiny_test.pth" if base else None,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        homepage="https://example.org/tiny",
    )
    fields.update(changes)
    return ModelSpec(**fields)


@pytest.fixture
def payload() -> bytes:
    return os.urandom(3 * (1 << 20) + 12345)  # a bit over three download chunks


def cache_listing() -> list[str]:
    return sorted(p.name for p in weights.cache_dir().iterdir())


# --------------------------------------------------------------------------------------------
# Cache folder


def test_cache_dir_env_override_created_on_demand(tmp_path, monkeypatch):
    target = tmp_path / "a" / "b"
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(target))
    assert not target.exists()
    assert weights.cache_dir() == target
    assert target.is_dir()


def test_cache_dir_default_is_pooch_user_cache(tmp_path, monkeypatch):
    import pooch

    monkeypatch.delenv("NAPARI_SAM_CACHE")
    calls = []

    def fake_os_cache(project):
        calls.append(project)
        return tmp_path / "user-cache" / project

    monkeypatch.setattr(pooch, "os_cache", fake_os_cache)
    assert weights.cache_dir() == tmp_path / "user-cache" / "napari-sam"
    assert calls == ["napari-sam"]
    assert (tmp_path / "user-cache" / "napari-sam").is_dir()


def test_cached_path_and_destination():
    spec = MODELS["vit_b"]
    assert weights.cached_path("vit_b") is None and not weights.is_cached(spec)
    dest = weights.destination("vit_b")
    assert dest == weights.cache_dir() / "sam_vit_b_01ec64.pth"
    dest.write_bytes(b"x")
    assert weights.cached_path("vit_b") == dest and weights.is_cached("vit_b")
    assert weights.cached_path(spec.replace(filename=None)) is None
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        weights.cached_path("nope")


def test_sha256_file(tmp_path, payload):
    f = tmp_path / "f.bin"
    f.write_bytes(payload)
    assert weights.sha256_file(f) == hashlib.sha256(payload).hexdigest()


# --------------------------------------------------------------------------------------------
# Download


def test_download_lands_in_cache_verified(payload):
    seen = []
    with serve({"tiny_test.pth": payload}) as base:
        spec = file_spec(payload, base)
        path = weights.download(
            spec, progress=False, progress_callback=lambda done, total: seen.append((done, total))
        )
    assert path == weights.cache_dir() / "tiny_test.pth"
    assert path.read_bytes() == payload
    assert cache_listing() == ["tiny_test.pth"]  # no temporary file left behind
    assert seen[-1] == (len(payload), len(payload))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) == 4
    assert weights.is_cached(spec)


def test_download_progress_bar_on_stderr(payload, capsys):
    with serve({"tiny_test.pth": payload}) as base:
        weights.download(file_spec(payload, base), progress=True)
    err = capsys.readouterr().err
    assert "tiny_test.pth" in err and "100%" in err


def test_download_base_url_override_env_and_argument(payload, monkeypatch):
    # The spec has no URL at all: only the mirror can provide the file.
    spec = file_spec(payload, None)
    with serve({"tiny_test.pth": payload}) as base:
        monkeypatch.setenv("NAPARI_SAM_BASE_URL", base + "/")
        assert weights.download(spec, progress=False).read_bytes() == payload
        weights.destination(spec).unlink()
        monkeypatch.delenv("NAPARI_SAM_BASE_URL")
        path = weights.download(spec, progress=False, base_url=base)
    assert path.read_bytes() == payload


def test_download_wrong_checksum_refused_leaves_nothing(payload):
    spec_ok = None
    with serve({"tiny_test.pth": payload}) as base:
        spec_ok = file_spec(payload, base)
        wrong = "0" * 64
        with pytest.raises(ChecksumError) as info:
            weights.download(spec_ok.replace(sha256=wrong), progress=False)
    message = str(info.value)
    assert wrong in message and spec_ok.sha256 in message
    assert isinstance(info.value, ValueError)
    assert cache_listing() == []


def test_download_wrong_size_refused(payload):
    with serve({"tiny_test.pth": payload}) as base:
        spec = file_spec(payload, base, size_bytes=len(payload) + 1)
        with pytest.raises(ChecksumError, match=f"{len(payload)} bytes, expected"):
            weights.download(spec, progress=False)
    assert cache_listing() == []


def test_failed_download_keeps_existing_file(payload):
    dest = weights.destination(file_spec(payload, None))
    dest.write_bytes(b"the user's own file")
    with serve({"tiny_test.pth": payload}) as base:
        with pytest.raises(ChecksumError):
            weights.download(file_spec(payload, base, sha256="1" * 64), progress=False)
    assert dest.read_bytes() == b"the user's own file"
    assert cache_listing() == ["tiny_test.pth"]


def test_interrupted_download_leaves_nothing(payload):
    with serve({"tiny_test.pth": payload}, truncated=("tiny_test.pth",)) as base:
        spec = file_spec(payload, base)
        with pytest.raises(WeightsUnavailableError) as info:
            weights.download(spec, progress=False)
    assert "tiny_test.pth" in str(info.value)
    assert cache_listing() == []


def test_disk_full_is_a_local_error_and_leaves_nothing(payload, monkeypatch):
    import errno
    import io

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch, "open", lambda *a, **k: FullDisk(), raising=False)
    with serve({"tiny_test.pth": payload}) as base:
        with pytest.raises(OSError, match=r"No space left on device.*NAPARI_SAM_CACHE") as info:
            weights.download(file_spec(payload, base), progress=False)
    assert not isinstance(info.value, WeightsUnavailableError)
    assert cache_listing() == []


def test_cancel_deletes_partial_file(payload):
    seen = []
    with serve({"tiny_test.pth": payload}) as base:
        with pytest.raises(DownloadCancelled):
            weights.download(
                file_spec(payload, base),
                progress=False,
                cancel=lambda: bool(seen),  # cancel once the first chunk has arrived
                progress_callback=lambda done, total: seen.append(done),
            )
    assert seen == [1 << 20]
    assert cache_listing() == []


def test_offline_error_names_file_url_and_destination(payload):
    with serve({}) as base:
        pass  # the server is gone: nothing listens on that port any more
    spec = file_spec(payload, base)
    with pytest.raises(WeightsUnavailableError) as info:
        weights.download(spec, progress=False)
    message = str(info.value)
    assert f"{base}/tiny_test.pth" in message
    assert str(weights.cache_dir() / "tiny_test.pth") in message
    assert "load_model(path)" in message
    assert cache_listing() == []


def test_http_error_is_unavailable(payload):
    with serve({}) as base:
        with pytest.raises(WeightsUnavailableError, match="HTTP 404"):
            weights.download(file_spec(payload, base), progress=False)
    assert cache_listing() == []


def test_no_url_error_says_where_to_get_it(monkeypatch):
    monkeypatch.delenv("NAPARI_SAM_BASE_URL", raising=False)
    # The registry's MedSAM now also downloads from the Hub (test_weights_hub.py); without that
    # source it is the example of a file that has no stable URL.
    no_source = MODELS["medsam_vit_b"].replace(hub_repo=None, hub_revision=None, hub_files={})
    with pytest.raises(WeightsUnavailableError) as info:
        weights.download(no_source, progress=False)
    message = str(info.value)
    assert "medsam_vit_b.pth" in message
    where = "https://github.com/bowang-lab/MedSAM"
    assert f"no stable URL: download it from {where} yourself" in message
    assert str(weights.cache_dir() / "medsam_vit_b.pth") in message


def test_unpinned_checksum_is_reported(payload, caplog):
    with serve({"tiny_test.pth": payload}) as base:
        with caplog.at_level(logging.WARNING, logger="napari_sam.weights.fetch"):
            weights.download(file_spec(payload, base, sha256=None), progress=False)
    assert hashlib.sha256(payload).hexdigest() in caplog.text


# --------------------------------------------------------------------------------------------
# Reading checkpoints safely


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle ran code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch_zip", "plain_pickle"])
def test_malicious_pickle_refused_code_never_runs(tmp_path, writer):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    obj = {"model": {"image_encoder.pos_embed": _Payload(marker)}}
    if writer == "torch_zip":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        weights.read_state_dict(path)
    assert not marker.exists()
    # The payload is live: an unsafe loader would have run it.
    pickle.loads(pickle.dumps(obj))
    assert marker.exists()


def test_pickled_module_refused(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules\.linear\.Linear"):
        weights.read_state_dict(path)


def _sd() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3), "n": torch.tensor(4)}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
        lambda sd: {"module." + k: v for k, v in sd.items()},
    ],
    ids=["plain", "model", "state_dict", "state_dict+module", "module"],
)
def test_wrappers_and_prefixes_removed(tmp_path, wrap):
    sd = _sd()
    path = tmp_path / "w.pth"
    torch.save(wrap(sd), path)
    got, spec = weights.read_state_dict(path)
    assert spec is None
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        ({}, ValueError, "holds no tensors"),
        ({"model": {"a": torch.ones(1), "b": 3}}, ValueError, "'b' is a int"),
        ([torch.ones(1)], ValueError, "holds a list, not a state dict"),
    ],
)
def test_not_a_state_dict(tmp_path, content, error, match):
    path = tmp_path / "x.pth"
    torch.save(content, path)
    with pytest.raises(error, match=match):
        weights.read_state_dict(path)


def test_broken_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        weights.read_state_dict(tmp_path / "missing.pth")
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(ValueError, match="empty"):
        weights.read_state_dict(empty)
    good = tmp_path / "good.pth"
    torch.save(_sd(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        weights.read_state_dict(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="cannot read"):
        weights.read_state_dict(garbage)


SMALL_VIT = small_vit_spec()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("half", [False, True])
def test_save_checkpoint_round_trip_with_spec(tmp_path, suffix, half):
    sd = _sd()
    path = weights.save_checkpoint(sd, tmp_path / f"ckpt{suffix}", spec=SMALL_VIT, half=half)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ckpt{suffix}"]
    got, spec = weights.read_state_dict(path)
    assert weights.same_architecture(spec, SMALL_VIT) and spec.name == "small_vit"
    assert got["a.weight"].dtype == torch.float32 and got["n"].dtype == torch.int64
    tol = 1e-3 if half else 0.0
    assert torch.allclose(got["a.weight"], sd["a.weight"], atol=tol, rtol=tol)
    assert torch.equal(got["n"], sd["n"])
    stored = _stored_dtype(path, "a.weight")
    assert stored == (torch.float16 if half else torch.float32)


def _stored_dtype(path, key):
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key).dtype
    return torch.load(path, weights_only=True)["model"][key].dtype


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    path.write_bytes(b"previous")

    def broken_save(obj, f, *args, **kwargs):
        pathlib.Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        weights.save_checkpoint(_sd(), path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


# --------------------------------------------------------------------------------------------
# Detection from shapes


def vit_encoder_shapes(embed_dim, depth, num_heads, global_blocks, image_size=1024):
    """The image-encoder tensors of an official SAM ViT checkpoint, as shapes only."""
    grid = image_size // 16
    head_dim = embed_dim // num_heads
    shapes = {
        "image_encoder.pos_embed": (1, grid, grid, embed_dim),
        "image_encoder.patch_embed.proj.weight": (embed_dim, 3, 16, 16),
        "image_encoder.neck.0.weight": (256, embed_dim, 1, 1),
    }
    for i in range(depth):
        n = 2 * grid - 1 if i in global_blocks else 27
        shapes[f"image_encoder.blocks.{i}.attn.rel_pos_h"] = (n, head_dim)
        shapes[f"image_encoder.blocks.{i}.attn.rel_pos_w"] = (n, head_dim)
        shapes[f"image_encoder.blocks.{i}.attn.qkv.weight"] = (3 * embed_dim, embed_dim)
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("vit_h", (1280, 32, 16, (7, 15, 23, 31))),
        ("vit_l", (1024, 24, 16, (5, 11, 17, 23))),
        ("vit_b", (768, 12, 12, (2, 5, 8, 11))),
    ],
)
def test_detect_official_vits(name, config):
    spec = weights.detect_spec(vit_encoder_shapes(*config))
    assert spec is MODELS[name]


def test_detect_custom_vit_image_size():
    spec = weights.detect_spec(vit_encoder_shapes(768, 12, 12, (2, 5, 8, 11), image_size=512))
    assert spec.name == "custom_vit_e768_d12_h12_s512" and spec.url is None
    assert spec.image_size == 512
    assert tuple(spec.encoder_kwargs["global_attn_indexes"]) == (2, 5, 8, 11)
    assert spec.encoder_kwargs["num_heads"] == 12


def test_detect_rejects_non_sam():
    with pytest.raises(ValueError, match="not a SAM checkpoint"):
        weights.detect_spec({"fc.weight": torch.empty(2, 2)})


def test_medsam_reads_as_vit_b_but_is_compatible():
    assert weights.same_architecture(MODELS["vit_b"], MODELS["medsam_vit_b"])
    assert not weights.same_architecture(MODELS["vit_b"], MODELS["vit_l"])
    assert not weights.same_architecture(MODELS["vit_b"], MODELS["vit_t"])


# The tests below build real (small) models from napari_sam.models.


@pytest.fixture(scope="module")
def build_sam():
    from napari_sam.models.build import build_sam

    return build_sam


SMALL_SPECS = [
    SMALL_VIT,
    ModelSpec(
        name="small_vit_w8",
        encoder="vit",
        encoder_kwargs={
            "embed_dim": 64,
            "depth": 3,
            "num_heads": 4,
            "global_attn_indexes": (0, 2),
            "window_size": 8,
        },
        image_size=256,
    ),
    ModelSpec(
        name="small_tiny_vit",
        encoder="tiny_vit",
        encoder_kwargs={
            "embed_dims": (32, 48, 64, 96),
            "depths": (1, 1, 2, 1),
            "num_heads": (1, 2, 2, 3),
            "window_sizes": (7, 5, 6, 7),
        },
    ),
]


@pytest.mark.parametrize("spec", SMALL_SPECS, ids=lambda s: s.name)
def test_detect_small_models_round_trip(build_sam, spec):
    sd = build_sam(spec).state_dict()
    found = weights.detect_spec(sd)
    assert found.name.startswith("custom_") and found.url is None
    assert weights.same_architecture(found, spec)
    rebuilt = build_sam(found).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in sd.items()}


@pytest.fixture(scope="module")
def mobile_sam_state():
    import reference

    torch.manual_seed(0)
    return reference.mobile_sam.sam_model_registry["vit_t"]().state_dict()


def test_detect_and_load_reference_mobile_sam(tmp_path, mobile_sam_state):
    assert weights.detect_spec(mobile_sam_state) is MODELS["vit_t"]
    path = tmp_path / "mobile_sam.pt"
    torch.save(mobile_sam_state, path)
    model = weights.load_model(path, device="cpu")
    assert model.spec is MODELS["vit_t"] and not model.training
    ours = model.state_dict()
    heads = {
        k
        for k in mobile_sam_state
        if k.startswith(("image_encoder.head", "image_encoder.norm_head"))
    }
    assert len(heads) == 4 and set(mobile_sam_state) - set(ours) == heads
    assert all(torch.equal(ours[k], mobile_sam_state[k]) for k in ours)


def test_load_state_dict_into_is_strict(build_sam):
    model = build_sam(SMALL_VIT)
    sd = build_sam(SMALL_VIT).state_dict()
    extra = dict(sd, **{"image_encoder.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected: image_encoder\.extra.*looks like"):
        weights.load_state_dict_into(model, extra)
    missing = {k: v for k, v in sd.items() if not k.startswith("mask_decoder.iou_token")}
    with pytest.raises(ValueError, match=r"missing: mask_decoder\.iou_token"):
        weights.load_state_dict_into(model, missing)
    other = build_sam(SMALL_SPECS[1]).state_dict()
    with pytest.raises(ValueError, match="looks like 'custom_vit_e64_d3_h4_s256'"):
        weights.load_state_dict_into(model, other)
    # Classifier-head keys are the only tolerated extras.
    heads = dict(sd, **{"image_encoder.head.weight": torch.zeros(2, 2)})
    weights.load_state_dict_into(model, heads)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


# --------------------------------------------------------------------------------------------
# load_model


def test_load_model_from_saved_checkpoint(tmp_path, build_sam):
    torch.manual_seed(1)
    original = build_sam(SMALL_VIT)
    path = weights.save_checkpoint(original, tmp_path / "small.safetensors")
    model = weights.load_model(path, device="cpu")
    assert model.spec.name == "small_vit" and model.spec.image_size == 256
    assert not model.training
    for k, v in original.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_loaded_weights_are_private_to_the_model(tmp_path, build_sam):
    # load_model hands the freshly read (memory-mapped) tensors to the model instead of copying:
    # changing the model must never write through to the file or to another loaded model.
    path = weights.save_checkpoint(build_sam(SMALL_VIT), tmp_path / "small.pth")
    digest = weights.sha256_file(path)
    first = weights.load_model(path, device="cpu")
    second = weights.load_model(path, device="cpu")
    with torch.no_grad():
        for param in first.parameters():
            param.add_(1.0)
    del first
    assert weights.sha256_file(path) == digest
    reread, _ = weights.read_state_dict(path)
    assert all(torch.equal(second.state_dict()[k], v) for k, v in reread.items())


def test_load_model_detects_unlabelled_file_and_checks_type(tmp_path, build_sam):
    torch.manual_seed(2)
    sd = build_sam(SMALL_VIT).state_dict()
    path = tmp_path / "plain.pth"
    torch.save({"model": sd}, path)
    model = weights.load_model(str(path), device="cpu")
    assert model.spec.name == "custom_vit_e64_d2_h2_s256"
    assert torch.equal(model.state_dict()["image_encoder.pos_embed"], sd["image_encoder.pos_embed"])
    with pytest.raises(ValueError, match=r"'vit_b' was requested.*custom_vit_e64_d2_h2_s256"):
        weights.load_model(path, model_type="vit_b", device="cpu")
    with pytest.raises(ValueError, match="'vit_l' was requested"):
        weights.load_model("vit_l", checkpoint=path, device="cpu")


def test_model_type_with_same_layout_is_used(tmp_path, build_sam):
    sd = build_sam(SMALL_VIT).state_dict()
    path = tmp_path / "plain.pth"
    torch.save(sd, path)
    medsam_like = SMALL_VIT.replace(name="small_medsam", preprocessing="medsam")
    model = weights.load_model(path, model_type=medsam_like, device="cpu")
    assert model.spec is medsam_like


def test_load_model_by_name_downloads_once(tmp_path, build_sam, monkeypatch):
    torch.manual_seed(3)
    original = build_sam(SMALL_VIT)
    data_path = weights.save_checkpoint(original, tmp_path / "served.pth")
    data = data_path.read_bytes()
    with serve({"tiny_test.pth": data}) as base:
        spec = file_spec(
            data,
            base,
            encoder_kwargs=SMALL_VIT.encoder_kwargs,
            image_size=SMALL_VIT.image_size,
        )
        monkeypatch.setitem(MODELS, spec.name, spec)
        with pytest.raises(WeightsUnavailableError, match="download=False"):
            weights.load_model("tiny_test", download=False, device="cpu")
        model = weights.load_model("tiny_test", device="cpu")
    assert model.spec is spec
    assert weights.cached_path(spec).read_bytes() == data
    # Cached now: no server needed.
    again = weights.load_model(spec, device="cpu")
    for k, v in original.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_load_model_is_exported_lazily():
    import napari_sam

    assert napari_sam.load_model is weights.load_model


def test_load_model_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="neither a registered model"):
        weights.load_model(tmp_path / "nothing.pth")
    # MedSAM without its Hub source (test_weights_hub.py tests that one).
    no_source = MODELS["medsam_vit_b"].replace(hub_repo=None, hub_revision=None, hub_files={})
    monkeypatch.setitem(MODELS, "medsam_vit_b", no_source)
    with pytest.raises(WeightsUnavailableError, match="no stable URL"):
        weights.load_model("medsam_vit_b")


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert weights.resolve_device("auto") == torch.device("cpu")
    assert weights.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        weights.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        weights.resolve_device("quantum")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert weights.resolve_device("auto") == torch.device("cuda")


# --------------------------------------------------------------------------------------------
# Files that declare more than they hold


HUGE_VIT = ModelSpec(
    name="huge_forgery",
    encoder="vit",
    encoder_kwargs={"embed_dim": 4096, "depth": 64, "num_heads": 32, "global_attn_indexes": ()},
)


@pytest.fixture
def builds(monkeypatch):
    """The devices every model build happened on (meta: a skeleton without weights)."""
    from napari_sam.weights import loading

    seen: list[str] = []
    real = loading.build_architecture

    def recording(spec):
        seen.append(torch.get_default_device().type)
        return real(spec)

    monkeypatch.setattr(loading, "build_architecture", recording)
    return seen


def test_tiny_file_claiming_a_huge_model_is_refused_unbuilt(tmp_path, builds):
    # A 12-billion-parameter claim in a file of a few hundred bytes.
    path = weights.save_checkpoint(
        {"image_encoder.pos_embed": torch.zeros(1, 2, 2, 4)},
        tmp_path / "forged.safetensors",
        spec=HUGE_VIT,
    )
    assert path.stat().st_size < 1024
    with pytest.raises(
        ValueError,
        match=r"forged\.safetensors does not hold a model's weights "
        r"\(it claims to hold 'huge_forgery'.*patch_embed",
    ):
        weights.load_model(path, device="cpu")
    assert builds == []


def test_embedded_spec_must_match_the_tensors(tmp_path, small_sam, builds):
    sd = small_sam.state_dict()
    path = weights.save_checkpoint(sd, tmp_path / "lying.safetensors", spec=HUGE_VIT)
    with pytest.raises(
        ValueError,
        match=r"claims to hold 'huge_forgery'.*but its tensors are "
        r"those of 'custom_vit_e64_d2_h2_s256'.*save_checkpoint",
    ):
        weights.load_model(path, device="cpu")
    assert builds == []
    # A registered name in the file is no more trusted than a custom spec.
    path = weights.save_checkpoint(sd, tmp_path / "lying.pth", spec=MODELS["vit_h"])
    with pytest.raises(ValueError, match=r"claims to hold 'vit_h'"):
        weights.load_model(path, device="cpu")
    assert builds == []


def test_every_tensor_is_checked_before_the_model_is_built(tmp_path, small_sam, builds):
    sd = dict(small_sam.state_dict())
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)  # the encoder alone looks right
    path = weights.save_checkpoint(sd, tmp_path / "bad_decoder.safetensors", spec=SMALL_VIT)
    with pytest.raises(
        ValueError, match=r"shape mismatch.*iou_token\.weight \(1, 7\) vs \(1, 256\)"
    ):
        weights.load_model(path, device="cpu")
    assert builds == ["meta"]
    builds.clear()
    good = weights.save_checkpoint(small_sam, tmp_path / "good.safetensors")
    assert weights.load_model(good, device="cpu").spec.name == "small_vit"
    assert builds == ["meta", "cpu"]


def test_all_global_vit_window_size_is_not_part_of_the_layout(tmp_path, build_sam):
    kwargs = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (0, 1)}
    spec = ModelSpec(
        name="all_global",
        encoder="vit",
        image_size=128,
        encoder_kwargs={**kwargs, "window_size": 8},
    )
    assert weights.same_architecture(spec, spec.replace(encoder_kwargs=kwargs))
    windowed = {**kwargs, "global_attn_indexes": (1,)}
    assert not weights.same_architecture(
        spec.replace(encoder_kwargs={**windowed, "window_size": 8}),
        spec.replace(encoder_kwargs=windowed),
    )
    path = weights.save_checkpoint(build_sam(spec), tmp_path / "all_global.pth")
    assert weights.load_model(path, device="cpu").spec == spec


def _safetensors_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    import json
    import struct

    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "content",
    [
        # A header length of 2**62 bytes.
        (1 << 62).to_bytes(8, "little") + b"{}",
        # One tensor of 10**12 floats with 16 bytes of data.
        _safetensors_bytes(
            {"a": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}, bytes(16)
        ),
        # Data offsets far past the end of the file.
        _safetensors_bytes(
            {"a": {"dtype": "F32", "shape": [10**5, 10**5], "data_offsets": [0, 4 * 10**10]}},
            bytes(16),
        ),
    ],
    ids=["header_length", "tensor_shape", "data_offsets"],
)
def test_safetensors_declaring_more_than_the_file_holds(tmp_path, content):
    path = tmp_path / "forged.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot read .*forged\.safetensors as safetensors"):
        weights.read_state_dict(path)


def test_torch_file_declaring_a_larger_storage_than_it_holds(tmp_path):
    import zipfile

    path = tmp_path / "small.pth"
    torch.save({"a": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as z:
        records = {name.split("/", 1)[1]: z.read(name) for name in z.namelist()}
    # The storage's element count and the tensor's shape, 4 each (BININT1 4), become 5 * 10**8.
    pickled = records["data.pkl"]
    small = b"K\x04"
    assert pickled.count(small) == 2
    records["data.pkl"] = pickled.replace(small, b"J" + (5 * 10**8).to_bytes(4, "little"))
    forged = tmp_path / "forged.pth"
    writer = torch._C.PyTorchFileWriter(str(forged))
    for name in ("data.pkl", "byteorder", "data/0"):
        writer.write_record(name, records[name], len(records[name]))
    writer.write_end_of_file()
    assert forged.stat().st_size < 4096
    with pytest.raises(ValueError, match=r"forged\.pth: it is truncated, corrupt"):
        weights.read_state_dict(forged)

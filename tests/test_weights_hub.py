"""Hub downloads through huggingface_hub, against a minimal Hub served on 127.0.0.1.

The server implements what ``hf_hub_download`` needs: ``HEAD`` and ``GET`` of
``/{repo}/resolve/{revision}/{filename}`` with ``X-Repo-Commit``, ``X-Linked-Etag`` / ``ETag``,
``Content-Length``, ``Accept-Ranges`` and ``Range`` -> ``206``; gated repositories answer 401
with ``X-Error-Code: GatedRepo`` unless the right token is sent. It can drop a connection in
the middle of a file, and fail later requests, to test resuming and clean failures.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from napari_sam import load_model, weights
from napari_sam.models.build import build_sam
from napari_sam.registry import MODELS, ModelSpec
from napari_sam.weights import ChecksumError, DownloadCancelled, WeightsUnavailableError

REPO = "lab/tiny-sam"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILE = "model.safetensors"
TOKEN = "hf_secret_test_token"


class _HubHandler(BaseHTTPRequestHandler):
    timeout = 10  # a stuck client cannot hold a handler thread for longer

    def _target(self) -> tuple[dict, bytes] | None:
        match = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", self.path)
        server = self.server
        self.server.log.append(
            (self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization"))
        )
        if match is None or match.group(1) != REPO:
            self._error(404, "RepoNotFound")
            return None
        if server.gated and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._error(401, "GatedRepo")
            return None
        if match.group(2) not in (COMMIT, "main"):
            self._error(404, "RevisionNotFound")
            return None
        data = server.files.get(match.group(3))
        if data is None:
            self._error(404, "EntryNotFound")
            return None
        return {"sha": hashlib.sha256(data).hexdigest()}, data

    def _error(self, code: int, error_code: str) -> None:
        self.send_response(code)
        self.send_header("X-Error-Code", error_code)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _headers(self, code: int, meta: dict, length: int, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("X-Repo-Commit", COMMIT)
        # LFS files: the linked ETag is the file's SHA-256, as on the Hub.
        self.send_header("X-Linked-Etag", f'"{meta["sha"]}"')
        self.send_header("ETag", f'"{meta["sha"]}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def do_HEAD(self) -> None:
        found = self._target()
        if found is not None:
            self._headers(200, found[0], len(found[1]))

    def do_GET(self) -> None:
        found = self._target()
        if found is None:
            return
        meta, data = found
        server = self.server
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if server.fail_after_drop and server.dropped:
            self._error(500, "ServerError")
            return
        if ranged:
            start = int(ranged.group(1))
            self._headers(
                206,
                meta,
                len(data) - start,
                {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
            )
        else:
            self._headers(200, meta, len(data))
        body = data[start:]
        if server.drop_once and not server.dropped:
            # Announce the whole length, send two thirds, then drop the connection. (The
            # client keeps what it received in whole 10 MB chunks; the payload is 18 MB.)
            server.dropped = True
            self.wfile.write(body[: 2 * len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def hub_server(files: dict[str, bytes], **behaviour) -> Iterator[ThreadingHTTPServer]:
    """A Hub on 127.0.0.1 serving ``files`` of ``REPO``; always stops (watchdog: 60 s)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    server.daemon_threads = True
    server.files = files
    server.log = []
    server.gated = behaviour.get("gated", False)
    server.drop_once = behaviour.get("drop_once", False)
    server.fail_after_drop = behaviour.get("fail_after_drop", False)
    server.dropped = False
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    watchdog = threading.Timer(60, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield server
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


SMALL = ModelSpec(
    name="tiny_hub",
    encoder="vit",
    encoder_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,)},
    image_size=64,
)


@pytest.fixture(scope="module")
def payload() -> bytes:
    """A real small checkpoint (safetensors), so that a download can also be loaded."""
    import tempfile

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = weights.save_checkpoint(build_sam(SMALL), Path(tmp) / "m.safetensors")
        return path.read_bytes()


def _spec(payload: bytes, **changes) -> ModelSpec:
    fields = {
        "name": "tiny_hub",
        "hub_repo": REPO,
        "hub_revision": COMMIT,
        "hub_files": {FILE: hashlib.sha256(payload).hexdigest()},
        **changes,
    }
    return SMALL.replace(**fields)


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An empty Hugging Face cache, online, no token; returns the cache folder."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return cache


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _blobs(cache: Path) -> list[Path]:
    return [p for p in _files_under(cache) if "blobs" in p.parts or p.name.endswith(".incomplete")]


def test_good_download_then_offline_mode_finds_it(payload, hub_env, monkeypatch):
    spec = _spec(payload)
    seen = []
    with hub_server({FILE: payload}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        path = weights.download(
            spec, progress=False, progress_callback=lambda n, total: seen.append((n, total))
        )
        requests = list(server.log)
    assert path == weights.destination(spec) and path.is_dir()
    assert (path / FILE).read_bytes() == payload
    assert weights.cached_path(spec) == path
    assert seen[-1] == (len(payload), len(payload))
    # The pinned commit was asked for, not a branch.
    assert {(m, p) for m, p, _, _ in requests} == {
        ("HEAD", f"/{REPO}/resolve/{COMMIT}/{FILE}"),
        ("GET", f"/{REPO}/resolve/{COMMIT}/{FILE}"),
    }
    # The Hub's cache holds the blob under its SHA-256 (shared with transformers).
    assert [p.name for p in _blobs(hub_env)] == [spec.hub_files[FILE]]

    # Offline, without this package's copy: found in the Hub cache, verified, installed again,
    # with no request (the server is gone).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import shutil

    shutil.rmtree(path)
    assert weights.cached_path(spec) is None
    assert weights.download(spec, progress=False) == path
    monkeypatch.setitem(MODELS, spec.name, spec)
    model = load_model(spec.name, device="cpu")
    torch.manual_seed(0)
    reference = build_sam(SMALL).state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())


def test_offline_without_the_files_says_so(payload, hub_env, monkeypatch):
    spec = _spec(payload)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with hub_server({FILE: payload}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE") as info:
            weights.download(spec, progress=False)
        assert server.log == []
    assert f"hf download {REPO} {FILE} --revision {COMMIT}" in str(info.value)
    assert _files_under(weights.cache_dir()) == []


def test_wrong_checksum_leaves_nothing_usable(payload, hub_env, monkeypatch):
    spec = _spec(payload, hub_files={FILE: "0" * 64})
    with hub_server({FILE: payload}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(ChecksumError, match="SHA-256 mismatch") as info:
            weights.download(spec, progress=False)
    message = str(info.value)
    assert "0" * 64 in message and hashlib.sha256(payload).hexdigest() in message
    assert "nothing was installed" in message
    assert _files_under(weights.cache_dir()) == []
    assert weights.cached_path(spec) is None
    # Deleted from the Hub cache too: neither this package nor transformers will reuse it.
    assert _blobs(hub_env) == []
    assert not any(p.name == FILE for p in hub_env.rglob("*"))


def test_dropped_connection_is_resumed_with_a_range_request(payload, hub_env, monkeypatch):
    spec = _spec(payload)
    with hub_server({FILE: payload}, drop_once=True) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        path = weights.download(spec, progress=False)
        gets = [r for m, _, r, _ in server.log if m == "GET"]
    assert server.dropped
    assert gets[0] is None and re.fullmatch(r"bytes=\d+-", gets[1])
    assert 0 < int(gets[1][6:-1]) < len(payload)
    assert (path / FILE).read_bytes() == payload


def test_dropped_connection_that_cannot_resume_fails_cleanly(payload, hub_env, monkeypatch):
    spec = _spec(payload)
    with hub_server({FILE: payload}, drop_once=True, fail_after_drop=True) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(WeightsUnavailableError, match="the transfer failed"):
            weights.download(spec, progress=False)
    assert _files_under(weights.cache_dir()) == []
    assert _blobs(hub_env) == []  # no partial blob under any name
    # A later, healthy attempt starts over and succeeds.
    with hub_server({FILE: payload}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        assert (weights.download(spec, progress=False) / FILE).read_bytes() == payload


def test_gated_repo_needs_the_token(payload, hub_env, monkeypatch):
    spec = _spec(payload)
    with hub_server({FILE: payload}, gated=True) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(WeightsUnavailableError, match="gated") as info:
            weights.download(spec, progress=False)
        assert "hf auth login" in str(info.value)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        path = weights.download(spec, progress=False)
        auths = {a for m, _, _, a in server.log if m == "GET"}
    assert auths == {f"Bearer {TOKEN}"}
    assert (path / FILE).read_bytes() == payload


def test_cancel_and_missing_file(payload, hub_env, monkeypatch):
    spec = _spec(payload)
    with hub_server({FILE: payload}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(DownloadCancelled):
            weights.download(spec, progress=False, cancel=lambda: True)
        assert _files_under(weights.cache_dir()) == [] and _blobs(hub_env) == []
        other = _spec(payload, hub_files={"pytorch_model.bin": None})
        with pytest.raises(WeightsUnavailableError, match="no such file"):
            weights.download(other, progress=False)


def test_hub_specs_validate_and_round_trip(payload):
    spec = _spec(payload)
    assert spec.downloadable and not SMALL.downloadable
    assert ModelSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="hub_revision"):
        SMALL.replace(hub_repo=REPO, hub_files={FILE: None})
    with pytest.raises(ValueError, match="valid SHA-256"):
        _spec(payload, hub_files={FILE: "abc"})
    medsam = MODELS["medsam_vit_b"]
    assert medsam.downloadable and medsam.preprocessing == "medsam"
    assert re.fullmatch(r"[0-9a-f]{40}", medsam.hub_revision)
    assert medsam.hub_repo == "wanglab/medsam-vit-base"

"""Downloading a registered model's weights into the cache folder, verified.

The file is streamed into a temporary file beside the final one and renamed into place only
after its size and SHA-256 match the registry's: a failed, cancelled or mismatching download
never leaves a file under the final name. Every failure says what to do instead (where to put
a file fetched by hand).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from napari_sam.io.atomic import atomic_path
from napari_sam.registry import ModelSpec
from napari_sam.weights.cache import CACHE_ENV, CHUNK, as_spec, destination

__all__ = [
    "BASE_URL_ENV",
    "ChecksumError",
    "DownloadCancelled",
    "WeightsUnavailableError",
    "download",
    "unavailable_message",
]

logger = logging.getLogger(__name__)

BASE_URL_ENV = "NAPARI_SAM_BASE_URL"
_TIMEOUT_S = 30.0


class ChecksumError(ValueError):
    """A downloaded file's size or SHA-256 differs from the one the registry pins."""


class DownloadCancelled(Exception):
    """The caller's ``cancel()`` returned True; the partial file was deleted."""


class WeightsUnavailableError(RuntimeError):
    """The weights cannot be downloaded (offline, HTTP error, no stable URL)."""


def _source_url(spec: ModelSpec, base_url: str | None) -> str | None:
    base = base_url if base_url is not None else os.environ.get(BASE_URL_ENV) or None
    if base:
        # A mirror holds the files under their registry names (none: nothing to look up).
        return None if spec.filename is None else base.rstrip("/") + "/" + spec.filename
    return spec.url


def unavailable_message(spec: ModelSpec, dest: Path, url: str | None, reason: str) -> str:
    """Why ``spec``'s weights cannot be fetched, and where to put a file fetched by hand."""
    where = spec.homepage or "the model's project page (see docs/models.md)"
    if url:
        head = (
            f"cannot download {spec.filename} for model {spec.name!r} from {url}: {reason}.\n"
            f"Download it from {url} (or via {where}) yourself and put it at:"
        )
    else:
        head = (
            f"cannot download {spec.filename} for model {spec.name!r}: no stable URL: "
            f"download it from {where} yourself and put it at:"
        )
    return (
        f"{head}\n    {dest}\n"
        "or keep it anywhere and load it with napari_sam.load_model(path) "
        "(any path works; the model type is read from the file)."
    )


class _CacheWriteError(OSError):
    """Writing to the cache folder failed: a local problem, not a network one."""


def download(
    spec_or_name: ModelSpec | str,
    *,
    progress: bool = True,
    cancel: Callable[[], bool] | None = None,
    progress_callback: Callable[[int, int | None], None] | None = None,
    base_url: str | None = None,
) -> Path:
    """Download a model's weights into the cache folder and verify them.

    The file is streamed into a temporary file beside the final one, its size and SHA-256 are
    checked against the registry (when it pins them), and only then is it renamed into place;
    an existing file of that name is replaced only by a verified one. A spec with a Hugging
    Face Hub source (``hub_repo``) is fetched by :func:`napari_sam.weights.hub.download`
    instead, with the same guarantees; the result is then a folder (``base_url`` does not
    apply: a Hub mirror is set with ``HF_ENDPOINT``).

    Parameters
    ----------
    spec_or_name : ModelSpec or str
        Registered model name (``"vit_b"``) or a spec with ``filename`` (and ``url``).
    progress : bool
        Show a progress bar on stderr.
    cancel : callable, optional
        Polled between chunks; when it returns True the download stops.
    progress_callback : callable, optional
        Called as ``progress_callback(bytes_done, bytes_total_or_None)`` after each chunk.
    base_url : str, optional
        Mirror folder holding the file under its registry name; overrides ``spec.url``.
        Defaults to ``$NAPARI_SAM_BASE_URL`` when set.

    Returns
    -------
    Path
        The verified file in the cache folder.

    Raises
    ------
    WeightsUnavailableError
        Offline, HTTP error, interrupted transfer, or no URL known.
    ChecksumError
        Size or SHA-256 differs from the registry's.
    DownloadCancelled
        ``cancel()`` returned True.
    """
    spec = as_spec(spec_or_name)
    if spec.hub_repo:
        from napari_sam.weights import hub

        return hub.download(
            spec, progress=progress, cancel=cancel, progress_callback=progress_callback
        )
    dest = destination(spec)
    url = _source_url(spec, base_url)
    if not url:
        raise WeightsUnavailableError(unavailable_message(spec, dest, None, "no URL"))

    with atomic_path(dest) as tmp:
        digest, size = _stream(url, tmp, spec, dest, progress, cancel, progress_callback)
        if spec.size_bytes is not None and size != spec.size_bytes:
            raise ChecksumError(
                f"downloaded {spec.filename} from {url} has {size} bytes, expected "
                f"{spec.size_bytes}; the file was discarded. The mirror may hold another "
                "version: try again or download it yourself."
            )
        if spec.sha256 is not None and digest != spec.sha256.lower():
            raise ChecksumError(
                f"SHA-256 mismatch for {spec.filename} from {url}: expected {spec.sha256}, "
                f"got {digest}; the file was discarded."
            )
        if spec.sha256 is None:
            logger.warning(
                "no SHA-256 is pinned for %s (model %r); the downloaded file's is %s",
                spec.filename,
                spec.name,
                digest,
            )
    return dest


def _stream(
    url: str,
    tmp: Path,
    spec: ModelSpec,
    dest: Path,
    progress: bool,
    cancel: Callable[[], bool] | None,
    progress_callback: Callable[[int, int | None], None] | None,
) -> tuple[str, int]:
    """Copy ``url`` into ``tmp``; return the SHA-256 and byte count of what arrived."""
    digest = hashlib.sha256()
    done = 0
    bar = None
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "napari-sam-volumes"})
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else spec.size_bytes
            if progress:
                from tqdm import tqdm

                bar = tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=spec.filename,
                    file=sys.stderr,
                )
            with open(tmp, "wb") as out:
                while True:
                    if cancel is not None and cancel():
                        raise DownloadCancelled(f"download of {spec.filename} cancelled")
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        raise _CacheWriteError(
                            exc.errno,
                            f"cannot write the download to {tmp.parent} ({exc.strerror}); free "
                            f"some space or point {CACHE_ENV} at another folder",
                        ) from None
                    digest.update(chunk)
                    done += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                    if progress_callback is not None:
                        progress_callback(done, total)
            if length and length.isdigit() and done != int(length):
                raise WeightsUnavailableError(
                    unavailable_message(
                        spec, dest, url, f"the transfer stopped after {done} of {length} bytes"
                    )
                )
    except _CacheWriteError:
        raise
    except urllib.error.HTTPError as exc:
        raise WeightsUnavailableError(
            unavailable_message(spec, dest, url, f"HTTP {exc.code} {exc.reason}")
        ) from None
    except urllib.error.URLError as exc:
        raise WeightsUnavailableError(
            unavailable_message(spec, dest, url, f"no connection ({exc.reason})")
        ) from None
    except (OSError, EOFError, http.client.HTTPException) as exc:
        # IncompleteRead, connection resets and timeouts mid-transfer.
        raise WeightsUnavailableError(
            unavailable_message(
                spec, dest, url, f"the transfer broke off after {done} bytes ({exc!r})"
            )
        ) from None
    finally:
        if bar is not None:
            bar.close()
    return digest.hexdigest(), done

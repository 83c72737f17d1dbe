"""Weights from the Hugging Face Hub, verified before they count as cached.

A registry entry with ``hub_repo`` names a Hub repository, a pinned ``hub_revision`` (a commit)
and ``hub_files`` (file name -> SHA-256 or None). :func:`download` fetches each file with
``huggingface_hub.hf_hub_download`` into the Hub's own cache (shared with transformers; resumed
after a dropped connection; ``HF_HUB_OFFLINE=1`` uses only what is there; ``HF_ENDPOINT`` picks
a mirror; gated repositories use the token from ``HF_TOKEN`` or ``hf auth login``). Then:

1. every file's SHA-256 is checked against the registry; a mismatching file is deleted from the
   Hub cache too, so that nothing reuses it, and :class:`~napari_sam.weights.ChecksumError`
   says what to do;
2. only when all files match are they linked (or copied) into a temporary folder in this
   package's cache, which is then renamed to :func:`destination`. A failed, cancelled or
   mismatching download never leaves a folder under that name.

The folder is a transformers-format checkpoint, read by :mod:`napari_sam.weights.hf`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from napari_sam.registry import ModelSpec
from napari_sam.weights.cache import cache_dir, sha256_file
from napari_sam.weights.fetch import ChecksumError, DownloadCancelled, WeightsUnavailableError

__all__ = ["cached_path", "destination", "download"]

logger = logging.getLogger(__name__)

_TRUE = {"1", "on", "yes", "true"}


def _hub_repo(spec: ModelSpec) -> str:
    """The entry's Hub repository ``owner/name``; a ValueError for an entry without one."""
    if not spec.hub_repo:
        raise ValueError(f"model {spec.name!r} names no Hugging Face Hub repository")
    return spec.hub_repo


def _folder_name(spec: ModelSpec) -> str:
    revision = (spec.hub_revision or "main").replace("/", "-")
    # 12 hex digits name a commit unambiguously and keep the path short (Windows).
    if len(revision) == 40:
        revision = revision[:12]
    return f"hub--{_hub_repo(spec).replace('/', '--')}--{revision}"


def destination(spec: ModelSpec) -> Path:
    """Folder in this package's cache that holds a Hub entry's verified files (may not exist)."""
    if not spec.hub_repo:
        raise ValueError(f"model {spec.name!r} names no Hugging Face Hub repository")
    return cache_dir() / _folder_name(spec)


def cached_path(spec: ModelSpec) -> Path | None:
    """The verified folder of a Hub entry, or None when any of its files is missing."""
    folder = destination(spec)
    if all((folder / name).is_file() for name in spec.hub_files):
        return folder
    return None


def _offline() -> bool:
    # Read at call time as well as at import (huggingface_hub reads it once, at import).
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def _progress_class(
    label: str,
    progress: bool,
    cancel: Callable[[], bool] | None,
    progress_callback: Callable[[int, int | None], None] | None,
) -> type:
    """A tqdm class for huggingface_hub that reports bytes and polls ``cancel`` per chunk."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class _Progress(hub_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if not progress:
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            # A disabled tqdm does not count, so the bytes are counted here.
            self._bytes = int(kwargs.get("initial") or 0)

        def update(self, n: float | None = 1) -> bool | None:
            if cancel is not None and cancel():
                raise DownloadCancelled(f"download of {label} cancelled")
            self._bytes += int(n or 0)
            if progress_callback is not None:
                progress_callback(self._bytes, self.total)
            return super().update(n)

    return _Progress


def _hint(spec: ModelSpec, dest: Path) -> str:
    files = " ".join(spec.hub_files)
    text = (
        f"To get the files another way: on a machine with access run\n"
        f"    hf download {spec.hub_repo} {files} --revision {spec.hub_revision}\n"
        f"and copy the Hugging Face cache (~/.cache/huggingface/hub), or put the files into\n"
        f"    {dest}\n"
        "or load any folder holding them with napari_sam.load_model(folder)."
    )
    if spec.filename:
        where = f" from {spec.homepage}" if spec.homepage else ""
        text += f"\nOr put {spec.filename}{where} at {cache_dir() / spec.filename}."
    return text


def _fetch(
    spec: ModelSpec,
    filename: str,
    dest: Path,
    progress_class: type,
    token: str | bool | None,
    endpoint: str | None,
) -> Path:
    from huggingface_hub import errors, hf_hub_download

    where = f"{filename} of {spec.hub_repo} at revision {spec.hub_revision}"
    offline = _offline()
    try:
        path = hf_hub_download(
            _hub_repo(spec),
            filename,
            revision=spec.hub_revision,
            token=token,
            endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None,
            local_files_only=offline,
            tqdm_class=progress_class,
        )
    except DownloadCancelled:
        raise
    except errors.GatedRepoError:
        reason = (
            f"{spec.hub_repo} is gated: accept its terms on its Hub page while logged in, then "
            "give this machine your token (`hf auth login`, or set HF_TOKEN)"
        )
    except errors.RepositoryNotFoundError:
        reason = (
            f"repository {spec.hub_repo} was not found, or it is private and no valid token "
            "was sent (`hf auth login`, or set HF_TOKEN)"
        )
    except errors.RevisionNotFoundError:
        reason = f"the repository has no revision {spec.hub_revision}"
    except errors.LocalEntryNotFoundError:
        reason = (
            "offline mode (HF_HUB_OFFLINE) is on and the file is not in the Hugging Face cache"
            if offline
            else "the Hub cannot be reached and the file is not in the Hugging Face cache"
        )
    except errors.EntryNotFoundError:
        reason = "the repository has no such file at that revision"
    except Exception as exc:
        # HTTP errors, size checks (OSError), and httpx's network errors once
        # huggingface_hub's own retries (which resume with a Range request) are used up.
        reason = f"the transfer failed ({type(exc).__name__}: {exc})"
    else:
        return Path(path)
    raise WeightsUnavailableError(
        f"cannot download {where} for model {spec.name!r}: {reason}.\n{_hint(spec, dest)}"
    ) from None


def _evict(path: Path) -> None:
    """Delete a file from the Hugging Face cache: its snapshot entry and the blob behind it."""
    blob = Path(os.path.realpath(path))
    path.unlink(missing_ok=True)
    if blob != path:
        blob.unlink(missing_ok=True)


def _link_or_copy(source: Path, target: Path) -> None:
    real = Path(os.path.realpath(source))
    try:
        # A hard link costs no space and survives a cleared Hugging Face cache.
        os.link(real, target)
    except OSError:
        shutil.copyfile(real, target)


@contextmanager
def _temporary_folder_beside(dest: Path) -> Iterator[Path]:
    """A temporary folder in ``dest``'s parent, deleted unless the body renamed it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(
    spec: ModelSpec,
    *,
    progress: bool = True,
    cancel: Callable[[], bool] | None = None,
    progress_callback: Callable[[int, int | None], None] | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> Path:
    """Fetch a Hub entry's files, verify them, and install them in this package's cache.

    Parameters
    ----------
    spec : ModelSpec
        With ``hub_repo``, ``hub_revision`` and ``hub_files``.
    progress : bool
        Show huggingface_hub's progress bar on stderr.
    cancel : callable, optional
        Polled per chunk; True stops the download (:class:`~napari_sam.weights.DownloadCancelled`).
    progress_callback : callable, optional
        ``progress_callback(bytes_done, bytes_total_or_None)`` per chunk, per file.
    token : str or bool, optional
        Hub token; default: huggingface_hub's (``HF_TOKEN``, then ``hf auth login``'s).
    endpoint : str, optional
        Hub address; default ``$HF_ENDPOINT``, else https://huggingface.co.

    Returns
    -------
    Path
        :func:`destination`, holding every file of ``spec.hub_files``, verified.

    Raises
    ------
    WeightsUnavailableError
        Offline without the files cached, unreachable, gated, not found, broken transfer.
    ChecksumError
        A file's SHA-256 differs from the registry's; it is deleted from both caches.
    DownloadCancelled
        ``cancel()`` returned True.
    """
    if not spec.hub_repo or not spec.hub_files:
        raise ValueError(f"model {spec.name!r} names no Hugging Face Hub repository and files")
    dest = destination(spec)
    fetched: dict[str, Path] = {}
    for filename in spec.hub_files:
        bar = _progress_class(filename, progress, cancel, progress_callback)
        fetched[filename] = _fetch(spec, filename, dest, bar, token, endpoint)
    with _temporary_folder_beside(dest) as tmp:
        for filename, path in fetched.items():
            expected = spec.hub_files[filename]
            digest = sha256_file(path)
            if expected is not None and digest != expected.lower():
                _evict(path)
                raise ChecksumError(
                    f"SHA-256 mismatch for {filename} of {spec.hub_repo} at revision "
                    f"{spec.hub_revision}: expected {expected}, got {digest}. The file was "
                    "deleted (from the Hugging Face cache too); nothing was installed. A "
                    "mirror (HF_ENDPOINT) may serve another file: try again, or check the "
                    f"file yourself.\n{_hint(spec, dest)}"
                )
            if expected is None:
                logger.warning(
                    "no SHA-256 is pinned for %s of %s (model %r); its SHA-256 is %s",
                    filename,
                    spec.hub_repo,
                    spec.name,
                    digest,
                )
            (tmp / filename).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(path, tmp / filename)
        if cached_path(spec) is not None:
            return dest  # another download finished first; its files are verified too
        if dest.exists():
            # An incomplete folder (files removed by hand, or an older file list).
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    return dest

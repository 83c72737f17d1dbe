"""The model cache folder: where downloaded weights are kept, and atomic writes into it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from napari_sam.registry import ModelSpec, get_spec

__all__ = [
    "CACHE_ENV",
    "as_spec",
    "cache_dir",
    "cached_path",
    "destination",
    "is_cached",
    "sha256_file",
]

CACHE_ENV = "NAPARI_SAM_CACHE"
CHUNK = 1 << 20


def cache_dir() -> Path:
    r"""Folder where downloaded weights are kept, created on demand.

    ``$NAPARI_SAM_CACHE`` when set, else the per-user cache folder from
    ``pooch.os_cache("napari-sam")``: ``~/.cache/napari-sam`` on Linux (``$XDG_CACHE_HOME``
    respected), ``~/Library/Caches/napari-sam`` on macOS,
    ``%LOCALAPPDATA%\napari-sam\napari-sam\Cache`` on Windows.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        path = Path(env).expanduser()
    else:
        import pooch

        path = Path(pooch.os_cache("napari-sam"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def as_spec(spec_or_name: ModelSpec | str) -> ModelSpec:
    """The spec itself, or the one registered under a name (ValueError for unknown names)."""
    if isinstance(spec_or_name, ModelSpec):
        return spec_or_name
    if isinstance(spec_or_name, str):
        return get_spec(spec_or_name)
    raise TypeError(f"expected a model name or a ModelSpec, got {type(spec_or_name).__name__}")


def destination(spec_or_name: ModelSpec | str) -> Path:
    """Path where the weights of a registered model go in the cache folder (may not exist)."""
    spec = as_spec(spec_or_name)
    if not spec.filename and spec.hub_repo:
        from napari_sam.weights import hub

        return hub.destination(spec)
    if not spec.filename:
        raise ValueError(
            f"model {spec.name!r} has no file name, so it has no place in the cache; "
            "pass its checkpoint file to load_model(path) instead"
        )
    return cache_dir() / spec.filename


def cached_path(spec_or_name: ModelSpec | str) -> Path | None:
    """The cached weights file of a model, or None when it is not in the cache.

    A file supplied by hand under the spec's ``filename`` comes first; for a Hugging Face Hub
    entry the verified folder of its files (:func:`napari_sam.weights.hub.cached_path`) next.
    """
    spec = as_spec(spec_or_name)
    if spec.filename and (path := cache_dir() / spec.filename).is_file():
        return path
    if spec.hub_repo:
        from napari_sam.weights import hub

        return hub.cached_path(spec)
    return None


def is_cached(spec_or_name: ModelSpec | str) -> bool:
    """True when the model's weights file is in the cache folder."""
    return cached_path(spec_or_name) is not None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()

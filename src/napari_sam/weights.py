"""Model weights: the cache folder, verified downloads, safe loading and model-type detection.

Everything that turns "a model name or a checkpoint file" into a ready :class:`~napari_sam.models.
sam.Sam` lives here:

- :func:`cache_dir`, :func:`cached_path`, :func:`is_cached`: where downloaded weights are kept
  (``NAPARI_SAM_CACHE`` overrides the per-user cache folder).
- :func:`download`: stream into a temporary file beside the final one, verify size and SHA-256,
  then rename; a failed, cancelled or mismatching download never leaves a file under the final
  name.
- :func:`read_state_dict`: ``.safetensors`` or a PyTorch pickle loaded with
  ``weights_only=True``, so a checkpoint can never run code.
- :func:`detect_spec`: the model type from tensor shapes alone.
- :func:`load_model`: name, spec or path -> model on a device.
- :func:`save_checkpoint`: write a state dict with its spec embedded, atomically.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import math
import os
import pickle
import re
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_sam.registry import MODELS, ModelSpec, custom_vit_spec, get_spec

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from napari_sam.models.sam import Sam

# torch is imported inside the functions that need it, so that the cache and download helpers
# (used by the CLI listing and the widget's model menu) stay fast to import.

__all__ = [
    "ChecksumError",
    "DownloadCancelled",
    "UnsafeCheckpointError",
    "WeightsUnavailableError",
    "cache_dir",
    "cached_path",
    "destination",
    "detect_spec",
    "download",
    "is_cached",
    "load_model",
    "load_state_dict_into",
    "read_state_dict",
    "resolve_device",
    "save_checkpoint",
    "sha256_file",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "NAPARI_SAM_CACHE"
BASE_URL_ENV = "NAPARI_SAM_BASE_URL"
SPEC_METADATA_KEY = "napari_sam_spec"

_CHUNK = 1 << 20
_TIMEOUT_S = 30.0
# MobileSAM's checkpoint keeps TinyViT's unused ImageNet classifier; nothing else may be extra.
_CLASSIFIER_HEAD_PREFIXES = ("image_encoder.norm_head.", "image_encoder.head.")
# SAM's ViT uses 14 x 14 attention windows in the blocks that are not global.
_VIT_WINDOW = 14


class ChecksumError(ValueError):
    """A downloaded file's size or SHA-256 differs from the one the registry pins."""


class DownloadCancelled(Exception):
    """The caller's ``cancel()`` returned True; the partial file was deleted."""


class WeightsUnavailableError(RuntimeError):
    """The weights cannot be downloaded (offline, HTTP error, no stable URL)."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled objects other than tensors and plain containers."""


# --------------------------------------------------------------------------------------------
# Cache folder


def cache_dir() -> Path:
    """Folder where downloaded weights are kept, created on demand.

    ``$NAPARI_SAM_CACHE`` when set, else the per-user cache folder from
    ``pooch.os_cache("napari-sam")``: ``~/.cache/napari-sam`` on Linux (``$XDG_CACHE_HOME``
    respected), ``~/Library/Caches/napari-sam`` on macOS,
    ``%LOCALAPPDATA%\\napari-sam\\napari-sam\\Cache`` on Windows.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        path = Path(env).expanduser()
    else:
        import pooch

        path = Path(pooch.os_cache("napari-sam"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _as_spec(spec_or_name: ModelSpec | str) -> ModelSpec:
    if isinstance(spec_or_name, ModelSpec):
        return spec_or_name
    if isinstance(spec_or_name, str):
        return get_spec(spec_or_name)
    raise TypeError(f"expected a model name or a ModelSpec, got {type(spec_or_name).__name__}")


def destination(spec_or_name: ModelSpec | str) -> Path:
    """Path where the weights of a registered model go in the cache folder (may not exist)."""
    spec = _as_spec(spec_or_name)
    if not spec.filename and spec.hub_repo:
        from napari_sam import hub

        return hub.destination(spec)
    if not spec.filename:
        raise ValueError(
            f"model {spec.name!r} has no file name, so it has no place in the cache; "
            "pass its checkpoint file to load_model(path) instead"
        )
    return cache_dir() / spec.filename


def cached_path(spec_or_name: ModelSpec | str) -> Path | None:
    """The cached weights file of a model, or None when it is not in the cache."""
    spec = _as_spec(spec_or_name)
    if spec.filename and (path := cache_dir() / spec.filename).is_file():
        return path
    if spec.hub_repo:
        from napari_sam import hub

        return hub.cached_path(spec)
    return None


def is_cached(spec_or_name: ModelSpec | str) -> bool:
    """True when the model's weights file is in the cache folder."""
    return cached_path(spec_or_name) is not None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Download


def _source_url(spec: ModelSpec, base_url: str | None) -> str | None:
    base = base_url if base_url is not None else os.environ.get(BASE_URL_ENV) or None
    if base:
        # A mirror holds the files under their registry names.
        return base.rstrip("/") + "/" + spec.filename
    return spec.url


def _unavailable(spec: ModelSpec, dest: Path, url: str | None, reason: str) -> str:
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


@contextmanager
def _temporary_beside(dest: Path) -> Iterator[Path]:
    """A temporary file in ``dest``'s folder, deleted unless the body moved it away."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


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
    Face Hub source (``hub_repo``) is fetched by :func:`napari_sam.hub.download` instead, with
    the same guarantees; the result is then a folder (``base_url`` does not apply: a Hub mirror
    is set with ``HF_ENDPOINT``).

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
    spec = _as_spec(spec_or_name)
    if spec.hub_repo:
        from napari_sam import hub

        return hub.download(
            spec, progress=progress, cancel=cancel, progress_callback=progress_callback
        )
    dest = destination(spec)
    url = _source_url(spec, base_url)
    if not url:
        raise WeightsUnavailableError(_unavailable(spec, dest, None, "no URL"))

    with _temporary_beside(dest) as tmp:
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
        os.replace(tmp, dest)
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
                    chunk = response.read(_CHUNK)
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
                    _unavailable(
                        spec, dest, url, f"the transfer stopped after {done} of {length} bytes"
                    )
                )
    except _CacheWriteError:
        raise
    except urllib.error.HTTPError as exc:
        raise WeightsUnavailableError(
            _unavailable(spec, dest, url, f"HTTP {exc.code} {exc.reason}")
        ) from None
    except urllib.error.URLError as exc:
        raise WeightsUnavailableError(
            _unavailable(spec, dest, url, f"no connection ({exc.reason})")
        ) from None
    except (OSError, EOFError, http.client.HTTPException) as exc:
        # IncompleteRead, connection resets and timeouts mid-transfer.
        raise WeightsUnavailableError(
            _unavailable(spec, dest, url, f"the transfer broke off after {done} bytes ({exc!r})")
        ) from None
    finally:
        if bar is not None:
            bar.close()
    return digest.hexdigest(), done


# --------------------------------------------------------------------------------------------
# Reading and writing checkpoints


def read_state_dict(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], ModelSpec | None]:
    """Read a checkpoint's tensors without running any code from the file.

    Parameters
    ----------
    path : path-like
        ``.safetensors``, or a PyTorch file (``.pth``/``.pt``/...). PyTorch files are loaded
        with ``weights_only=True``; wrappers ``{"model": ...}`` / ``{"state_dict": ...}`` and
        ``module.`` prefixes are removed; float16/bfloat16 tensors come back as float32.
        A transformers-format checkpoint (a ``save_pretrained`` folder, its shard index, or a
        weights file beside its ``config.json``) is renamed into this package's key names by
        :func:`napari_sam.hf_format.read_hf_checkpoint`, and its spec read from the config.

    Returns
    -------
    state_dict : dict of str to Tensor
        On the CPU.
    spec : ModelSpec or None
        The spec embedded by :func:`save_checkpoint`, if any.

    Raises
    ------
    FileNotFoundError
        No such file.
    UnsafeCheckpointError
        The pickle references code or objects other than tensors and plain containers.
    ValueError
        Empty, corrupt, or not a state dict.
    """
    path = Path(path).expanduser()
    from napari_sam.hf_format import is_hf_checkpoint, read_hf_checkpoint

    if is_hf_checkpoint(path):
        return read_hf_checkpoint(path, read_file=_read_file)
    return _read_file(path)


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], ModelSpec | None]:
    """One weights file, without the transformers-format check (see :func:`read_state_dict`)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint file {path} is empty (0 bytes)")
    if path.suffix.lower() == ".safetensors":
        state, spec = _read_safetensors(path)
    else:
        state, spec = _read_torch(path)
    if not state:
        raise ValueError(f"checkpoint file {path} holds no tensors")
    return state, spec


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], ModelSpec | None]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read {path} as safetensors: {exc}") from None
    spec = _spec_from_json(metadata.get(SPEC_METADATA_KEY), path)
    return _clean_state(state, path), spec


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], ModelSpec | None]:
    import torch

    try:
        # Memory-map zip checkpoints so a 2.5 GB file is not held twice while it is copied in.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise ValueError(f"cannot read {path}: it is corrupt or not a checkpoint") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            what = f"it references {found.group(1)}, and unpickling that could run code"
        else:
            detail = re.search(r"Unsupported operand \S+", text)
            what = (
                f"the safe unpickler cannot read it ({detail.group(0) if detail else 'refused'}): "
                "it is corrupt, or it holds objects other than tensors whose unpickling could "
                "run code"
            )
        raise UnsafeCheckpointError(
            f"refused to load {path}: {what}. Only tensors in plain dicts/lists are accepted. "
            "If you trust the file, re-save its state dict: "
            "torch.save(model.state_dict(), 'weights.pth')."
        ) from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/KeyError for broken files
        raise ValueError(
            f"cannot read {path}: it is truncated, corrupt or not a PyTorch checkpoint "
            f"({type(exc).__name__}). If it was downloaded, delete it and download it again."
        ) from None

    spec = None
    while isinstance(obj, Mapping):
        if "spec" in obj and spec is None:
            spec = _spec_from_json(obj["spec"], path)
        inner = next((obj[k] for k in ("model", "state_dict") if k in obj), None)
        if not isinstance(inner, Mapping):
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)"
        )
    return _clean_state(obj, path), spec


def _spec_from_json(value: Any, path: Path) -> ModelSpec | None:
    if value is None:
        return None
    try:
        if isinstance(value, Mapping):
            return ModelSpec.from_dict(value)
        return ModelSpec.from_json(str(value))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the model spec embedded in {path} is invalid: {exc}") from None


def _clean_state(state: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path} is not a state dict: entry {key!r} is a {type(value).__name__}, not a "
                "tensor"
            )
        key = str(key)
        if key.startswith("module."):  # saved from DataParallel / DistributedDataParallel
            key = key[len("module.") :]
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
        out[key] = value
    return out


def save_checkpoint(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    spec: ModelSpec | None = None,
    half: bool = False,
) -> Path:
    """Write a model's weights with its spec embedded, atomically.

    Parameters
    ----------
    model_or_state_dict : nn.Module or mapping of str to Tensor
        A model (its ``state_dict()`` is written, its ``spec`` attribute used when ``spec`` is
        None) or a state dict.
    path : path-like
        ``.safetensors`` writes safetensors with the spec as metadata ``"napari_sam_spec"``;
        any other suffix writes a PyTorch file ``{"model": state_dict, "spec": spec_json}``.
    spec : ModelSpec, optional
        Spec to embed, so that :func:`load_model` rebuilds the model from the file alone.
    half : bool
        Store floating tensors as float16 (half the size; :func:`read_state_dict` casts them
        back to float32).

    Returns
    -------
    Path
        The written file.
    """
    import torch

    if isinstance(model_or_state_dict, torch.nn.Module):
        if spec is None:
            spec = getattr(model_or_state_dict, "spec", None)
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise TypeError(
            f"expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}"
        )
    tensors = _tensors_for_saving(state, half)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    spec_json = spec.to_json() if spec is not None else None
    with _temporary_beside(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            metadata = {SPEC_METADATA_KEY: spec_json} if spec_json else None
            save_file(tensors, str(tmp), metadata=metadata)
        else:
            payload: dict[str, Any] = {"model": tensors}
            if spec_json:
                payload["spec"] = spec_json
            torch.save(payload, tmp)
        os.replace(tmp, path)
    return path


def _tensors_for_saving(state: Mapping[str, Any], half: bool) -> dict[str, torch.Tensor]:
    import torch

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu")
        if half and t.is_floating_point():
            t = t.half()
        t = t.contiguous()
        # safetensors refuses tensors sharing memory; tied weights are stored twice instead.
        if t.numel() and t.data_ptr() in seen:
            t = t.clone()
        if t.numel():
            seen.add(t.data_ptr())
        out[str(key)] = t
    return out


# --------------------------------------------------------------------------------------------
# Model-type detection


def detect_spec(state_dict: Mapping[str, torch.Tensor]) -> ModelSpec:
    """Recognise the model a state dict belongs to from its tensor shapes.

    Parameters
    ----------
    state_dict : mapping of str to Tensor
        Keys as in the official checkpoints (``image_encoder.*``, ...); only shapes are read,
        so ``torch.empty`` or meta tensors work.

    Returns
    -------
    ModelSpec
        The registry's spec when the shapes equal a registered model's (``vit_b`` for both SAM
        ViT-B and MedSAM, which share a layout), else a custom spec named ``custom_vit_...`` /
        ``custom_tiny_vit_...`` with ``url=None``.

    Raises
    ------
    ValueError
        The keys are not those of a SAM image encoder.
    """
    if "image_encoder.patch_embed.proj.weight" in state_dict:
        detected = _detect_vit(state_dict)
    elif any(k.startswith("image_encoder.layers.") for k in state_dict):
        detected = _detect_tiny_vit(state_dict)
    else:
        sample = ", ".join(list(state_dict)[:5]) or "none"
        raise ValueError(
            "not a SAM checkpoint: expected image_encoder.patch_embed.proj.weight (ViT) or "
            f"image_encoder.layers.* (TinyViT / MobileSAM) keys; first keys: {sample}"
        )
    return registered_twin(detected)


def registered_twin(spec: ModelSpec) -> ModelSpec:
    """The registry's SAM-preprocessed spec of the same architecture, else ``spec`` itself."""
    for registered in MODELS.values():
        if registered.test_fixture or registered.preprocessing != "sam":
            continue
        if same_architecture(registered, spec):
            return registered
    return spec


def _indices(state_dict: Mapping[str, Any], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return sorted(found)


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    try:
        return tuple(state_dict[key].shape)
    except KeyError:
        raise ValueError(f"not a complete SAM checkpoint: key {key!r} is missing") from None


def _contiguous(indices: list[int], what: str) -> int:
    if not indices or indices != list(range(len(indices))):
        raise ValueError(f"not a SAM checkpoint: {what} are numbered {indices[:8]}, not 0..n-1")
    return len(indices)


def _detect_vit(sd: Mapping[str, Any]) -> ModelSpec:
    p = "image_encoder."
    embed_dim, _, patch, _ = _shape(sd, p + "patch_embed.proj.weight")
    if patch != 16:
        raise ValueError(f"ViT with {patch}x{patch} patches: only 16x16 (SAM) is supported")
    grid = _shape(sd, p + "pos_embed")[1]
    image_size = 16 * grid
    depth = _contiguous(_indices(sd, p + "blocks."), "image-encoder blocks")
    lengths = [_shape(sd, f"{p}blocks.{i}.attn.rel_pos_h")[0] for i in range(depth)]
    head_dim = _shape(sd, p + "blocks.0.attn.rel_pos_h")[1]
    if embed_dim % head_dim:
        raise ValueError(f"rel_pos head dim {head_dim} does not divide embed dim {embed_dim}")
    num_heads = embed_dim // head_dim
    global_len = 2 * grid - 1
    global_blocks = tuple(i for i, n in enumerate(lengths) if n == global_len)
    windowed = {n for n in lengths if n != global_len}
    if len(windowed) > 1:
        raise ValueError(f"blocks use several attention window sizes ({sorted(windowed)})")
    return custom_vit_spec(
        embed_dim,
        depth,
        num_heads,
        global_blocks,
        image_size,
        window_size=(windowed.pop() + 1) // 2 if windowed else _VIT_WINDOW,
        description="ViT SAM recognised from the checkpoint's tensor shapes.",
    )


def _detect_tiny_vit(sd: Mapping[str, Any]) -> ModelSpec:
    p = "image_encoder.layers."
    n_stages = _contiguous(_indices(sd, p), "TinyViT stages")
    embed_dims, depths, heads, windows = [], [], [], []
    for s in range(n_stages):
        depths.append(_contiguous(_indices(sd, f"{p}{s}.blocks."), f"blocks of stage {s}"))
        bias_key = f"{p}{s}.blocks.0.attn.attention_biases"
        if bias_key in sd:
            n_heads, n_offsets = _shape(sd, bias_key)
            window = math.isqrt(n_offsets)
            if window * window != n_offsets:
                raise ValueError(f"{bias_key} has {n_offsets} offsets, not a square window")
            embed_dims.append(_shape(sd, f"{p}{s}.blocks.0.attn.norm.weight")[0])
            heads.append(n_heads)
            windows.append(window)
        else:
            # Convolutional (MBConv) stage: its width is the input of its first block; heads and
            # window are unused there, so TinyViT's conventions (32-channel heads, 7) fill in.
            dim = _shape(sd, f"{p}{s}.blocks.0.conv1.c.weight")[1]
            embed_dims.append(dim)
            heads.append(max(1, dim // 32))
            windows.append(7)
    kwargs = {
        "embed_dims": tuple(embed_dims),
        "depths": tuple(depths),
        "num_heads": tuple(heads),
        "window_sizes": tuple(windows),
    }
    return ModelSpec(
        name="custom_tiny_vit_" + "-".join(map(str, embed_dims)),
        encoder="tiny_vit",
        encoder_kwargs=kwargs,
        license="unknown",
        description="TinyViT SAM recognised from the checkpoint's tensor shapes.",
    )


def _normalise(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_normalise(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def same_architecture(a: ModelSpec, b: ModelSpec) -> bool:
    """True when two specs build models with the same state-dict layout and shapes.

    Preprocessing, URLs and names are ignored (MedSAM and vit_b are the same architecture).
    For TinyViT the input size and the first (convolutional) stage's unused head count and
    window are not part of the layout.
    """
    if a.encoder != b.encoder:
        return False
    ka, kb = _normalise(dict(a.encoder_kwargs)), _normalise(dict(b.encoder_kwargs))
    if a.encoder == "vit":
        ka.setdefault("window_size", _VIT_WINDOW)
        kb.setdefault("window_size", _VIT_WINDOW)
        return ka == kb and a.image_size == b.image_size
    for key in ("num_heads", "window_sizes"):
        if key in ka and key in kb:
            ka[key], kb[key] = ka[key][1:], kb[key][1:]
    return ka == kb


# --------------------------------------------------------------------------------------------
# Loading into a model


def load_state_dict_into(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, assign: bool = False
) -> None:
    """Copy a state dict into ``model``, strictly.

    Only MobileSAM's unused classifier head (``image_encoder.norm_head.*``,
    ``image_encoder.head.*``) may be present without a place in the model; any other missing,
    unexpected or differently shaped tensor raises a ValueError that names a few of them and
    the model type the file looks like.

    ``assign=True`` makes the model's parameters *be* the given tensors (cast to the model's
    dtypes) instead of copying into them: no second copy of the weights, no copy time. Use it
    only for a state dict nobody else holds, such as one just read from a file.
    """
    expected = model.state_dict()
    state = {
        k: v
        for k, v in state_dict.items()
        if k in expected or not k.startswith(_CLASSIFIER_HEAD_PREFIXES)
    }
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        model_spec = getattr(model, "spec", None)
        target = f"model {model_spec.name!r}" if model_spec is not None else "this model"
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch (file vs model)", mismatched),
        ):
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise ValueError(
            f"the weights do not fit {target}: {'; '.join(parts)}. {_looks_like(state_dict)}"
        )
    if assign:
        if all(t.device.type == "cpu" for t in expected.values()):
            state = {k: v.to(expected[k].dtype) for k, v in state.items()}
        else:
            assign = False  # a model already on a GPU keeps its own storage
    model.load_state_dict(state, strict=True, assign=assign)


def _looks_like(state_dict: Mapping[str, torch.Tensor]) -> str:
    try:
        spec = detect_spec(state_dict)
    except ValueError as exc:
        return f"The file is not recognisable as a SAM checkpoint ({exc})."
    return f"The file looks like {_describe(spec)}."


def _describe(spec: ModelSpec) -> str:
    if spec.name in MODELS and same_architecture(MODELS[spec.name], spec):
        same = [
            s.name for s in MODELS.values() if s.name != spec.name and same_architecture(s, spec)
        ]
        alias = f" (same layout as {', '.join(same)})" if same else ""
        return f"{spec.name!r}{alias}"
    kwargs = dict(spec.encoder_kwargs)
    return f"{spec.name!r} ({spec.encoder}, {kwargs}, image_size {spec.image_size})"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, then Apple MPS, then CPU; other values as given."""
    import torch

    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: {exc}; use 'auto', 'cpu', 'cuda'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'auto'")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available; use 'auto'")
    return resolved


def _spec_for_file(
    state: Mapping[str, torch.Tensor], embedded: ModelSpec | None, wanted: ModelSpec | None, path
) -> ModelSpec:
    found = embedded if embedded is not None else detect_spec(state)
    if wanted is None:
        return found
    if not same_architecture(found, wanted):
        raise ValueError(
            f"model type {wanted.name!r} was requested, but {path} holds {_describe(found)}; "
            f"load it without a model type, or with model_type={found.name!r}"
        )
    return wanted


def load_model(
    name_or_path: str | os.PathLike | ModelSpec,
    *,
    checkpoint: str | os.PathLike | None = None,
    model_type: str | ModelSpec | None = None,
    device: str | torch.device = "auto",
    download: bool = True,
) -> Sam:
    """Build a SAM model and load its weights.

    Parameters
    ----------
    name_or_path : str, path-like or ModelSpec
        A registered name (``"vit_b"``, ``"vit_t"``, ``"medsam_vit_b"``, ``"default"``): its
        cached file, downloaded when missing; or the path of any checkpoint, whose model type
        comes from its embedded spec or its tensor shapes; or a spec.
    checkpoint : path-like, optional
        Weights file to use instead of the cached one for a name or spec.
    model_type : str or ModelSpec, optional
        Expected model type; a file of another architecture raises ValueError. A file with the
        same layout gets this spec (e.g. ``"medsam_vit_b"`` for a file that reads as vit_b).
    device : str or torch.device
        ``"auto"`` picks CUDA, then MPS, then CPU.
    download : bool
        Download a registered model's weights when they are not cached.

    Returns
    -------
    Sam
        In eval mode on ``device``; ``model.spec`` is the spec it was built from.
    """
    from napari_sam.models.build import build_sam

    wanted = _as_spec(model_type) if model_type is not None else None
    if isinstance(name_or_path, ModelSpec) or (
        isinstance(name_or_path, str) and (name_or_path in MODELS or name_or_path == "default")
    ):
        named = _as_spec(name_or_path)
        if wanted is not None and not same_architecture(named, wanted):
            raise ValueError(
                f"conflicting model types: {named.name!r} and model_type={wanted.name!r}"
            )
        wanted = wanted or named
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
        else:
            path = cached_path(named)
            if path is None:
                if not download:
                    raise WeightsUnavailableError(
                        _unavailable(named, destination(named), named.url, "download=False")
                    )
                # The ``download`` flag shadows the function; look it up at call time so that
                # a patched ``weights.download`` (tests, the widget) is honoured.
                path = globals()["download"](named)
    else:
        if checkpoint is not None:
            raise ValueError("give either a checkpoint path as the first argument or checkpoint=")
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"{name_or_path!s} is neither a registered model "
                f"({', '.join(MODELS)}) nor an existing checkpoint file"
            )

    state, embedded = read_state_dict(path)
    spec = _spec_for_file(state, embedded, wanted, path)
    target = resolve_device(device)
    model = build_sam(spec)
    load_state_dict_into(model, state, assign=True)
    del state
    return model.to(target).eval()

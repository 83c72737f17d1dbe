"""Reading and writing checkpoint files, without ever running code from them.

:func:`read_state_dict` tries the formats in :data:`FORMATS` in order; the first whose
``matches(path)`` is true reads the file. Every reader returns the raw mapping of names to
tensors (already in this package's key names) and the spec the file embeds, if any;
:func:`read_state_dict` then removes ``module.`` prefixes and casts half precision to float32,
so readers need not.

Built in: ``.safetensors`` files, and PyTorch files (``.pth``/``.pt``/...), unpickled with
``weights_only=True`` and unwrapped from ``{"model": ...}`` / ``{"state_dict": ...}`` (official
SAM, MobileSAM, MedSAM and SAM 2 checkpoints, and those :func:`save_checkpoint` writes).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_sam.io.atomic import atomic_path
from napari_sam.registry import ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "FORMATS",
    "SPEC_METADATA_KEY",
    "CheckpointFormat",
    "UnsafeCheckpointError",
    "read_state_dict",
    "save_checkpoint",
    "spec_from_json",
]

SPEC_METADATA_KEY = "napari_sam_spec"

RawCheckpoint = tuple[Mapping[str, Any], "ModelSpec | None"]


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled objects other than tensors and plain containers."""


@dataclass(frozen=True)
class CheckpointFormat:
    """One way of storing weights on disk.

    Parameters
    ----------
    name : str
        Shown in error messages (``"safetensors"``).
    matches : callable
        ``matches(path) -> bool``: whether ``path`` (a file or a folder) is in this format.
        Cheap: look at the suffix or the folder's file names, do not parse the file.
    read : callable
        ``read(path) -> (tensors, spec_or_None)``: the tensors on the CPU under this package's
        key names (convert foreign names here), and the spec the file embeds, if any. Raise
        ValueError with a message saying what is wrong and what to do.
    """

    name: str
    matches: Callable[[Path], bool]
    read: Callable[[Path], RawCheckpoint]


def read_state_dict(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], ModelSpec | None]:
    """Read a checkpoint's tensors without running any code from the file.

    Parameters
    ----------
    path : path-like
        ``.safetensors``, or a PyTorch file (``.pth``/``.pt``/...), or anything another entry
        of :data:`FORMATS` matches. PyTorch files are loaded with ``weights_only=True``;
        wrappers ``{"model": ...}`` / ``{"state_dict": ...}`` and ``module.`` prefixes are
        removed; float16/bfloat16 tensors come back as float32.

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
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"checkpoint file {path} is empty (0 bytes)")
    fmt = next((f for f in FORMATS if f.matches(path)), None)
    if fmt is None:
        names = ", ".join(f.name for f in FORMATS)
        raise FileNotFoundError(
            f"checkpoint file not found: {path} is a folder in none of the formats read here "
            f"({names}); pass the weights file itself"
        )
    raw, spec = fmt.read(path)
    state = _clean_state(raw, path)
    if not state:
        raise ValueError(f"checkpoint file {path} holds no tensors")
    return state, spec


def _read_safetensors(path: Path) -> RawCheckpoint:
    """A safetensors file; its metadata may embed the spec (:data:`SPEC_METADATA_KEY`)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read {path} as safetensors: {exc}") from None
    return state, spec_from_json(metadata.get(SPEC_METADATA_KEY), path)


def _read_torch(path: Path) -> tuple[Mapping[str, Any], ModelSpec | None]:
    """A PyTorch file, unpickled with ``weights_only=True``; wrappers unwrapped."""
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
            spec = spec_from_json(obj["spec"], path)
        inner = next((obj[k] for k in ("model", "state_dict") if k in obj), None)
        if not isinstance(inner, Mapping):
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)"
        )
    return obj, spec


def spec_from_json(value: Any, path: Path) -> ModelSpec | None:
    """The spec a file embeds (JSON text or a mapping), or None; ValueError when invalid."""
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

    state: Mapping[str, Any]
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
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            metadata = {SPEC_METADATA_KEY: spec_json} if spec_json else None
            save_file(tensors, str(tmp), metadata=metadata)
        else:
            payload: dict[str, Any] = {"model": tensors}
            if spec_json:
                payload["spec"] = spec_json
            torch.save(payload, tmp)
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


SAFETENSORS = CheckpointFormat(
    name="safetensors",
    matches=lambda path: path.is_file() and path.suffix.lower() == ".safetensors",
    read=_read_safetensors,
)
TORCH = CheckpointFormat(
    name="PyTorch (.pth/.pt)",
    matches=lambda path: path.is_file(),  # any other file: the fallback, so keep it last
    read=_read_torch,
)


def read_one_file(path: Path) -> RawCheckpoint:
    """One weights file, safetensors or PyTorch, whatever folder it is in."""
    return (SAFETENSORS if SAFETENSORS.matches(path) else TORCH).read(path)


def _is_transformers(path: Path) -> bool:
    from napari_sam.weights.hf import is_hf_checkpoint

    return is_hf_checkpoint(path)


def _read_transformers(path: Path) -> RawCheckpoint:
    from napari_sam.weights.hf import read_hf_checkpoint

    return read_hf_checkpoint(path, read_file=read_one_file)


TRANSFORMERS = CheckpointFormat(
    "transformers (a save_pretrained folder, its shard index or weights file)",
    _is_transformers,
    _read_transformers,
)

FORMATS: tuple[CheckpointFormat, ...] = (TRANSFORMERS, SAFETENSORS, TORCH)
"""The formats :func:`read_state_dict` knows, tried in order: add a new one before ``TORCH``."""

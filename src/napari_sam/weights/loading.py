"""Loading: a model name, spec or checkpoint file -> a ready :class:`~napari_sam.models.sam.Sam`.

:func:`load_model` is the one entry point (the CLI, the widget and scripts use it);
:func:`build_sam` and :data:`sam_model_registry` are ``segment_anything``'s names for the same
thing. The architecture itself comes from :func:`napari_sam.models.build.build_sam`, which knows
nothing about files.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from napari_sam.registry import MODELS, ModelSpec
from napari_sam.weights.cache import as_spec, cached_path, destination
from napari_sam.weights.checkpoint import read_state_dict
from napari_sam.weights.detect import describe, detect_spec, looks_like, same_architecture
from napari_sam.weights.fetch import WeightsUnavailableError, unavailable_message
from napari_sam.weights.fetch import download as download_weights

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from napari_sam.models.sam import Sam

__all__ = [
    "build_sam",
    "check_fits",
    "load_model",
    "load_state_dict_into",
    "resolve_device",
    "sam_model_registry",
    "spec_for_checkpoint",
]

# MobileSAM's checkpoint keeps TinyViT's unused ImageNet classifier; nothing else may be extra.
CLASSIFIER_HEAD_PREFIXES = ("image_encoder.norm_head.", "image_encoder.head.")


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
    model_spec = getattr(model, "spec", None)
    target = f"model {model_spec.name!r}" if model_spec is not None else "this model"
    state = _fitting(expected, state_dict, target)
    if assign:
        if all(t.device.type == "cpu" for t in expected.values()):
            state = {k: v.to(expected[k].dtype) for k, v in state.items()}
        else:
            assign = False  # a model already on a GPU keeps its own storage
    model.load_state_dict(state, strict=True, assign=assign)


def _fitting(
    expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], target: str
) -> dict[str, torch.Tensor]:
    """``state_dict`` less the tolerated extras; ValueError unless it then fits ``expected``."""
    state = {
        k: v
        for k, v in state_dict.items()
        if k in expected or not k.startswith(CLASSIFIER_HEAD_PREFIXES)
    }
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
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
            f"the weights do not fit {target}: {'; '.join(parts)}. {looks_like(state_dict)}"
        )
    return state


def check_fits(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError unless ``state_dict`` holds exactly the tensors ``spec``'s model has.

    The model is built on the meta device for this, which allocates no weights: a file is
    checked completely before a model of the size it claims is built.
    """
    import torch

    with torch.device("meta"):
        skeleton = build_architecture(spec)
    _fitting(skeleton.state_dict(), state_dict, f"model {spec.name!r}")


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


def spec_for_checkpoint(
    state: Mapping[str, torch.Tensor],
    embedded: ModelSpec | None,
    wanted: ModelSpec | None,
    path: str | os.PathLike,
) -> ModelSpec:
    """The spec to build for a checkpoint's tensors.

    The architecture is always detected from the tensors' shapes. A spec the file embeds must
    describe that architecture (then it is used, for its name, preprocessing and input size);
    one that does not is refused before anything is built, so a small file cannot make the
    loader allocate the enormous model it claims to hold. When ``wanted`` is given it must
    have the same architecture too, and is used instead (MedSAM for a vit_b layout).

    Raises
    ------
    ValueError
        The tensors are no known model, or disagree with the embedded or the wanted spec.
    """
    try:
        detected = detect_spec(state)
    except ValueError as exc:
        claim = f" (it claims to hold {describe(embedded)})" if embedded is not None else ""
        raise ValueError(f"{path} does not hold a model's weights{claim}: {exc}") from None
    found = detected
    if embedded is not None:
        if not same_architecture(embedded, detected):
            raise ValueError(
                f"{path} claims to hold {describe(embedded)}, but its tensors are those of "
                f"{describe(detected)}: the file is damaged or was not written by this "
                "package; re-save the model's weights (napari_sam.weights.save_checkpoint)"
            )
        found = embedded
    if wanted is None:
        return found
    if not same_architecture(found, wanted):
        raise ValueError(
            f"model type {wanted.name!r} was requested, but {path} holds {describe(found)}; "
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
        In eval mode on ``device``; ``model.spec`` is the spec it was built from. For SAM 2
        models (``"sam2.1_hiera_*"``, ``"medsam2"``, official ``sam2.1_hiera_*.pt`` files) a
        :class:`~napari_sam.models.sam2.sam2.Sam2`.
    """
    wanted = as_spec(model_type) if model_type is not None else None
    if isinstance(name_or_path, ModelSpec) or (
        isinstance(name_or_path, str) and (name_or_path in MODELS or name_or_path == "default")
    ):
        named = as_spec(name_or_path)
        if wanted is not None and not same_architecture(named, wanted):
            raise ValueError(
                f"conflicting model types: {named.name!r} and model_type={wanted.name!r}"
            )
        wanted = wanted or named
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
        else:
            cached = cached_path(named)
            if cached is None:
                if not download:
                    raise WeightsUnavailableError(
                        unavailable_message(named, destination(named), named.url, "download=False")
                    )
                cached = download_weights(named)
            path = cached
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
    spec = spec_for_checkpoint(state, embedded, wanted, path)
    target = resolve_device(device)
    check_fits(spec, state)
    model = build_architecture(spec)
    load_state_dict_into(model, state, assign=True)
    del state
    return model.to(target).eval()


def build_architecture(spec: ModelSpec) -> Sam:
    """The model ``spec`` describes, randomly initialised (float32, CPU, eval mode)."""
    # Imported here: the cache and download helpers must not pull in torch.
    from napari_sam.models.build import build_sam as build

    return build(spec)


def build_sam(
    spec: ModelSpec | str,
    checkpoint: str | os.PathLike | None = None,
    *,
    strict: bool = True,
) -> Sam:
    """Build the model described by ``spec``, in eval mode, float32, on the CPU (Meta's API).

    Parameters
    ----------
    spec : ModelSpec or str
        A spec, or a registry name (``"vit_b"``, ``"default"``, ...).
    checkpoint : path-like or None
        Weights to load (``.pth`` / ``.pt`` / ``.safetensors``); None leaves the random
        initialisation.
    strict : bool
        Require the checkpoint's keys to match the model's exactly (MobileSAM's unused
        classifier head excepted).

    Returns
    -------
    Sam
        The model, with ``model.spec`` set to the spec it was built from.
    """
    model = build_architecture(as_spec(spec))
    if checkpoint is None:
        return model
    state_dict, _file_spec = read_state_dict(checkpoint)
    if strict:
        load_state_dict_into(model, state_dict)
        return model
    try:
        model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {os.fspath(checkpoint)!r} does not fit the model: {err}"
        ) from None
    return model


sam_model_registry: dict[str, Callable[..., Sam]] = {
    name: functools.partial(build_sam, name)
    for name in ("default", *(n for n, spec in MODELS.items() if not spec.test_fixture))
}
"""``segment_anything``'s registry: ``sam_model_registry["vit_b"](checkpoint=path)``."""

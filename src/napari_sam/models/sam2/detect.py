"""Recognise SAM 2.1 checkpoints (Meta's ``sam2.1_hiera_*.pt``, MedSAM2) from their keys.

What the tensors show: the trunk's first width (``patch_embed``), the blocks per stage (a
stage's first block has a ``proj`` to the wider width), the position-embedding grids and the
first attention window (``pos_embed`` / ``pos_embed_window``). What they cannot show: the
number of heads, which blocks attend globally and the later windows (none of these has
weights), nor the input size (nothing in SAM 2 is sized by it). Those come from the
registered model with the same trunk; a trunk no registered model has is refused with a
message saying to pass a spec.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

from napari_sam.registry import MODELS, ModelSpec

__all__ = ["detect_sam2_spec", "trunk_layout"]

_TRUNK = "image_encoder.trunk."
# Present in SAM 2.1 only (SAM 2.0 had neither the no-object spatial embedding nor the
# projected temporal encoding of object pointers).
_SAM2_1_KEYS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight")


def trunk_layout(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The Hiera trunk's shape-visible layout.

    Returns
    -------
    dict
        ``embed_dim``, ``stages`` (tuple), ``window_pos_embed_bkg_spatial_size`` and
        ``first_window``.

    Raises
    ------
    ValueError
        Blocks missing or numbered with gaps, or stage widths that do not double.
    """
    embed_dim = _shape(state_dict, _TRUNK + "patch_embed.proj.weight")[0]
    pattern = re.compile(re.escape(_TRUNK) + r"blocks\.(\d+)\.")
    indices = sorted({int(m.group(1)) for k in state_dict if (m := pattern.match(k))})
    if not indices or indices != list(range(len(indices))):
        raise ValueError(f"Hiera blocks are numbered {indices[:8]}, not 0..n-1")
    starts = [i for i in indices if f"{_TRUNK}blocks.{i}.proj.weight" in state_dict]
    bounds = [0, *starts, len(indices)]
    stages = tuple(b - a for a, b in itertools.pairwise(bounds))
    if any(n <= 0 for n in stages):
        raise ValueError(f"Hiera stage layout {stages} is not valid")
    widths = [_shape(state_dict, f"{_TRUNK}blocks.{i}.norm2.weight")[0] for i in [0, *starts]]
    if any(w != embed_dim * 2**s for s, w in enumerate(widths)):
        raise ValueError(f"Hiera stage widths {widths} do not double from {embed_dim}")
    _, _, bh, bw = _shape(state_dict, _TRUNK + "pos_embed")
    window = _shape(state_dict, _TRUNK + "pos_embed_window")[-1]
    return {
        "embed_dim": embed_dim,
        "stages": stages,
        "window_pos_embed_bkg_spatial_size": (bh, bw),
        "first_window": window,
    }


def detect_sam2_spec(state_dict: Mapping[str, Any]) -> ModelSpec | None:
    """The registered SAM 2.1 spec whose layout a state dict has, or None if it is no SAM 2.

    Parameters
    ----------
    state_dict : mapping of str to Tensor
        Official keys (the ``"model"`` entry of a ``.pt`` file); only shapes are read.

    Returns
    -------
    ModelSpec or None
        None when the keys are not SAM 2's (no ``image_encoder.trunk.*``). For a SAM 2.1
        trunk the first registered spec with its layout: ``sam2.1_hiera_tiny`` also for a
        MedSAM2 file (same weights layout; pick ``"medsam2"`` by name for its 512 input).

    Raises
    ------
    ValueError
        A SAM 2.0 checkpoint, or a trunk no registered model has.
    """
    if _TRUNK + "patch_embed.proj.weight" not in state_dict:
        return None
    missing = [k for k in _SAM2_1_KEYS if k not in state_dict]
    if missing:
        raise ValueError(
            f"this looks like a SAM 2.0 checkpoint (no {', '.join(missing)}); only SAM 2.1 "
            "files (sam2.1_hiera_*.pt, MedSAM2) are supported"
        )
    layout = trunk_layout(state_dict)
    for spec in MODELS.values():
        if spec.family == "sam2" and _same_trunk(spec, layout):
            return spec
    raise ValueError(
        f"SAM 2.1 checkpoint with a Hiera trunk of width {layout['embed_dim']} and stages "
        f"{layout['stages']} that no registered model has; heads and global-attention blocks "
        "cannot be read from weights: build it from a ModelSpec(family='sam2', "
        "encoder='hiera', encoder_kwargs=...) instead"
    )


def _same_trunk(spec: ModelSpec, layout: Mapping[str, Any]) -> bool:
    kw = spec.encoder_kwargs
    return (
        kw["embed_dim"] == layout["embed_dim"]
        and tuple(kw["stages"]) == tuple(layout["stages"])
        and tuple(kw["window_pos_embed_bkg_spatial_size"])
        == tuple(layout["window_pos_embed_bkg_spatial_size"])
        and kw["window_spec"][0] == layout["first_window"]
    )


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    try:
        return tuple(state_dict[key].shape)
    except KeyError:
        raise ValueError(f"not a complete SAM 2 checkpoint: key {key!r} is missing") from None

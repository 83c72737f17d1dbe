"""Recognise SAM 2.1 checkpoints (Meta's ``sam2.1_hiera_*.pt``, MedSAM2) from their keys.

What the tensors show: the trunk's first width (``patch_embed``), the blocks per stage (a
stage's first block has a ``proj`` to the wider width), the position-embedding grids and the
first attention window (``pos_embed`` / ``pos_embed_window``). What they cannot show: the
number of heads, which blocks attend globally and the later windows (none of these has
weights), nor the input size (nothing in SAM 2 is sized by it). For a registered trunk those
come from the registered spec. For another trunk the detected spec holds the visible layout
only: it matches (:func:`same_layout`) a complete spec embedded in the file by
``save_checkpoint``, and building it without one fails with a message saying what to pass.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

from napari_sam.registry import MODELS, SAM2_HEAD_DEFAULTS, ModelSpec

__all__ = ["ATTENTION_KEYS", "detect_sam2_spec", "head_layout", "same_layout", "trunk_layout"]

_TRUNK = "image_encoder.trunk."
# Present in SAM 2.1 only (SAM 2.0 had neither the no-object spatial embedding nor the
# projected temporal encoding of object pointers).
_SAM2_1_KEYS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight")
ATTENTION_KEYS = ("num_heads", "global_att_blocks", "window_spec")
"""Hiera settings that no tensor records: a spec without them cannot be built."""


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


def head_layout(state_dict: Mapping[str, Any]) -> dict[str, int]:
    """The head widths a SAM 2 state dict shows, where they differ from SAM 2.1's.

    Returns
    -------
    dict
        The entries of ``ModelSpec.head_kwargs`` (``d_model``, ``memory_layers``,
        ``memory_mlp_dim``, ``decoder_mlp_dim``) whose value is not SAM 2.1's; empty for
        every released model.
    """
    pattern = re.compile(r"memory_attention\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    found = {
        "d_model": _shape(state_dict, "no_mem_embed")[-1],
        "memory_layers": len(layers),
        "memory_mlp_dim": _shape(state_dict, "memory_attention.layers.0.linear1.weight")[0],
        "decoder_mlp_dim": _shape(
            state_dict, "sam_mask_decoder.transformer.layers.0.mlp.layers.0.weight"
        )[0],
    }
    return {k: v for k, v in found.items() if v != SAM2_HEAD_DEFAULTS[k]}


def detect_sam2_spec(state_dict: Mapping[str, Any]) -> ModelSpec | None:
    """The SAM 2.1 spec a state dict's layout gives, or None if it is no SAM 2.

    Parameters
    ----------
    state_dict : mapping of str to Tensor
        Official keys (the ``"model"`` entry of a ``.pt`` file); only shapes are read.

    Returns
    -------
    ModelSpec or None
        None when the keys are not SAM 2's (no ``image_encoder.trunk.*``). The first
        registered spec with the trunk's layout: ``sam2.1_hiera_tiny`` also for a MedSAM2 file
        (same layout; pick ``"medsam2"`` by name for its 512 input). For an unregistered trunk
        a ``custom_hiera_...`` spec with the visible layout only (no heads / global blocks /
        windows): it cannot be built, but it matches the complete spec a file embeds.

    Raises
    ------
    ValueError
        A SAM 2.0 checkpoint, or an inconsistent trunk.
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
    kwargs = {
        "embed_dim": layout["embed_dim"],
        "stages": layout["stages"],
        "window_pos_embed_bkg_spatial_size": layout["window_pos_embed_bkg_spatial_size"],
    }
    heads = head_layout(state_dict)
    detected = ModelSpec(
        name=f"custom_hiera_e{layout['embed_dim']}_s{'-'.join(map(str, layout['stages']))}",
        family="sam2",
        encoder="hiera",
        encoder_kwargs=kwargs,
        preprocessing="sam2",
        head_kwargs=heads,
        license="unknown",
        description="SAM 2.1 checkpoint with an unregistered Hiera trunk (attention layout "
        "unknown: heads and global blocks are not stored in weights).",
    )
    for spec in MODELS.values():
        if spec.family == "sam2" and not spec.test_fixture and same_layout(spec, detected):
            if spec.encoder_kwargs["window_spec"][0] == layout["first_window"]:
                return spec
    return detected


def same_layout(a: ModelSpec, b: ModelSpec) -> bool:
    """True when two SAM 2 specs give the same state-dict layout.

    That is trunk width, stages, position-embedding grids and head widths: heads, global
    blocks and later windows have no tensors, and the input size sizes none.
    """
    if a.family != "sam2" or b.family != "sam2" or a.heads != b.heads:
        return False
    ka, kb = dict(a.encoder_kwargs), dict(b.encoder_kwargs)
    same = (
        ka["embed_dim"] == kb["embed_dim"]
        and tuple(ka["stages"]) == tuple(kb["stages"])
        and tuple(ka.get("window_pos_embed_bkg_spatial_size", (14, 14)))
        == tuple(kb.get("window_pos_embed_bkg_spatial_size", (14, 14)))
    )
    if "window_spec" in ka and "window_spec" in kb:
        same = same and ka["window_spec"][0] == kb["window_spec"][0]
    return same


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    try:
        return tuple(state_dict[key].shape)
    except KeyError:
        raise ValueError(f"not a complete SAM 2 checkpoint: key {key!r} is missing") from None

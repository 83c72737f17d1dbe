"""Model-type detection: which model a state dict holds, from its keys and tensor shapes.

Each model family contributes a :class:`Detector`; :func:`detect_spec` asks the detectors in
:data:`DETECTORS` in order and the first that claims the state dict describes it. Adding a
family (SAM 2, say) is one new ``Detector`` appended to ``DETECTORS``: ``claims`` looks at the
keys only (``"image_encoder.trunk.patch_embed.proj.weight" in sd``), ``detect`` reads the shapes
and returns a :class:`~napari_sam.registry.ModelSpec`, raising ValueError when the state dict
is that family's but incomplete or inconsistent (:func:`numbered`, :func:`count_numbered` and
:func:`shape_of` help with that). Detection reads shapes only, so meta tensors
work, and it is what guards against a file whose embedded spec claims a model its tensors are
not (see :func:`napari_sam.weights.loading.spec_for_checkpoint`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from napari_sam.registry import MODELS, ModelSpec, custom_vit_spec

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DETECTORS",
    "Detector",
    "count_numbered",
    "describe",
    "detect_spec",
    "looks_like",
    "numbered",
    "registered_twin",
    "same_architecture",
    "shape_of",
]

# SAM's ViT uses 14 x 14 attention windows in the blocks that are not global.
VIT_WINDOW = 14

StateDict = Mapping[str, "torch.Tensor"]


@dataclass(frozen=True)
class Detector:
    """How to recognise one model family in a state dict.

    Parameters
    ----------
    family : str
        Shown in error messages (``"ViT"``).
    expects : str
        The keys that identify the family, for the "not a SAM checkpoint" message.
    claims : callable
        ``claims(state_dict) -> bool``: whether the state dict is this family's, from its keys.
    detect : callable
        ``detect(state_dict) -> ModelSpec``: the architecture from the tensor shapes; a custom
        spec (``url=None``); ValueError when the state dict is incomplete or inconsistent.
    """

    family: str
    expects: str
    claims: Callable[[StateDict], bool]
    detect: Callable[[StateDict], ModelSpec]


def detect_spec(state_dict: StateDict) -> ModelSpec:
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
        ViT-B and MedSAM, which share a layout; ``sam2.1_hiera_tiny`` for SAM 2.1 tiny and
        MedSAM2), else a custom spec named ``custom_vit_...`` / ``custom_tiny_vit_...`` /
        ``custom_hiera_...`` with ``url=None``.

    Raises
    ------
    ValueError
        The keys are those of no family in :data:`DETECTORS`.
    """
    detector = next((d for d in DETECTORS if d.claims(state_dict)), None)
    if detector is None:
        sample = ", ".join(list(state_dict)[:5]) or "none"
        expected = " or ".join(f"{d.expects} ({d.family})" for d in DETECTORS)
        raise ValueError(f"not a SAM checkpoint: expected {expected} keys; first keys: {sample}")
    return registered_twin(detector.detect(state_dict))


def registered_twin(spec: ModelSpec) -> ModelSpec:
    """The registry's SAM-preprocessed spec of the same architecture, else ``spec`` itself."""
    for registered in MODELS.values():
        if registered.test_fixture or registered.preprocessing != "sam":
            continue
        if same_architecture(registered, spec):
            return registered
    return spec


def numbered(state_dict: Mapping[str, Any], prefix: str) -> list[int]:
    """The sorted numbers ``n`` of keys ``prefix + "n."...`` (the blocks of a stage, say)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return sorted(found)


def shape_of(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """A tensor's shape; ValueError naming the key when it is missing."""
    try:
        return tuple(state_dict[key].shape)
    except KeyError:
        raise ValueError(f"not a complete SAM checkpoint: key {key!r} is missing") from None


def count_numbered(indices: list[int], what: str) -> int:
    """How many of ``indices`` there are; ValueError unless they are 0..n-1 (n >= 1)."""
    if not indices or indices != list(range(len(indices))):
        raise ValueError(f"not a SAM checkpoint: {what} are numbered {indices[:8]}, not 0..n-1")
    return len(indices)


def _detect_vit(sd: Mapping[str, Any]) -> ModelSpec:
    p = "image_encoder."
    embed_dim, _, patch, _ = shape_of(sd, p + "patch_embed.proj.weight")
    if patch != 16:
        raise ValueError(f"ViT with {patch}x{patch} patches: only 16x16 (SAM) is supported")
    grid = shape_of(sd, p + "pos_embed")[1]
    image_size = 16 * grid
    depth = count_numbered(numbered(sd, p + "blocks."), "image-encoder blocks")
    lengths = [shape_of(sd, f"{p}blocks.{i}.attn.rel_pos_h")[0] for i in range(depth)]
    head_dim = shape_of(sd, p + "blocks.0.attn.rel_pos_h")[1]
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
        window_size=(windowed.pop() + 1) // 2 if windowed else VIT_WINDOW,
        description="ViT SAM recognised from the checkpoint's tensor shapes.",
    )


def _detect_tiny_vit(sd: Mapping[str, Any]) -> ModelSpec:
    p = "image_encoder.layers."
    n_stages = count_numbered(numbered(sd, p), "TinyViT stages")
    embed_dims, depths, heads, windows = [], [], [], []
    for s in range(n_stages):
        depths.append(count_numbered(numbered(sd, f"{p}{s}.blocks."), f"blocks of stage {s}"))
        bias_key = f"{p}{s}.blocks.0.attn.attention_biases"
        if bias_key in sd:
            n_heads, n_offsets = shape_of(sd, bias_key)
            window = math.isqrt(n_offsets)
            if window * window != n_offsets:
                raise ValueError(f"{bias_key} has {n_offsets} offsets, not a square window")
            embed_dims.append(shape_of(sd, f"{p}{s}.blocks.0.attn.norm.weight")[0])
            heads.append(n_heads)
            windows.append(window)
        else:
            # Convolutional (MBConv) stage: its width is the input of its first block; heads and
            # window are unused there, so TinyViT's conventions (32-channel heads, 7) fill in.
            dim = shape_of(sd, f"{p}{s}.blocks.0.conv1.c.weight")[1]
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
    For a ViT whose blocks are all global the window size is not part of the layout; for
    TinyViT the input size and the first (convolutional) stage's unused head count and window
    are not; for SAM 2 (Hiera) the input size, heads and global blocks are not (MedSAM2 and
    sam2.1_hiera_tiny share a layout). Other families compare encoder arguments and input size.
    """
    if a.encoder != b.encoder:
        return False
    ka, kb = _normalise(dict(a.encoder_kwargs)), _normalise(dict(b.encoder_kwargs))
    if a.encoder == "vit":
        for kwargs in (ka, kb):
            window = kwargs.pop("window_size", VIT_WINDOW)
            if set(range(kwargs.get("depth", 0))) - set(kwargs.get("global_attn_indexes", ())):
                kwargs["window_size"] = window
    if a.encoder == "hiera":
        from napari_sam.models.sam2.detect import same_layout

        return same_layout(a, b)
    if a.encoder == "tiny_vit":
        for key in ("num_heads", "window_sizes"):
            if key in ka and key in kb:
                ka[key], kb[key] = ka[key][1:], kb[key][1:]
        return ka == kb
    # ViT and other families: the encoder's arguments and the input size (position grids).
    return ka == kb and a.image_size == b.image_size


def looks_like(state_dict: StateDict) -> str:
    """A sentence naming the model a state dict looks like, for error messages."""
    try:
        spec = detect_spec(state_dict)
    except ValueError as exc:
        return f"The file is not recognisable as a SAM checkpoint ({exc})."
    return f"The file looks like {describe(spec)}."


def describe(spec: ModelSpec) -> str:
    """A spec's name, with its aliases (registered) or its architecture (custom)."""
    if spec.name in MODELS and same_architecture(MODELS[spec.name], spec):
        same = [
            s.name for s in MODELS.values() if s.name != spec.name and same_architecture(s, spec)
        ]
        alias = f" (same layout as {', '.join(same)})" if same else ""
        return f"{spec.name!r}{alias}"
    kwargs = dict(spec.encoder_kwargs)
    return f"{spec.name!r} ({spec.encoder}, {kwargs}, image_size {spec.image_size})"


def _detect_sam2(sd: Mapping[str, Any]) -> ModelSpec:
    # Imported here: the SAM 2 detector lives with the SAM 2 model code (no torch needed).
    from napari_sam.models.sam2.detect import detect_sam2_spec

    spec = detect_sam2_spec(sd)
    if spec is None:  # pragma: no cover - claims() checked the key
        raise ValueError("not a SAM 2 checkpoint")
    return spec


DETECTORS: tuple[Detector, ...] = (
    Detector(
        family="ViT",
        expects="image_encoder.patch_embed.proj.weight",
        claims=lambda sd: "image_encoder.patch_embed.proj.weight" in sd,
        detect=_detect_vit,
    ),
    Detector(
        family="TinyViT / MobileSAM",
        expects="image_encoder.layers.*",
        claims=lambda sd: any(k.startswith("image_encoder.layers.") for k in sd),
        detect=_detect_tiny_vit,
    ),
    Detector(
        family="SAM 2.1 (Hiera)",
        expects="image_encoder.trunk.patch_embed.proj.weight",
        claims=lambda sd: "image_encoder.trunk.patch_embed.proj.weight" in sd,
        detect=_detect_sam2,
    ),
)
"""The model families :func:`detect_spec` recognises, asked in order."""

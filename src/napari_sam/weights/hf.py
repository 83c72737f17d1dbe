"""Read SAM checkpoints saved in Hugging Face transformers' format.

``SamModel.save_pretrained`` writes a folder with ``config.json`` and the weights as
``model.safetensors``, a sharded ``model-0000k-of-0000n.safetensors`` set with its
``model.safetensors.index.json``, or ``pytorch_model.bin`` (possibly sharded the same way).
Its tensors carry transformers' module names (``vision_encoder.layers.3.layer_norm1.weight``);
this module renames them to the names of this package's module tree, which are those of Meta's
checkpoints (``image_encoder.blocks.3.norm1.weight``), and derives the :class:`ModelSpec` from
``config.json``. Only ``safetensors``, ``json`` and ``torch`` are used: transformers itself is
never imported.

- :func:`is_hf_checkpoint`: does a path look like a transformers checkpoint?
- :func:`read_hf_checkpoint`: its state dict in this package's key names, and its spec.
- :func:`convert_hf_state_dict`: the renaming alone.
- :func:`spec_from_hf_config`: ``config.json`` -> :class:`ModelSpec`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_sam.registry import ModelSpec, custom_vit_spec
from napari_sam.weights.detect import VIT_WINDOW, detect_spec, registered_twin

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "UnsupportedHFModelError",
    "check_model_type",
    "convert_hf_state_dict",
    "is_hf_checkpoint",
    "read_hf_checkpoint",
    "read_hf_config",
    "spec_from_hf_config",
]

CONFIG_NAME = "config.json"
# In the order transformers prefers them when a folder holds several.
WEIGHT_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# Present in every transformers SamModel state dict, absent from Meta-format ones.
_HF_MARKER = "vision_encoder.patch_embed.projection.weight"
_PE_KEY = "shared_image_embedding.positional_embedding"
_TIED_PE_KEY = "prompt_encoder.shared_embedding.positional_embedding"
_META_PE_KEY = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"

# What the other model types transformers knows are, and what to use instead.
_UNSUPPORTED = {
    "sam_hq": (
        "SAM-HQ (model_type 'sam_hq') adds a high-quality output token and intermediate "
        "encoder features that this package's SAM does not have"
    ),
    "sam2": "SAM 2 / SAM 2.1 (model_type 'sam2') has a Hiera encoder and memory modules",
    "sam2_video": (
        "SAM 2 / SAM 2.1 for video (model_type 'sam2_video') has a Hiera encoder and memory modules"
    ),
    "sam_vision_model": (
        "this is only SAM's image encoder (SamVisionModel): the prompt encoder and mask "
        "decoder are missing"
    ),
}
_INSTEAD = (
    "Use a transformers SAM (model_type 'sam') checkpoint such as facebook/sam-vit-base or "
    "wanglab/medsam-vit-base, a Meta-format file (sam_vit_b_01ec64.pth, mobile_sam.pt, "
    "medsam_vit_b.pth), or a registered model name (napari-sam models list)."
)

# This package's prompt encoder and mask decoder have SAM's fixed sizes; a config that
# changes any of these cannot be built here.
_FIXED = {
    "prompt_encoder_config": {
        "hidden_size": 256,
        "mask_input_channels": 16,
        "num_point_embeddings": 4,
        "hidden_act": "gelu",
    },
    "mask_decoder_config": {
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "mlp_dim": 2048,
        "attention_downsample_rate": 2,
        "num_multimask_outputs": 3,
        "iou_head_depth": 3,
        "iou_head_hidden_dim": 256,
        "hidden_act": "relu",
    },
    "vision_config": {
        "output_channels": 256,
        "patch_size": 16,
        "num_channels": 3,
        "hidden_act": "gelu",
        "qkv_bias": True,
        "use_abs_pos": True,
        "use_rel_pos": True,
        "num_pos_feats": 128,
    },
}
_MLP_RATIO = 4


class UnsupportedHFModelError(ValueError):
    """A transformers checkpoint of a model type (or size) this package cannot build."""


# --------------------------------------------------------------------------------------------
# Recognising


def _folder_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a transformers-format checkpoint.

    That is: a folder with ``config.json`` or one of transformers' weight files; a
    ``*.index.json`` shard index; or a weights file with ``config.json`` beside it or with
    transformers' key names in its safetensors header. A Meta-format ``.pth`` alone is not.
    Reads at most a ``config.json`` and a safetensors header, never the tensors.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return any((path / name).is_file() for name in (CONFIG_NAME, *WEIGHT_NAMES))
    if not path.is_file():
        return False
    if path.name.endswith(".index.json") or path.name == CONFIG_NAME:
        return True
    hf_name = path.name.startswith(("model", "pytorch_model"))
    if hf_name and (path.parent / CONFIG_NAME).is_file():
        return _config_says_transformers(path.parent)
    if path.suffix.lower() == ".safetensors":
        return _safetensors_has_key(path, _HF_MARKER)
    return False


def _config_says_transformers(folder: Path) -> bool:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, Mapping) and "model_type" in config


def _safetensors_has_key(path: Path, key: str) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return key in f.keys()  # keys() reads only the header
    except (SafetensorError, OSError):
        return False


# --------------------------------------------------------------------------------------------
# config.json -> ModelSpec


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``config.json`` of a transformers folder as a dict, None when there is none."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path} as JSON: {exc}") from None
    if not isinstance(config, Mapping):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return dict(config)


def check_model_type(config: Mapping[str, Any], where: str | os.PathLike) -> None:
    """Raise :class:`UnsupportedHFModelError` unless ``config`` is transformers' ``"sam"``."""
    model_type = config.get("model_type")
    if model_type == "sam":
        return
    if model_type is None:
        reason = "config.json has no model_type, so it is not a transformers model config"
    elif model_type in _UNSUPPORTED:
        reason = f"{_UNSUPPORTED[model_type]}; it is not supported yet"
    else:
        reason = f"model_type {model_type!r} is not a SAM model this package can build"
    raise UnsupportedHFModelError(f"cannot load {where}: {reason}. {_INSTEAD}")


def spec_from_hf_config(
    config: Mapping[str, Any], where: str | os.PathLike = "config"
) -> ModelSpec:
    """The :class:`ModelSpec` of a transformers ``SamConfig`` (``config.json`` as a dict).

    Returns the registry's spec (``vit_b``, ``vit_l``, ``vit_h``) when the architecture is a
    registered one, else a custom spec named like :func:`napari_sam.weights.detect_spec`'s.
    The preprocessing is always ``"sam"``: a config cannot say MedSAM; pass
    ``model_type="medsam_vit_b"`` (or load the registry's ``medsam_vit_b``) for that.

    Raises
    ------
    UnsupportedHFModelError
        Another model type (SAM-HQ, SAM 2, ...) or sizes this package's SAM does not have.
    """
    check_model_type(config, where)
    sub = {key: dict(config.get(key) or {}) for key in _FIXED}
    vision = sub["vision_config"]
    for section, fixed in _FIXED.items():
        for key, expected in fixed.items():
            value = sub[section].get(key, expected)
            if value != expected:
                raise UnsupportedHFModelError(
                    f"cannot load {where}: {section}.{key} is {value!r}, but this package's SAM "
                    f"has {expected!r}. {_INSTEAD}"
                )
    embed_dim = int(vision.get("hidden_size", 768))
    depth = int(vision.get("num_hidden_layers", 12))
    heads = int(vision.get("num_attention_heads", 12))
    image_size = int(vision.get("image_size", 1024))
    window = int(vision.get("window_size", VIT_WINDOW))
    global_attn = tuple(int(i) for i in vision.get("global_attn_indexes", (2, 5, 8, 11)))
    mlp_dim = vision.get("mlp_dim") or _MLP_RATIO * embed_dim
    prompt_size = sub["prompt_encoder_config"].get("image_size", 1024)
    problems = []
    if mlp_dim != _MLP_RATIO * embed_dim:
        problems.append(f"vision mlp_dim {mlp_dim} is not 4 x hidden_size {embed_dim}")
    if prompt_size != image_size:
        problems.append(
            f"prompt_encoder_config.image_size {prompt_size} differs from the vision "
            f"config's {image_size}"
        )
    if image_size % 16:
        problems.append(f"image_size {image_size} is not a multiple of 16")
    if embed_dim % heads:
        problems.append(f"{heads} heads do not divide hidden_size {embed_dim}")
    if any(not 0 <= i < depth for i in global_attn):
        problems.append(f"global_attn_indexes {list(global_attn)} outside 0..{depth - 1}")
    if window <= 0:
        problems.append(f"window_size {window} must be positive")
    if problems:
        raise UnsupportedHFModelError(f"cannot load {where}: {'; '.join(problems)}. {_INSTEAD}")
    spec = custom_vit_spec(
        embed_dim,
        depth,
        heads,
        global_attn,
        image_size,
        window_size=window,
        description="ViT SAM read from a transformers config.json.",
    )
    return registered_twin(spec)


# --------------------------------------------------------------------------------------------
# Key names


# Transformers' name -> this package's (Meta's), for everything but the numbered MLPs, whose
# last layer's index depends on their depth (see _rename_mlp).
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
        (r"^vision_encoder\.pos_embed$", "image_encoder.pos_embed"),
        (r"^vision_encoder\.layers\.(\d+)\.layer_norm([12])\.", r"image_encoder.blocks.\1.norm\2."),
        (r"^vision_encoder\.layers\.(\d+)\.(attn|mlp)\.", r"image_encoder.blocks.\1.\2."),
        (r"^vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
        (r"^vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
        (r"^vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
        (r"^vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
        (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
        (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
        (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
        (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
        (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
        (r"^prompt_encoder\.point_embed\.(\d+)\.", r"prompt_encoder.point_embeddings.\1."),
        (r"^prompt_encoder\.(no_mask_embed|not_a_point_embed)\.", r"prompt_encoder.\1."),
        (
            r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm([1-4])\.",
            r"mask_decoder.transformer.layers.\1.norm\2.",
        ),
        (
            r"^mask_decoder\.transformer\.layer_norm_final_attn\.",
            "mask_decoder.transformer.norm_final_attn.",
        ),
        (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
        (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
        (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
        # Attention and MLP blocks of the two-way transformer keep their names.
        (r"^mask_decoder\.(transformer\.|iou_token\.|mask_tokens\.)", r"mask_decoder.\1"),
    )
)
_MLP = re.compile(
    r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))"
    r"\.(proj_in|proj_out|layers\.(\d+))\.(weight|bias)$"
)


def convert_hf_state_dict(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers ``SamModel`` state dict into this package's (Meta's) key names.

    The positional-encoding matrix is stored by transformers as
    ``shared_image_embedding.positional_embedding`` and, tied to it,
    ``prompt_encoder.shared_embedding.positional_embedding``; either or both may be in a file.
    Both present with different values cannot be represented by one SAM and raise ValueError,
    as does any key without a place in SAM.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    mlp_parts: dict[str, dict[str, torch.Tensor]] = {}
    pe = [hf_state[k] for k in (_PE_KEY, _TIED_PE_KEY) if k in hf_state]
    if len(pe) == 2 and not (pe[0].shape == pe[1].shape and torch.equal(pe[0], pe[1])):
        raise ValueError(
            f"{_PE_KEY} and {_TIED_PE_KEY} differ; SAM uses one positional encoding for the "
            "image and the prompts, so this checkpoint cannot be converted"
        )
    if pe:
        out[_META_PE_KEY] = pe[0]
    for key, value in hf_state.items():
        if key in (_PE_KEY, _TIED_PE_KEY):
            continue
        if (m := _MLP.match(key)) is not None:
            mlp_parts.setdefault(m.group(1), {})[key[len(m.group(1)) + 1 :]] = value
            continue
        for pattern, replacement in _RENAMES:
            new, n = pattern.subn(replacement, key, count=1)
            if n:
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ValueError(
            f"not a transformers SAM state dict: no place in SAM for {', '.join(unknown[:5])}{more}"
        )
    for prefix, parts in mlp_parts.items():
        out.update(_rename_mlp(prefix, parts))
    return out


def _rename_mlp(prefix: str, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers: proj_in, layers.0 .. layers.{n-3}, proj_out; Meta: layers.0 .. layers.{n-1}.
    inner = sorted({int(k.split(".")[1]) for k in parts if k.startswith("layers.")})
    if inner != list(range(len(inner))):
        raise ValueError(f"{prefix}: hidden layers numbered {inner}, not 0..n-1")
    last = len(inner) + 1
    out = {}
    for name, value in parts.items():
        head, _, param = name.rpartition(".")
        if head == "proj_in":
            index = 0
        elif head == "proj_out":
            index = last
        else:
            index = int(head.split(".")[1]) + 1
        out[f"{prefix}.layers.{index}.{param}"] = value
    return out


# --------------------------------------------------------------------------------------------
# Reading

ReadFile = Callable[[Path], "tuple[Mapping[str, Any], ModelSpec | None]"]


def _weight_files(path: Path) -> tuple[Path, list[Path]]:
    """The folder and the weight files a transformers checkpoint path stands for."""
    folder = _folder_of(path)
    if path.is_dir():
        index_or_file = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
        if index_or_file is None:
            found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise FileNotFoundError(
                f"{path} holds no transformers weights (looked for {', '.join(WEIGHT_NAMES)}; "
                f"found {found}). Download the weights file into this folder too."
            )
    elif path.name == CONFIG_NAME:
        return _weight_files(folder)
    else:
        index_or_file = path
    if not index_or_file.name.endswith(".index.json"):
        return folder, [index_or_file]
    try:
        index = json.loads(index_or_file.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"cannot read the shard index {index_or_file}: {exc!r}") from None
    files = [folder / name for name in shards]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{index_or_file} lists {len(files)} shard files, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing from {folder}; download every "
            "shard of the checkpoint"
        )
    return folder, files


def read_hf_checkpoint(
    path: str | os.PathLike, read_file: ReadFile | None = None
) -> tuple[dict[str, torch.Tensor], ModelSpec]:
    """Read a transformers-format SAM checkpoint into this package's key names.

    Parameters
    ----------
    path : path-like
        The checkpoint folder, its ``config.json``, its shard index, or one weights file.
    read_file : callable, optional
        Reads one weights file (``.safetensors`` or a PyTorch pickle) safely into
        ``(state_dict, embedded_spec)``; default:
        :func:`napari_sam.weights.checkpoint.read_one_file` (PyTorch files with
        ``weights_only=True``).

    Returns
    -------
    state_dict : dict of str to Tensor
        Keys as in Meta's checkpoints, on the CPU, in the stored dtype
        (:func:`~napari_sam.weights.read_state_dict` casts half precision to float32).
    spec : ModelSpec
        From ``config.json`` when the folder has one, else from the tensor shapes.

    Raises
    ------
    UnsupportedHFModelError
        ``config.json`` names another model type (SAM-HQ, SAM 2, ...) or other sizes.
    FileNotFoundError, ValueError
        Missing shards, unreadable files, keys that are not SAM's.
    """
    if read_file is None:
        from napari_sam.weights.checkpoint import read_one_file

        read_file = read_one_file
    path = Path(path).expanduser()
    folder = _folder_of(path)
    config = read_hf_config(folder)
    spec = spec_from_hf_config(config, folder) if config is not None else None
    _, files = _weight_files(path)
    hf_state: dict[str, torch.Tensor] = {}
    for file in files:
        part, _embedded = read_file(file)
        hf_state.update(part)
    if _HF_MARKER not in hf_state and "image_encoder.patch_embed.proj.weight" in hf_state:
        # A Meta-format file that happens to sit in a transformers-looking folder.
        state = hf_state
    else:
        try:
            state = convert_hf_state_dict(hf_state)
        except ValueError as exc:
            raise ValueError(f"cannot read {path}: {exc}") from None
    if spec is None:
        spec = detect_spec(state)
    return state, spec

"""Build a :class:`Sam` from a :class:`~napari_sam.registry.ModelSpec`.

Architecture only: weights files are :mod:`napari_sam.weights`' concern (``load_model``, and
``segment_anything``'s ``build_sam(spec, checkpoint)`` / ``sam_model_registry``), which imports
this module, never the other way round.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from napari_sam.models.image_encoder import ImageEncoderViT
from napari_sam.models.mask_decoder import MaskDecoder
from napari_sam.models.prompt_encoder import PromptEncoder
from napari_sam.models.sam import Sam
from napari_sam.models.transformer import TwoWayTransformer
from napari_sam.registry import ModelSpec, get_spec

__all__ = ["build_sam"]

PROMPT_EMBED_DIM = 256
PATCH_SIZE = 16


def build_sam(spec: ModelSpec | str) -> Sam:
    """Build the model described by ``spec``, randomly initialised, eval mode, float32.

    On the CPU, or on the current default device (``with torch.device("meta"):`` builds a
    model without allocating its weights).

    Parameters
    ----------
    spec : ModelSpec or str
        A spec, or a registry name (``"vit_b"``, ``"default"``, ...).

    Returns
    -------
    Sam
        The model, with ``model.spec`` set to the spec it was built from; a
        :class:`~napari_sam.models.sam2.sam2.Sam2` for SAM 2 specs (``spec.family == "sam2"``).
    """
    if isinstance(spec, str):
        spec = get_spec(spec)
    elif not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec or a registry name, got {type(spec).__name__}")
    if spec.family == "sam2":
        # Imported here so SAM 1 never loads the SAM 2 modules.
        from napari_sam.models.sam2.build import build_sam2

        return build_sam2(spec)  # type: ignore[return-value]

    size = spec.image_size
    grid = size // PATCH_SIZE
    model = Sam(
        image_encoder=_build_encoder(spec),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(size, size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=PROMPT_EMBED_DIM,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=PROMPT_EMBED_DIM, num_heads=8, mlp_dim=2048
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        spec=spec,
    )
    model.eval()
    return model.to(dtype=torch.float32)


def _build_encoder(spec: ModelSpec) -> nn.Module:
    kwargs = dict(spec.encoder_kwargs)
    if spec.encoder == "tiny_vit":
        # Imported here so the ViT path never depends on the TinyViT module.
        from napari_sam.models.tiny_vit import TinyViT

        factory: Callable[..., nn.Module] = TinyViT
        kwargs = {"img_size": spec.image_size, **kwargs}
    else:
        factory = ImageEncoderViT
        kwargs = {
            "img_size": spec.image_size,
            "patch_size": PATCH_SIZE,
            "mlp_ratio": 4.0,
            "norm_layer": functools.partial(nn.LayerNorm, eps=1e-6),
            "qkv_bias": True,
            "use_rel_pos": True,
            "window_size": 14,
            "out_chans": PROMPT_EMBED_DIM,
            **kwargs,
        }
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise ValueError(
            f"model spec {spec.name!r} has encoder_kwargs the {spec.encoder} encoder does not "
            f"accept: {err}"
        ) from None

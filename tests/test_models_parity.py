"""Numerical parity of napari_sam.models with Meta's segment_anything (the reference).

The reference is built with random weights, perturbed so that no parameter keeps a trivial
initial value (zero relative-position tables, unit LayerNorm weights), and its state dict is
loaded strictly into our model. Tolerances: image embedding 1e-4, low-res logits 1e-3, IoU 1e-4.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import napari_sam
import reference
from napari_sam.models import image_encoder
from napari_sam.models.build import build_sam
from napari_sam.models.image_encoder import ImageEncoderViT
from napari_sam.registry import ModelSpec

ref_modeling = reference.segment_anything.modeling

EMBED_TOL = 1e-4
LOGIT_TOL = 1e-3
IOU_TOL = 1e-4

SMALL_VIT = {"embed_dim": 96, "depth": 2, "num_heads": 4, "global_attn_indexes": (1,)}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    if a.numel() == 0:
        return 0.0
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def _perturb(module: nn.Module, seed: int) -> None:
    """Give every parameter and float buffer non-trivial, reproducible values."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if not tensor.is_floating_point() or "pixel_" in name:
            continue
        scale = 0.5 if "rel_pos" in name else 0.05
        tensor.add_(scale * torch.randn(tensor.shape, generator=gen))


def _reference_encoder(image_size: int, vit: dict) -> nn.Module:
    """The reference ViT as segment_anything's builder configures it."""
    return ref_modeling.ImageEncoderViT(
        img_size=image_size,
        patch_size=16,
        mlp_ratio=4,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        qkv_bias=True,
        use_rel_pos=True,
        window_size=14,
        out_chans=256,
        **{**vit, "global_attn_indexes": list(vit["global_attn_indexes"])},
    )


def _reference_sam(image_size: int, vit: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    sam = reference.build_reference_sam(image_size, vit)
    _perturb(sam, seed)
    return sam.eval()


def _batched_input(image_size: int, seed: int) -> list[dict]:
    """Two images smaller than the model input (padding + crop), with all prompt kinds."""
    gen = torch.Generator().manual_seed(seed)
    s = image_size
    low = 4 * (s // 16)
    h1, w1 = s, int(0.75 * s)
    h2, w2 = int(0.6 * s), s
    return [
        {
            "image": 255 * torch.rand(3, h1, w1, generator=gen),
            "original_size": (2 * h1 // 3, 2 * w1 // 3),
            "point_coords": torch.rand(2, 3, 2, generator=gen) * torch.tensor([w1, h1]),
            "point_labels": torch.tensor([[1, 0, 1], [1, 1, 0]]),
            "mask_inputs": 4 * torch.randn(2, 1, low, low, generator=gen),
        },
        {
            "image": 255 * torch.rand(3, h2, w2, generator=gen),
            "original_size": (h2 + 7, w2 + 5),
            "boxes": torch.tensor([[10.0, 12.0, w2 * 0.7, h2 * 0.8], [0.0, 0.0, w2 - 1, h2 - 1]]),
            "point_coords": torch.tensor([[[w2 * 0.3, h2 * 0.4]], [[w2 * 0.5, h2 * 0.5]]]),
            "point_labels": torch.tensor([[1], [0]]),
        },
    ]


def _capture_embeddings(model: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.image_encoder.register_forward_hook(lambda _m, _i, out: seen.append(out))
    return seen


def _compare_end_to_end(ours, ref, batched: list[dict], multimask: bool) -> dict[str, float]:
    ours_emb, ref_emb = _capture_embeddings(ours), _capture_embeddings(ref)
    with torch.no_grad():
        out_ours = ours(batched, multimask_output=multimask)
        out_ref = ref(batched, multimask_output=multimask)
    diffs = {"embedding": _max_diff(ours_emb[0], ref_emb[0]), "logits": 0.0, "iou": 0.0}
    for a, b in zip(out_ours, out_ref, strict=True):
        diffs["logits"] = max(diffs["logits"], _max_diff(a["low_res_logits"], b["low_res_logits"]))
        diffs["iou"] = max(diffs["iou"], _max_diff(a["iou_predictions"], b["iou_predictions"]))
        assert a["masks"].shape == b["masks"].shape
        assert a["masks"].dtype == torch.bool
        # Binary masks may differ only where the reference's logits sit at the threshold.
        upscaled = ref.postprocess_masks(
            b["low_res_logits"], b["masks"].shape[-2:], b["masks"].shape[-2:]
        )
        disagree = a["masks"] != b["masks"]
        assert disagree.float().mean().item() < 1e-3
        assert upscaled.numel() > 0
    return diffs


# --- small configuration (img_size 256): every module, fast ---------------------------------


@pytest.fixture(scope="module")
def small_pair():
    ref = _reference_sam(256, SMALL_VIT, seed=0)
    spec = ModelSpec(name="parity_small", encoder="vit", encoder_kwargs=SMALL_VIT, image_size=256)
    ours = build_sam(spec)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def test_state_dict_keys_and_shapes_match_reference(small_pair):
    ours, ref = small_pair
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert set(ours_sd) == set(ref_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert not any(k.startswith("pixel_") for k in ours_sd)
    # Windowed block: 2 * 14 - 1 offsets; global block over the 16 x 16 grid: 2 * 16 - 1.
    assert ours_sd["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 24)
    assert ours_sd["image_encoder.blocks.1.attn.rel_pos_w"].shape == (31, 24)
    assert ours_sd["image_encoder.pos_embed"].shape == (1, 16, 16, 96)


def test_image_encoder_parity_small(small_pair):
    ours, ref = small_pair
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours.image_encoder(x), ref.image_encoder(x)
    assert a.shape == (2, 256, 16, 16)
    assert _max_diff(a, b) <= EMBED_TOL


def test_image_encoder_parity_bias_in_chunks(small_pair, monkeypatch):
    """The bias built one head at a time (as for big grids) gives the same embedding."""
    ours, ref = small_pair
    monkeypatch.setattr(image_encoder, "MAX_BIAS_ELEMENTS", 16**4)  # one 256 x 256 head
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert _max_diff(ours.image_encoder(x), ref.image_encoder(x)) <= EMBED_TOL


def test_image_encoder_gradients_match_reference(small_pair):
    """Training goes through SDPA with a bias that needs gradients (rel-pos tables)."""
    ours, ref = small_pair
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(1, 3, 256, 256, generator=gen)
    weight = torch.randn(1, 256, 16, 16, generator=gen)
    grads = []
    for model in (ours, ref):
        model.zero_grad()
        (model.image_encoder(x) * weight).sum().backward()
        grads.append({k: p.grad for k, p in model.image_encoder.named_parameters()})
        model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys()
    for key in ("blocks.0.attn.rel_pos_h", "blocks.1.attn.rel_pos_w", "blocks.0.attn.qkv.weight"):
        scale = grads[1][key].abs().max().item()
        assert scale > 0, key
        assert _max_diff(grads[0][key], grads[1][key]) <= 1e-4 * max(1.0, scale), key


def test_relative_positions_matter(small_pair):
    """Guard against a parity test that passes because the rel-pos path is inert."""
    ours, _ = small_pair
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    attn = ours.image_encoder.blocks[1].attn
    with torch.no_grad():
        before = ours.image_encoder(x)
        saved = attn.rel_pos_h.clone()
        attn.rel_pos_h.zero_()
        try:
            after = ours.image_encoder(x)
        finally:
            attn.rel_pos_h.copy_(saved)
    assert _max_diff(before, after) > 1e-2


@pytest.mark.parametrize(
    "prompts",
    ["points", "box", "points+box", "mask", "points+mask", "none"],
)
def test_prompt_encoder_parity(small_pair, prompts):
    ours, ref = small_pair
    gen = torch.Generator().manual_seed(3)
    b = 3
    points = boxes = masks = None
    if "points" in prompts:
        coords = torch.rand(b, 4, 2, generator=gen) * 256
        labels = torch.tensor([[1, 0, -1, 1], [0, 0, 1, 1], [1, -1, -1, -1]])
        points = (coords, labels)
    if "box" in prompts:
        boxes = torch.tensor([[5.0, 6.0, 100.0, 120.0], [0.0, 0.0, 255.0, 255.0], [30, 40, 50, 60]])
    if "mask" in prompts:
        masks = torch.randn(b, 1, 64, 64, generator=gen)
    with torch.no_grad():
        s_ours, d_ours = ours.prompt_encoder(points, boxes, masks)
        s_ref, d_ref = ref.prompt_encoder(points, boxes, masks)
    assert _max_diff(s_ours, s_ref) <= 1e-5
    assert _max_diff(d_ours, d_ref) <= 1e-5
    assert _max_diff(ours.prompt_encoder.get_dense_pe(), ref.prompt_encoder.get_dense_pe()) <= 1e-5


@pytest.mark.parametrize("multimask", [True, False])
def test_mask_decoder_parity(small_pair, multimask):
    ours, ref = small_pair
    gen = torch.Generator().manual_seed(4)
    embedding = torch.randn(1, 256, 16, 16, generator=gen)
    coords = torch.rand(5, 2, 2, generator=gen) * 256
    labels = torch.tensor([[1, 0]] * 5)
    with torch.no_grad():
        sparse, dense = ref.prompt_encoder((coords, labels), None, None)
        pe = ref.prompt_encoder.get_dense_pe()
        m_ours, i_ours = ours.mask_decoder(embedding, pe, sparse, dense, multimask)
        m_ref, i_ref = ref.mask_decoder(embedding, pe, sparse, dense, multimask)
    assert m_ours.shape == (5, 3 if multimask else 1, 64, 64)
    assert _max_diff(m_ours, m_ref) <= LOGIT_TOL
    assert _max_diff(i_ours, i_ref) <= IOU_TOL


@pytest.mark.parametrize("multimask", [True, False])
def test_sam_forward_parity_small(small_pair, multimask):
    ours, ref = small_pair
    diffs = _compare_end_to_end(ours, ref, _batched_input(256, seed=5), multimask)
    assert diffs["embedding"] <= EMBED_TOL
    assert diffs["logits"] <= LOGIT_TOL
    assert diffs["iou"] <= IOU_TOL


def test_postprocess_parity(small_pair):
    ours, ref = small_pair
    low = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    a = ours.postprocess_masks(low, (256, 180), (300, 211))
    b = ref.postprocess_masks(low, (256, 180), (300, 211))
    assert a.shape == (2, 3, 300, 211)
    assert _max_diff(a, b) <= 1e-5


# --- real widths at reduced depth (vit_l, vit_h encoders) -------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("embed_dim", "num_heads"), [(1024, 16), (1280, 16)], ids=["vit_l", "vit_h"]
)
def test_image_encoder_parity_real_widths(embed_dim, num_heads):
    vit = {"embed_dim": embed_dim, "depth": 2, "num_heads": num_heads, "global_attn_indexes": [1]}
    torch.manual_seed(7)
    ref = _reference_encoder(1024, vit).eval()
    _perturb(ref, seed=7)
    ours = ImageEncoderViT(
        img_size=1024, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), **vit
    ).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        diff = _max_diff(ours(x), ref(x))
    print(f"embed_dim {embed_dim}, depth 2: max abs embedding diff {diff:.3g}")
    assert diff <= EMBED_TOL


# --- full-size vit_b, loaded from a checkpoint file --------------------------------------------


@pytest.mark.slow
def test_vit_b_full_parity_from_checkpoint(tmp_path):
    torch.manual_seed(9)
    ref = reference.segment_anything.sam_model_registry["vit_b"]()
    _perturb(ref, seed=9)
    path = tmp_path / "vit_b_random.pth"
    torch.save(ref.state_dict(), path)
    ours = napari_sam.build_sam("vit_b", checkpoint=path)
    assert not ours.training
    diffs = _compare_end_to_end(ours, ref, _batched_input(1024, seed=10), multimask=True)
    print(f"vit_b full-size max abs diffs: {diffs}")
    assert diffs["embedding"] <= EMBED_TOL
    assert diffs["logits"] <= LOGIT_TOL
    assert diffs["iou"] <= IOU_TOL

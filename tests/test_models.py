"""Unit tests of napari_sam.models: shapes, checkpoint layout, input checks, MedSAM mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import reference
from conftest import SMALL_VIT_KWARGS, small_vit_spec
from napari_sam import build_sam, sam_model_registry
from napari_sam.models.image_encoder import window_partition, window_unpartition
from napari_sam.registry import MODELS, ModelSpec


def _small_spec(**changes) -> ModelSpec:
    return small_vit_spec(**{"name": "unit_small", **changes})


@pytest.fixture(scope="module")
def small_sam():
    torch.manual_seed(0)
    return build_sam(_small_spec())


@pytest.fixture(scope="module")
def small_medsam():
    torch.manual_seed(0)
    return build_sam(_small_spec(name="unit_medsam", preprocessing="medsam"))


def _state_dict_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_sam_meta(name: str):
    with torch.device("meta"):
        return build_sam(name)


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_official_layouts_equal_reference(name):
    """Every key and shape of the official checkpoints, checked without allocating weights."""
    with torch.device("meta"):
        ours = build_sam(name)
        ref = reference.segment_anything.sam_model_registry[name]()
    assert _state_dict_shapes(ours) == _state_dict_shapes(ref)
    n_params = sum(p.numel() for p in ours.parameters())
    expected_millions = {"vit_b": 94, "vit_l": 312, "vit_h": 641}[name]
    assert round(n_params / 1e6) == expected_millions
    assert ours.spec is MODELS[name]
    assert ours.image_size == 1024


def test_registry_names_and_defaults():
    assert set(sam_model_registry) == {
        "default",
        "vit_h",
        "vit_l",
        "vit_b",
        "vit_t",
        "medsam_vit_b",
        "sam2.1_hiera_tiny",
        "sam2.1_hiera_small",
        "sam2.1_hiera_base_plus",
        "sam2.1_hiera_large",
        "medsam2",
    }
    with torch.device("meta"):
        default = sam_model_registry["default"]()
        medsam = sam_model_registry["medsam_vit_b"]()
    assert default.spec.name == "vit_h"
    assert medsam.spec.preprocessing == "medsam"
    assert _state_dict_shapes(medsam) == _state_dict_shapes(build_sam_meta("vit_b"))


def test_vit_t_builds_tiny_vit_encoder():
    model = sam_model_registry["vit_t"]()  # 10 M parameters: cheap enough to allocate
    assert type(model.image_encoder).__name__ == "TinyViT"
    assert model.image_size == 1024
    assert "image_encoder.layers.0.blocks.0.conv1.c.weight" in model.state_dict()


def test_model_attributes(small_sam):
    assert not small_sam.training
    assert small_sam.mask_threshold == 0.0
    assert small_sam.image_format == "RGB"
    assert small_sam.device == torch.device("cpu")
    assert small_sam.image_size == 256
    assert all(p.dtype == torch.float32 for p in small_sam.parameters())
    keys = small_sam.state_dict().keys()
    assert not any("pixel_" in k for k in keys)
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in keys


def test_build_errors():
    with pytest.raises(ValueError, match="unknown model"):
        build_sam("vit_z")
    with pytest.raises(ValueError, match="encoder_kwargs"):
        build_sam(_small_spec(encoder_kwargs={**SMALL_VIT_KWARGS, "no_such_option": 1}))
    with pytest.raises(TypeError, match="ModelSpec"):
        build_sam(3)


def test_build_from_checkpoint_round_trip(tmp_path, small_sam):
    path = tmp_path / "small.pth"
    torch.save({"model": small_sam.state_dict()}, path)
    torch.manual_seed(123)  # a different random init, replaced by the file's weights
    loaded = build_sam(_small_spec(), checkpoint=path)
    for key, value in small_sam.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    partial = dict(small_sam.state_dict())
    del partial["mask_decoder.iou_token.weight"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="iou_token"):
        build_sam(_small_spec(), checkpoint=tmp_path / "partial.pth")
    relaxed = build_sam(_small_spec(), checkpoint=tmp_path / "partial.pth", strict=False)
    key = "mask_decoder.mask_tokens.weight"
    assert torch.equal(relaxed.state_dict()[key], small_sam.state_dict()[key])


# --- image encoder ------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w", "window"), [(16, 16, 14), (14, 28, 14), (5, 7, 3)])
def test_window_partition_round_trip(h, w, window):
    x = torch.randn(2, h, w, 3)
    windows, padded = window_partition(x, window)
    assert padded == (-(-h // window) * window, -(-w // window) * window)
    assert windows.shape == (2 * padded[0] * padded[1] // window**2, window, window, 3)
    # The first window is the top-left corner of the first image.
    top_left = x[0, :window, :window]
    assert torch.equal(windows[0, : top_left.shape[0], : top_left.shape[1]], top_left)
    assert torch.equal(window_unpartition(windows, window, padded, (h, w)), x)


def test_image_encoder_shapes_and_errors(small_sam):
    encoder = small_sam.image_encoder
    with torch.no_grad():
        out = encoder(torch.randn(3, 3, 256, 256))
    assert out.shape == (3, 256, 16, 16)
    with pytest.raises(ValueError, match="preprocess"):
        encoder(torch.randn(1, 3, 200, 256))
    with pytest.raises(ValueError, match="B x 3 x 256 x 256"):
        encoder(torch.randn(3, 256, 256))


def test_encoder_batch_is_independent(small_sam):
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both = small_sam.image_encoder(x)
        second = small_sam.image_encoder(x[1:])
    assert torch.allclose(both[1:], second, atol=1e-5)


# --- prompt encoder ------------------------------------------------------------------------------


def test_prompt_encoder_shapes(small_sam):
    pe = small_sam.prompt_encoder
    coords = torch.tensor([[[10.0, 20.0], [30.0, 40.0]]]).repeat(3, 1, 1)
    labels = torch.tensor([[1, 0]]).repeat(3, 1)
    boxes = torch.tensor([[1.0, 2.0, 100.0, 120.0]]).repeat(3, 1)
    sparse, dense = pe((coords, labels), None, None)
    assert sparse.shape == (3, 3, 256)  # two points and the padding point
    assert dense.shape == (3, 256, 16, 16)
    sparse, _ = pe((coords, labels), boxes, None)
    assert sparse.shape == (3, 4, 256)  # no padding point when a box is given
    sparse, dense = pe(None, None, torch.zeros(2, 1, 64, 64))
    assert sparse.shape == (2, 0, 256)
    assert dense.shape == (2, 256, 16, 16)
    assert pe.get_dense_pe().shape == (1, 256, 16, 16)
    assert pe.mask_input_size == (64, 64)


def test_box_corner_labels_match_boxes(small_sam):
    """Labels 2 / 3 on points embed box corners, as in SAM's ONNX model."""
    pe = small_sam.prompt_encoder
    box = torch.tensor([[12.0, 30.0, 150.0, 201.0]])
    from_box, _ = pe(None, box, None)
    corners = box.reshape(1, 2, 2)
    from_points, _ = pe((corners, torch.tensor([[2, 3]])), None, None)
    assert torch.allclose(from_points[:, :2], from_box, atol=1e-6)


def test_padding_point_has_no_position(small_sam):
    pe = small_sam.prompt_encoder
    a, _ = pe((torch.tensor([[[0.0, 0.0]]]), torch.tensor([[-1]])), None, None)
    b, _ = pe((torch.tensor([[[200.0, 17.0]]]), torch.tensor([[-1]])), None, None)
    assert torch.equal(a, b)
    assert torch.allclose(a[0, 0], pe.not_a_point_embed.weight[0])


@pytest.mark.parametrize(
    ("points", "boxes", "masks", "match"),
    [
        ((torch.zeros(1, 2), torch.zeros(1)), None, None, "B x N x 2"),
        ((torch.zeros(1, 2, 2), torch.zeros(1, 3)), None, None, "labels"),
        ((torch.zeros(1, 1, 2), torch.tensor([[5]])), None, None, "foreground"),
        (None, torch.zeros(2, 3), None, "B x 4"),
        (None, torch.zeros(2, 2, 4), None, "one per prompt set"),
        (None, None, torch.zeros(1, 1, 256, 256), "1 x 64 x 64"),
        ((torch.zeros(2, 1, 2), torch.ones(2, 1)), torch.zeros(3, 4), None, "disagree"),
    ],
)
def test_prompt_encoder_errors(small_sam, points, boxes, masks, match):
    with pytest.raises(ValueError, match=match):
        small_sam.prompt_encoder(points, boxes, masks)


# --- mask decoder -------------------------------------------------------------------------------


def _decode(model, embeddings, sparse, dense, multimask=True):
    with torch.no_grad():
        return model.mask_decoder(
            embeddings, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask
        )


def test_decoder_per_prompt_embeddings(small_sam):
    gen = torch.Generator().manual_seed(2)
    embeddings = torch.randn(3, 256, 16, 16, generator=gen)
    coords = torch.rand(3, 2, 2, generator=gen) * 256
    sparse, dense = small_sam.prompt_encoder((coords, torch.ones(3, 2)), None, None)
    masks, iou = _decode(small_sam, embeddings, sparse, dense)
    assert masks.shape == (3, 3, 64, 64)
    assert iou.shape == (3, 3)
    for i in range(3):
        single_m, single_iou = _decode(
            small_sam, embeddings[i : i + 1], sparse[i : i + 1], dense[i : i + 1]
        )
        assert torch.allclose(masks[i], single_m[0], atol=1e-4)
        assert torch.allclose(iou[i], single_iou[0], atol=1e-5)
    # One shared embedding is broadcast over the prompt sets.
    shared_m, _ = _decode(small_sam, embeddings[:1], sparse, dense)
    repeated_m, _ = _decode(small_sam, embeddings[:1].repeat(3, 1, 1, 1), sparse, dense)
    assert torch.allclose(shared_m, repeated_m, atol=1e-5)
    with pytest.raises(ValueError, match="B = 3"):
        _decode(small_sam, embeddings[:2], sparse, dense)


def test_decoder_single_mask_is_token_zero(small_sam):
    gen = torch.Generator().manual_seed(3)
    embeddings = torch.randn(1, 256, 16, 16, generator=gen)
    sparse, dense = small_sam.prompt_encoder(None, torch.tensor([[10.0, 10.0, 90.0, 80.0]]), None)
    with torch.no_grad():
        all_masks, all_iou = small_sam.mask_decoder.predict_masks(
            embeddings, small_sam.prompt_encoder.get_dense_pe(), sparse, dense
        )
    single, single_iou = _decode(small_sam, embeddings, sparse, dense, multimask=False)
    multi, multi_iou = _decode(small_sam, embeddings, sparse, dense, multimask=True)
    assert torch.allclose(single, all_masks[:, :1], atol=1e-5)
    assert torch.allclose(multi, all_masks[:, 1:], atol=1e-5)
    assert torch.equal(single_iou, all_iou[:, :1])
    assert torch.equal(multi_iou, all_iou[:, 1:])


# --- Sam: preprocessing, postprocessing, forward -------------------------------------------------


def test_sam_preprocess_normalises_and_pads(small_sam):
    image = torch.full((3, 100, 256), 255.0)
    out = small_sam.preprocess(image)
    assert out.shape == (3, 256, 256)
    expected = (255.0 - small_sam.pixel_mean) / small_sam.pixel_std
    assert torch.allclose(out[:, :100], expected.expand(3, 100, 256))
    assert torch.count_nonzero(out[:, 100:]) == 0
    assert small_sam.preprocess(image[None].repeat(2, 1, 1, 1)).shape == (2, 3, 256, 256)
    with pytest.raises(ValueError, match="longest side"):
        small_sam.preprocess(torch.zeros(3, 300, 256))
    with pytest.raises(ValueError, match="3 x h x w"):
        small_sam.preprocess(torch.zeros(1, 256, 256))


def test_sam_postprocess_crops_padding(small_sam):
    # Logits positive in the top half of the padded frame only.
    low = torch.full((1, 1, 64, 64), -5.0)
    low[..., :32, :] = 5.0
    # Input 128 x 256 (the top half): after the crop the whole mask is positive.
    out = small_sam.postprocess_masks(low, (128, 256), (64, 128))
    assert out.shape == (1, 1, 64, 128)
    assert bool((out > 0).all())


def test_medsam_preprocess_min_max(small_medsam):
    gen = torch.Generator().manual_seed(4)
    images = torch.stack(
        [10 + 50 * torch.rand(3, 256, 256, generator=gen), 100 + torch.rand(3, 256, 256)]
    )
    out = small_medsam.preprocess(images)
    assert out.shape == (2, 3, 256, 256)
    for i in range(2):
        assert out[i].min().item() == pytest.approx(0.0, abs=1e-6)
        assert out[i].max().item() == pytest.approx(1.0, abs=1e-6)
    scaled = (images[0] - images[0].min()) / (images[0].max() - images[0].min())
    assert torch.allclose(out[0], scaled, atol=1e-6)
    flat = small_medsam.preprocess(torch.full((3, 256, 256), 7.0))
    assert torch.count_nonzero(flat) == 0  # constant image: no division by zero
    with pytest.raises(ValueError, match="stretched to 256 x 256"):
        small_medsam.preprocess(torch.zeros(3, 200, 256))


def test_medsam_postprocess_resizes_directly(small_medsam, small_sam):
    low = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    out = small_medsam.postprocess_masks(low, (128, 256), (90, 70))
    direct = F.interpolate(low, (90, 70), mode="bilinear", align_corners=False)
    assert torch.equal(out, direct)
    # SAM mode would crop to the resized input first and so differ.
    cropped = small_sam.postprocess_masks(low, (128, 256), (90, 70))
    assert (cropped - direct).abs().max() > 0.1


def test_sam_forward_outputs(small_sam):
    gen = torch.Generator().manual_seed(6)
    batched = [
        {
            "image": 255 * torch.rand(3, 256, 192, generator=gen),
            "original_size": (400, 300),
            "boxes": torch.tensor([[10.0, 10.0, 100.0, 120.0], [50.0, 60.0, 180.0, 250.0]]),
        },
        {
            "image": 255 * torch.rand(3, 144, 256, generator=gen),
            "original_size": (144, 256),
            "point_coords": torch.tensor([[[30.0, 40.0]]]),
            "point_labels": torch.tensor([[1]]),
        },
    ]
    out = small_sam(batched, multimask_output=True)
    assert out[0]["masks"].shape == (2, 3, 400, 300)
    assert out[0]["masks"].dtype == torch.bool
    assert out[0]["iou_predictions"].shape == (2, 3)
    assert out[0]["low_res_logits"].shape == (2, 3, 64, 64)
    assert out[1]["masks"].shape == (1, 3, 144, 256)
    single = small_sam(batched[1:], multimask_output=False)
    assert single[0]["masks"].shape == (1, 1, 144, 256)
    expected = small_sam.postprocess_masks(single[0]["low_res_logits"], (144, 256), (144, 256))
    assert torch.equal(single[0]["masks"], expected > 0)
    with pytest.raises(ValueError, match="empty"):
        small_sam([], multimask_output=True)
    bad = dict(batched[1])
    del bad["point_labels"]
    with pytest.raises(ValueError, match="point_labels"):
        small_sam([bad], multimask_output=True)


def test_bfloat16_model_runs_end_to_end(small_sam):
    """Half-precision weights: inputs and positions are cast, outputs stay close to float32."""
    low = copy.deepcopy(small_sam).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(7)
    batched = [
        {
            "image": 255 * torch.rand(3, 256, 200, generator=gen),
            "original_size": (256, 200),
            "point_coords": torch.tensor([[[60.0, 70.0], [120.0, 90.0]]]),
            "point_labels": torch.tensor([[1, 0]]),
            "boxes": torch.tensor([[20.0, 30.0, 150.0, 180.0]]),
            "mask_inputs": torch.randn(1, 1, 64, 64, generator=gen),
        }
    ]
    ref = small_sam(batched, multimask_output=True)[0]
    out = low(batched, multimask_output=True)[0]
    assert out["low_res_logits"].dtype == torch.bfloat16
    assert out["masks"].shape == ref["masks"].shape
    assert (out["iou_predictions"].float() - ref["iou_predictions"]).abs().max() < 0.1
    agree = (out["masks"] == ref["masks"]).float().mean().item()
    assert agree > 0.9

"""Automatic mask generation: utilities against the reference, and the generator's parity.

Parity runs our generator and segment_anything's on the same small model (image_size 256, a
two-block ViT) and requires the same number of masks, matched one to one at IoU >= 0.99, with
the same scores, points and crop boxes. Random weights alone give near-identical masks for every
grid point (one survives NMS), so most parity tests wrap both models' decoders so that each mask
also carries a disk around its prompt point (radius by mask token): the real prompt encoder,
decoder, upscaling, filters, crops and NMS run unchanged on masks that differ per point. Our
generator decodes through the fast decoder's shared-image path, tested against the model's
decoder here.
"""

from __future__ import annotations

import copy
import sys
import types

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

import reference
from conftest import SMALL_VIT_KWARGS
from napari_sam import amg_utils as U
from napari_sam import speed
from napari_sam.automatic import (
    AmgProgress,
    SamAutomaticMaskGenerator,
    iter_segment_everything,
    masks_to_labels,
    segment_everything,
)
from napari_sam.models.build import build_sam
from napari_sam.models.mask_decoder import MaskDecoder
from napari_sam.predictor import SamPredictor, default_to_uint8, encode_image
from napari_sam.registry import ModelSpec
from napari_sam.speed.decoder import FastMaskDecoder
from napari_sam.training.synthetic import synthetic_scene

ref_sa = reference.segment_anything
ref_amg = sys.modules["segment_anything.utils.amg"]
ref_boxes = reference.module("torchvision.ops.boxes")

SIZE = 256  # encoder input of the small model
SMALL_VIT = SMALL_VIT_KWARGS
LOOSE = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


# -- utilities against the reference -----------------------------------------------------------


def test_point_grids_and_crop_boxes_match_reference():
    for n in (1, 2, 7, 32):
        np.testing.assert_array_equal(U.build_point_grid(n), ref_amg.build_point_grid(n))
    grids = U.build_all_layer_point_grids(16, 2, 2)
    assert [len(g) for g in grids] == [256, 64, 16]
    for size in [(512, 512), (300, 701), (1000, 37)]:
        for layers in range(4):
            for overlap in (512 / 1500, 0.1, 0.0):
                assert U.generate_crop_boxes(size, layers, overlap) == (
                    ref_amg.generate_crop_boxes(size, layers, overlap)
                )
    boxes, layers = U.generate_crop_boxes((100, 200), 1, 0.0)
    assert boxes == [[0, 0, 200, 100], [0, 0, 100, 50], [0, 50, 100, 100], [100, 0, 200, 50],
                     [100, 50, 200, 100]]  # fmt: skip
    assert layers == [0, 1, 1, 1, 1]


def test_rle_boxes_and_stability_match_reference():
    rng = np.random.default_rng(0)
    for trial in range(30):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        masks = torch.as_tensor(rng.random((3, h, w)) < rng.random())
        if trial % 7 == 0:
            masks[:] = False
        if trial % 11 == 0:
            masks[:] = True
        ours = U.mask_to_rle(masks)
        assert ours == ref_amg.mask_to_rle_pytorch(masks)
        for rle, mask in zip(ours, masks):
            np.testing.assert_array_equal(U.rle_to_mask(rle), mask.numpy())
            assert U.area_from_rle(rle) == int(mask.sum())
        assert torch.equal(U.batched_mask_to_box(masks), ref_amg.batched_mask_to_box(masks))
        logits = 3 * torch.randn(4, h, w)
        a = U.calculate_stability_score(logits, 0.0, 1.0)
        b = ref_amg.calculate_stability_score(logits, 0.0, 1.0)
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


def test_box_near_crop_edge_matches_reference():
    rng = np.random.default_rng(1)
    xy = rng.integers(0, 80, (200, 2))
    boxes = torch.as_tensor(np.concatenate([xy, xy + rng.integers(0, 60, (200, 2))], 1))
    for crop in ([0, 0, 100, 100], [30, 20, 130, 90], [60, 60, 160, 160]):
        assert torch.equal(
            U.is_box_near_crop_edge(boxes, crop, [0, 0, 160, 160]),
            ref_amg.is_box_near_crop_edge(boxes, crop, [0, 0, 160, 160]),
        )


def test_nms_matches_torchvision_semantics():
    rng = np.random.default_rng(2)
    for _ in range(100):
        n = int(rng.integers(0, 50))
        xy = torch.as_tensor(rng.integers(0, 40, (n, 2)))
        boxes = torch.cat([xy, xy + torch.as_tensor(rng.integers(0, 25, (n, 2)))], 1).float()
        scores = torch.as_tensor(rng.integers(0, 4, n)).float()  # many ties
        zeros = torch.zeros(n, dtype=torch.int64)
        for thresh in (0.0, 0.3, 0.7):
            expected = ref_boxes.batched_nms(boxes, scores, zeros, thresh)
            assert torch.equal(U.batched_nms(boxes, scores, zeros, thresh), expected)
    # Categories never suppress each other; the result is sorted by score.
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert U.batched_nms(boxes, scores, torch.tensor([0, 1, 0, 0]), 0.5).tolist() == [3, 0, 1]
    assert U.nms(boxes, scores, 0.5).tolist() == [3, 0]
    # IoU exactly at the threshold does not suppress.
    half = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5]])
    assert U.nms(half, torch.tensor([1.0, 0.5]), 0.5).tolist() == [0, 1]


def _cv2_connected_components_with_stats(image, connectivity):
    """OpenCV's call, for the reference's clean-up (area in the last stats column)."""
    assert connectivity == 8
    labels, n = ndimage.label(image, structure=np.ones((3, 3)))
    stats = np.zeros((n + 1, 5), dtype=np.int32)
    stats[:, -1] = np.bincount(labels.ravel(), minlength=n + 1)
    return n + 1, labels, stats, None


@pytest.fixture
def reference_cv2(monkeypatch):
    """The reference needs OpenCV only for connected components; give it scipy's."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("cv2")
        stand_in.connectedComponentsWithStats = _cv2_connected_components_with_stats
        monkeypatch.setitem(sys.modules, "cv2", stand_in)


def test_remove_small_regions_matches_reference(reference_cv2):
    rng = np.random.default_rng(3)
    for _ in range(80):
        h, w = (int(v) for v in rng.integers(5, 30, 2))
        mask = rng.random((h, w)) < rng.random()
        for mode in ("holes", "islands"):
            for area in (1, 4, 20, 400):
                ours, changed = U.remove_small_regions(mask, area, mode)
                expected, ref_changed = ref_amg.remove_small_regions(mask, area, mode)
                assert changed == ref_changed
                np.testing.assert_array_equal(ours, expected)


def test_remove_small_regions_by_hand():
    mask = np.zeros((9, 9), dtype=bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False  # a one-pixel hole
    mask[8, 8] = True  # a one-pixel island
    filled, changed = U.remove_small_regions(mask, 2, "holes")
    assert changed and filled[3, 3] and filled.sum() == mask.sum() + 1
    cleaned, changed = U.remove_small_regions(mask, 2, "islands")
    assert changed and not cleaned[8, 8] and cleaned.sum() == mask.sum() - 1
    same, changed = U.remove_small_regions(mask, 1, "islands")
    assert not changed and np.array_equal(same, mask)
    # All islands small: the largest survives.
    kept, _ = U.remove_small_regions(mask, 1000, "islands")
    assert kept.sum() == 24 and not kept[8, 8]
    with pytest.raises(ValueError, match="holes"):
        U.remove_small_regions(mask, 2, "edges")


# Compressed COCO RLE: strings as pycocotools 2.0.11 writes them (mask_utils.frPyObjects on the
# uncompressed RLE); the short ones are also checked by hand. Negative differences occur in the
# last two.
COCO_CASES = [
    ({"size": [3, 4], "counts": [0, 5, 7]}, "057"),
    ({"size": [2, 2], "counts": [4]}, "4"),
    ({"size": [1, 1], "counts": [0, 1]}, "01"),
    # 12 -> "<"; 3, 7; then differences to two runs back: 0 -> "0", 68 -> 5-bit groups 4 | 2
    # with the continuation bit on the first: "T2".
    ({"size": [10, 10], "counts": [12, 3, 7, 3, 75]}, "<370T2"),
    ({"size": [2, 3], "counts": [1, 1, 1, 1, 1, 1]}, "111000"),
    ({"size": [40, 40], "counts": [100, 50, 1000, 30, 420]}, "T3b1Xo0\\Ol]O"),
    ({"size": [300, 300], "counts": [40000, 17, 3, 20000, 2, 29980]}, "PRW1a03_`c0Olg9"),
]


@pytest.mark.parametrize(("rle", "expected"), COCO_CASES)
def test_coco_rle_string_matches_pycocotools(rle, expected):
    encoded = U.coco_encode_rle(rle)
    assert encoded == {"size": rle["size"], "counts": expected}
    assert U.coco_decode_rle(encoded) == rle


def test_coco_rle_round_trip_random_masks():
    rng = np.random.default_rng(4)
    masks = torch.as_tensor(rng.random((20, 37, 53)) < 0.5)
    masks[0] = False
    masks[1] = True
    for rle, mask in zip(U.mask_to_rle(masks), masks):
        decoded = U.coco_decode_rle(U.coco_encode_rle(rle))
        np.testing.assert_array_equal(U.rle_to_mask(decoded), mask.numpy())


# -- small models and point-aware decoders -----------------------------------------------------


def _perturb(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and "pixel_" not in name:
                t.add_(0.05 * torch.randn(t.shape, generator=gen))


def _reference_model(state_dict, vit: dict = SMALL_VIT, window_size: int = 14) -> nn.Module:
    return reference.build_reference_sam(SIZE, vit, window_size=window_size, state_dict=state_dict)


class _RecordingPromptEncoder(nn.Module):
    """The real prompt encoder; remembers the first point of each prompt set."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.embed_dim = inner.embed_dim
        self.last_points: torch.Tensor | None = None

    def get_dense_pe(self) -> torch.Tensor:
        return self.inner.get_dense_pe()

    def forward(self, points, boxes, masks):
        if points is not None:
            self.last_points = points[0][:, 0, :].clone()
        return self.inner(points=points, boxes=boxes, masks=masks)


RADII = (0.12, 0.2, 0.32)  # of the encoder frame, one per multimask output


def _with_disks(logits: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Low-res logits plus disks of three radii around each prompt point (encoder frame)."""
    side = logits.shape[-1]
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) * (SIZE / side)
    dx = centres[None, None, :] - points[:, 0, None, None]
    dy = centres[None, :, None] - points[:, 1, None, None]
    radii = torch.tensor(RADII[-logits.shape[1] :]) * SIZE
    disks = 10 * (1 - torch.hypot(dx, dy)[:, None] / radii[None, :, None, None])
    return 0.3 * logits + disks


class _DiskDecoder(nn.Module):
    """The reference's decoder with :func:`_with_disks` on its logits."""

    def __init__(self, inner: nn.Module, prompts: _RecordingPromptEncoder) -> None:
        super().__init__()
        self.inner = inner
        self.prompts = prompts

    def forward(self, **kwargs):
        logits, iou = self.inner(**kwargs)
        return _with_disks(logits, self.prompts.last_points), iou


# Our generator decodes with the fast twin of the model's decoder: the disks are added to its
# output. Recorders are found by the decoder's transformer, which the twin shares.
_RECORDERS: dict[int, _RecordingPromptEncoder] = {}


@pytest.fixture(autouse=True)
def _disks_in_shared_decoder(monkeypatch):
    real = FastMaskDecoder.forward

    def with_disks(decoder, *args, **kwargs):
        logits, iou = real(decoder, *args, **kwargs)
        recorder = _RECORDERS.get(id(decoder.transformer))
        if recorder is None:
            return logits, iou
        return _with_disks(logits, recorder.last_points), iou

    monkeypatch.setattr(FastMaskDecoder, "forward", with_disks)


def _point_aware_ours(model: nn.Module) -> nn.Module:
    model.prompt_encoder = _RecordingPromptEncoder(model.prompt_encoder)
    _RECORDERS[id(model.mask_decoder.transformer)] = model.prompt_encoder
    return model


def _point_aware_reference(model: nn.Module) -> nn.Module:
    prompts = _RecordingPromptEncoder(model.prompt_encoder)
    model.prompt_encoder = prompts
    model.mask_decoder = _DiskDecoder(model.mask_decoder, prompts)
    return model


@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(0)
    spec = ModelSpec(name="amg_small", encoder="vit", encoder_kwargs=SMALL_VIT, image_size=SIZE)
    model = build_sam(spec)
    _perturb(model, 0)
    return spec, model.state_dict()


@pytest.fixture(scope="module")
def plain_pair(state_dict):
    spec, sd = state_dict
    ours = build_sam(spec)
    ours.load_state_dict(sd)
    return ours.eval(), _reference_model(sd)


@pytest.fixture(scope="module")
def disk_pair(state_dict):
    spec, sd = state_dict
    ours = build_sam(spec)
    ours.load_state_dict(sd)
    return _point_aware_ours(ours.eval()), _point_aware_reference(_reference_model(sd))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(5)
    img = np.full((120, 160, 3), 40, np.uint8)
    yy, xx = np.mgrid[:120, :160]
    img[(yy - 40) ** 2 + (xx - 45) ** 2 < 500] = (200, 60, 60)
    img[70:110, 80:150] = (60, 190, 90)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _assert_same_records(ours: list[dict], ref: list[dict]) -> None:
    assert len(ours) == len(ref)
    unmatched = list(range(len(ref)))
    for a in ours:
        ious = [_iou(a["segmentation"], ref[j]["segmentation"]) for j in unmatched]
        best = int(np.argmax(ious))
        assert ious[best] >= 0.99, f"no reference mask matches (best IoU {ious[best]:.3f})"
        b = ref[unmatched.pop(best)]
        np.testing.assert_allclose(a["point_coords"], b["point_coords"])
        assert a["crop_box"] == b["crop_box"]
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-4)
        assert a["stability_score"] == pytest.approx(b["stability_score"], abs=0.01)
        assert np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 1
        assert abs(a["area"] - b["area"]) <= 0.01 * b["area"] + 1
    assert not unmatched


def _both(pair, image, **kwargs):
    ours, ref = pair
    a = SamAutomaticMaskGenerator(ours, **kwargs).generate(image)
    b = ref_sa.SamAutomaticMaskGenerator(ref, **kwargs).generate(image)
    return a, b


# -- generator parity --------------------------------------------------------------------------


def test_parity_random_weights_plain_model(plain_pair, image):
    ours, ref = _both(plain_pair, image, points_per_side=4, **LOOSE)
    assert len(ours) >= 1
    _assert_same_records(ours, ref)


def test_parity_point_aware_whole_image(disk_pair, image):
    ours, ref = _both(disk_pair, image, points_per_side=5, points_per_batch=16, **LOOSE)
    assert len(ours) >= 8  # distinct masks survive NMS: a meaningful comparison
    _assert_same_records(ours, ref)
    # Records are typed like the reference's (JSON-ready numbers, bool masks).
    r = ours[0]
    assert r["segmentation"].dtype == bool and r["segmentation"].shape == image.shape[:2]
    assert isinstance(r["area"], int) and all(isinstance(v, int) for v in r["bbox"])
    assert r["crop_box"] == [0, 0, 160, 120]


def test_parity_point_aware_default_filters(disk_pair, image):
    # The stability and IoU filters at work: thresholds that keep some masks and drop others.
    # (Predicted IoUs of these random weights lie around 0 and the disks' stability around 0.7.)
    kwargs = {"points_per_side": 5, "pred_iou_thresh": 1e-4, "stability_score_thresh": 0.7}
    ours, ref = _both(disk_pair, image, **kwargs)
    loose = SamAutomaticMaskGenerator(disk_pair[0], points_per_side=5, **LOOSE).generate(image)
    assert 0 < len(ours) < len(loose) / 2
    assert min(r["stability_score"] for r in ours) >= 0.7
    assert min(r["predicted_iou"] for r in ours) > 1e-4
    _assert_same_records(ours, ref)


def test_parity_crops_and_small_regions(disk_pair, image, reference_cv2):
    kwargs = {
        "points_per_side": 6,
        "crop_n_layers": 1,
        "crop_n_points_downscale_factor": 2,
        "min_mask_region_area": 40,
        **LOOSE,
    }
    ours, ref = _both(disk_pair, image, **kwargs)
    assert len({tuple(r["crop_box"]) for r in ours}) > 1  # masks from crops survive
    _assert_same_records(ours, ref)


def test_output_modes_agree(disk_pair, image):
    kwargs = {"points_per_side": 4, **LOOSE}
    ours = SamAutomaticMaskGenerator(disk_pair[0], **kwargs).generate(image)
    coco = SamAutomaticMaskGenerator(disk_pair[0], output_mode="coco_rle", **kwargs)
    rle = SamAutomaticMaskGenerator(disk_pair[0], output_mode="uncompressed_rle", **kwargs)
    for a, c, r in zip(ours, coco.generate(image), rle.generate(image), strict=True):
        assert isinstance(c["segmentation"]["counts"], str)
        assert c["segmentation"]["size"] == [120, 160]
        decoded = U.rle_to_mask(U.coco_decode_rle(c["segmentation"]))
        np.testing.assert_array_equal(decoded, a["segmentation"])
        np.testing.assert_array_equal(U.rle_to_mask(r["segmentation"]), a["segmentation"])
        assert c["area"] == a["area"] == int(a["segmentation"].sum())


@pytest.fixture(scope="module")
def trained_pair():
    """The project's small SAM trained on synthetic shapes, and the reference with its weights."""
    from testmodel import load_test_model

    ours = load_test_model()
    vit = dict(ours.spec.encoder_kwargs)
    window = vit.pop("window_size")
    return ours, _reference_model(ours.state_dict(), vit, window)


def test_trained_model_parity_and_objects(trained_pair):
    # Real masks from trained weights, filtered by the model's own scores (thresholds lowered
    # for this tiny model, whose predicted IoUs are modest).
    sample = synthetic_scene(np.random.default_rng(11))
    kwargs = {"points_per_side": 10, "pred_iou_thresh": 0.5, "stability_score_thresh": 0.7}
    ours, ref = _both(trained_pair, sample.image, **kwargs)
    assert len(ours) >= 4
    _assert_same_records(ours, ref)
    # The scene's objects are found: object 1 (always fully or mostly visible) well, the
    # others on average.
    best = [
        max(_iou(r["segmentation"], sample.labels == label) for r in ours)
        for label in np.unique(sample.labels)[1:]
    ]
    assert best[0] >= 0.7, best
    assert np.mean(best) >= 0.5, best


# -- embedding reuse, input types, progress ----------------------------------------------------


def test_cached_embedding_skips_the_encoder(disk_pair, image, monkeypatch):
    model = disk_pair[0]
    expected = SamAutomaticMaskGenerator(model, points_per_side=5, **LOOSE).generate(image)
    embedding, _ = encode_image(model, image)

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran although an embedding was given")

    monkeypatch.setattr(model.image_encoder, "forward", no_encoder)
    got = SamAutomaticMaskGenerator(model, points_per_side=5, **LOOSE).generate(
        image, embedding=embedding.numpy()
    )
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
    with pytest.raises(ValueError, match="embedding must have shape"):
        SamAutomaticMaskGenerator(model, points_per_side=5).generate(
            image, embedding=torch.zeros(1, 256, 8, 8)
        )


def test_any_dtype_and_channels(disk_pair, image):
    model = disk_pair[0]
    gray16 = (image[..., 0].astype(np.uint16) * 200 + 7).astype(np.uint16)
    generator = SamAutomaticMaskGenerator(model, points_per_side=3, **LOOSE)
    expected = generator.generate(default_to_uint8(gray16))
    assert expected
    for variant in (gray16, gray16[..., None], gray16.astype(np.float64)):
        got = generator.generate(variant)
        assert [r["area"] for r in got] == [r["area"] for r in expected]
    rgba = np.concatenate([image, np.full((*image.shape[:2], 1), 255, np.uint8)], -1)
    assert len(generator.generate(rgba)) == len(generator.generate(image))
    with pytest.raises(ValueError, match="HxW"):
        generator.generate(np.zeros((4, 5, 6, 7), np.uint8))


def test_custom_to_uint8_from_a_predictor(disk_pair, image):
    calls = []

    def window(img):
        calls.append(img.shape)
        return default_to_uint8(np.clip(img, 20, 200))

    predictor = SamPredictor(disk_pair[0], to_uint8=window)
    predictor.set_image(image)
    before = predictor.get_image_embedding().clone()
    generator = SamAutomaticMaskGenerator(predictor, points_per_side=2, crop_n_layers=1, **LOOSE)
    generator.generate(image)
    assert calls[-1] == image.shape  # applied once, to the whole image, not to each crop
    assert len(calls) == 2  # set_image above, then generate
    assert torch.equal(predictor.get_image_embedding(), before)  # its image is left alone


def test_progress_steps_and_cancel(disk_pair, image):
    generator = SamAutomaticMaskGenerator(
        disk_pair[0], points_per_side=2, points_per_batch=3, crop_n_layers=1, **LOOSE
    )
    steps = generator.iter_generate(image)
    seen = []
    with pytest.raises(StopIteration) as done:
        while True:
            seen.append(next(steps))
    # 5 crops: one encoder run each, 4 points = 2 batches each.
    assert [s.done for s in seen] == list(range(1, 16))
    assert {s.total for s in seen} == {15}
    assert [s.stage for s in seen[:3]] == ["encode", "decode", "decode"]
    assert all(isinstance(s, AmgProgress) for s in seen)
    assert isinstance(done.value.value, list)
    steps = generator.iter_generate(image)
    next(steps)
    steps.close()  # cancelling between steps raises nothing


def test_parameter_errors(disk_pair):
    model = disk_pair[0]
    with pytest.raises(ValueError, match="exactly one"):
        SamAutomaticMaskGenerator(model, points_per_side=None)
    with pytest.raises(ValueError, match="exactly one"):
        SamAutomaticMaskGenerator(model, point_grids=[U.build_point_grid(2)])
    with pytest.raises(ValueError, match="output_mode"):
        SamAutomaticMaskGenerator(model, output_mode="png")
    with pytest.raises(ValueError, match="needs 2"):
        SamAutomaticMaskGenerator(
            model, points_per_side=None, point_grids=[U.build_point_grid(2)], crop_n_layers=1
        )
    with pytest.raises(ValueError, match="no points"):
        SamAutomaticMaskGenerator(
            model, points_per_side=2, crop_n_layers=2, crop_n_points_downscale_factor=2
        )
    with pytest.raises(ValueError, match="points_per_batch"):
        SamAutomaticMaskGenerator(model, points_per_batch=0)


def test_explicit_point_grids(disk_pair, image):
    grid = U.build_point_grid(5)
    a = SamAutomaticMaskGenerator(disk_pair[0], points_per_side=5, **LOOSE).generate(image)
    b = SamAutomaticMaskGenerator(
        disk_pair[0], points_per_side=None, point_grids=[grid], **LOOSE
    ).generate(image)
    assert [r["area"] for r in a] == [r["area"] for r in b]


# -- the shared-embedding decoder ---------------------------------------------------------------


def test_generator_decodes_with_the_fast_twin_of_the_models_decoder(plain_pair):
    model = plain_pair[0]
    decoder = SamAutomaticMaskGenerator(model).decoder
    assert isinstance(decoder, FastMaskDecoder)
    assert decoder.transformer is model.mask_decoder.transformer  # shared, not copied
    fast = speed.optimize(model, "fp32")
    assert SamAutomaticMaskGenerator(fast).decoder is fast.mask_decoder
    # A subclass may compute something else (SAM 2's decoder): it runs as it is, never as a twin.
    other = copy.deepcopy(model)
    other.mask_decoder.__class__ = type("OtherDecoder", (MaskDecoder,), {})
    assert SamAutomaticMaskGenerator(other).decoder is other.mask_decoder
    with pytest.raises(TypeError, match="made from a MaskDecoder, got OtherDecoder"):
        FastMaskDecoder.from_exact(other.mask_decoder)


def _decode_shared(decoder, embedding, pe, sparse, dense, multimask=True):
    """The fast twin of ``decoder`` on prompts sharing ``embedding`` and the broadcast ``dense``
    (what the generator runs)."""
    twin = FastMaskDecoder.from_exact(decoder)
    assert twin.shares_image(embedding, dense)  # the shared-image path is the one tested
    return twin(embedding, pe, sparse, dense, multimask)


@pytest.mark.parametrize("multimask", [True, False])
def test_decode_shared_equals_mask_decoder(plain_pair, multimask):
    model = plain_pair[0]
    torch.manual_seed(3)
    grid = model.prompt_encoder.image_embedding_size
    embedding = torch.randn(1, 256, *grid)
    coords = torch.rand(5, 2, 2) * SIZE
    labels = torch.tensor([[1, 0], [1, 1], [0, 1], [1, -1], [1, 1]])
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        pe = model.prompt_encoder.get_dense_pe()
        expected = model.mask_decoder(embedding, pe, sparse, dense, multimask)
        got = _decode_shared(model.mask_decoder, embedding, pe, sparse, dense[:1], multimask)
        # An upscaling network of another layout takes the module's own path.
        other = copy.deepcopy(model.mask_decoder)
        other.output_upscaling.append(nn.Identity())
        generic = _decode_shared(other, embedding, pe, sparse, dense[:1], multimask)
    for a, b in ((got, expected), (generic, expected)):
        assert a[0].shape == b[0].shape and a[1].shape == b[1].shape
        assert (a[0] - b[0]).abs().max() <= 1e-4
        assert (a[1] - b[1]).abs().max() <= 1e-5
    twin = FastMaskDecoder.from_exact(model.mask_decoder)
    with pytest.raises(ValueError, match="shared"):
        twin(embedding.expand(2, -1, -1, -1), pe, sparse, dense[:1], True)


def test_decode_shared_official_decoder_size():
    # The decoder of every official model: 64 x 64 embedding, 256 x 256 logits.
    model = build_sam("vit_t")
    _perturb(model.mask_decoder, 4)
    torch.manual_seed(4)
    embedding = torch.randn(1, 256, 64, 64)
    coords = torch.rand(3, 1, 2) * 1024
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(
            points=(coords, torch.ones(3, 1, dtype=torch.int)), boxes=None, masks=None
        )
        pe = model.prompt_encoder.get_dense_pe()
        expected = model.mask_decoder(embedding, pe, sparse, dense, True)
        got = _decode_shared(model.mask_decoder, embedding, pe, sparse, dense[:1], True)
    assert (got[0] - expected[0]).abs().max() <= 1e-3
    assert (got[1] - expected[1]).abs().max() <= 1e-4


# -- labels for the widget ---------------------------------------------------------------------


def test_masks_to_labels_small_masks_on_top():
    big = np.zeros((6, 6), bool)
    big[:, :4] = True
    small = np.zeros((6, 6), bool)
    small[1:3, 1:3] = True
    records = [
        {"segmentation": small, "area": 4},
        {"segmentation": U.coco_encode_rle(U.mask_to_rle(big[None])[0]), "area": 24},
    ]
    labels = masks_to_labels(records, (6, 6))
    assert labels.dtype == np.int32
    assert labels[1, 1] == 2 and labels[5, 0] == 1 and labels[0, 5] == 0


def test_segment_everything_labels(disk_pair, image):
    predictor = SamPredictor(disk_pair[0])
    kwargs = {"points_per_side": 5, **LOOSE}
    records = SamAutomaticMaskGenerator(disk_pair[0], **kwargs).generate(image)
    labels = segment_everything(predictor, image, **kwargs)
    assert labels.shape == image.shape[:2] and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, masks_to_labels(records, image.shape[:2]))
    smallest = min(records, key=lambda r: r["area"])
    # The smallest mask is painted last: all of it keeps its label.
    assert len(np.unique(labels[smallest["segmentation"]])) == 1
    steps = iter_segment_everything(predictor, image, **kwargs)
    progress = [s for s in _drain(steps)]
    assert progress and progress[-1].done == progress[-1].total


def _drain(steps):
    while True:
        try:
            yield next(steps)
        except StopIteration:
            return

"""Prompts from masks: the dense mask prompt lines up with the predictor's frame; boxes; points."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_vit_spec
from napari_sam.models.build import build_sam
from napari_sam.prompts import (
    MASK_LOGIT,
    Prompts,
    mask_to_box,
    mask_to_mask_input,
    mask_to_points,
)
from napari_sam.registry import ModelSpec
from napari_sam.transforms import ResizeLongestSide, StretchResize


def _spec(size: int, preprocessing: str = "sam") -> ModelSpec:
    return tiny_vit_spec(
        "test_prompts_vit", image_size=size, preprocessing=preprocessing, test_fixture=True
    )


def _ellipse(shape, center, radii) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((yy - center[0]) / radii[0]) ** 2 + ((xx - center[1]) / radii[1]) ** 2 <= 1


def _round_trip(mask: np.ndarray, size: int, preprocessing: str = "sam") -> np.ndarray:
    """Dense prompt -> the model's own upscaling of low-res logits -> mask at the slice size."""
    model = build_sam(_spec(size, preprocessing))
    transform = StretchResize(size) if preprocessing == "medsam" else ResizeLongestSide(size)
    logits = mask_to_mask_input(mask, transform, mask.shape)
    up = model.postprocess_masks(
        torch.from_numpy(logits)[None], transform.input_size(mask.shape), mask.shape
    )
    return (up[0, 0] > model.mask_threshold).numpy()


def test_mask_input_shape_values_and_exact_blocks():
    # Slice = encoder frame (no resize): a mask on the 4-pixel grid maps to exact blocks.
    mask = np.zeros((64, 64), bool)
    mask[8:24, 12:40] = True
    logits = mask_to_mask_input(mask, ResizeLongestSide(64), (64, 64))
    assert logits.shape == (1, 16, 16) and logits.dtype == np.float32
    expected = np.full((16, 16), -MASK_LOGIT, np.float32)
    expected[2:6, 3:10] = MASK_LOGIT
    np.testing.assert_array_equal(logits[0], expected)
    assert MASK_LOGIT == pytest.approx(6.9068, abs=1e-4)
    # ...and the model's bilinear upscaling gives the same mask back, except the four convex
    # corner pixels (inside weight 0.625**2 < 0.5: inherent to bilinear upscaling).
    back = _round_trip(mask, 64)
    assert sorted(zip(*np.nonzero(back != mask))) == [(8, 12), (8, 39), (23, 12), (23, 39)]


@pytest.mark.parametrize(
    ("shape", "size", "preprocessing"),
    [((100, 150), 256, "sam"), ((150, 100), 256, "sam"), ((300, 220), 128, "medsam")],
)
def test_mask_input_round_trip_through_the_predictor_frame(shape, size, preprocessing):
    mask = _ellipse(shape, (0.45 * shape[0], 0.55 * shape[1]), (0.25 * shape[0], 0.3 * shape[1]))
    back = _round_trip(mask, size, preprocessing)
    iou = (back & mask).sum() / (back | mask).sum()
    assert iou > 0.93
    # Errors only at the boundary: within one low-res cell (4 encoder pixels) of it.
    cell = 4 * max(shape) / size
    from scipy import ndimage

    far_inside = ndimage.binary_erosion(mask, iterations=int(np.ceil(cell)) + 1)
    far_outside = ~ndimage.binary_dilation(mask, iterations=int(np.ceil(cell)) + 1)
    assert back[far_inside].all() and not back[far_outside].any()


def test_mask_input_padding_is_background():
    # A full slice fills only the resized part of the frame; the padding stays "outside".
    mask = np.ones((64, 128), bool)
    logits = mask_to_mask_input(mask, ResizeLongestSide(128), (64, 128))[0]
    assert logits.shape == (32, 32)
    assert (logits[:16] > 0).all() and (logits[16:] < 0).all()


def test_mask_input_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="does not match the slice size"):
        mask_to_mask_input(np.zeros((10, 12), bool), ResizeLongestSide(64), (12, 10))
    with pytest.raises(ValueError, match="2D"):
        mask_to_mask_input(np.zeros((2, 10, 12), bool), ResizeLongestSide(64), (10, 12))


def test_mask_to_box():
    mask = np.zeros((20, 30), bool)
    mask[3:8, 10:21] = True
    mask[15, 2] = True
    np.testing.assert_array_equal(mask_to_box(mask), [2, 3, 20, 15])
    assert mask_to_box(np.zeros((5, 5), bool)) is None


def test_mask_to_points_deepest_first_and_spread():
    mask = _ellipse((80, 120), (40, 30), (20, 20)) | _ellipse((80, 120), (40, 95), (12, 12))
    one = mask_to_points(mask, 1)
    np.testing.assert_array_equal(one, [[30, 40]])  # (x, y) of the large disc's centre
    two = mask_to_points(mask, 2)
    np.testing.assert_array_equal(two, [[30, 40], [95, 40]])  # then the small disc
    many = mask_to_points(mask, 6)
    assert len(many) == 6 and len({tuple(p) for p in many.tolist()}) == 6
    assert mask[many[:, 1].astype(int), many[:, 0].astype(int)].all()


def test_mask_to_points_edge_cases():
    assert mask_to_points(np.zeros((5, 5), bool), 3).shape == (0, 2)
    single = np.zeros((5, 5), bool)
    single[0, 4] = True  # touching the slice border: the border counts as outside
    np.testing.assert_array_equal(mask_to_points(single, 3), [[4, 0]])
    with pytest.raises(ValueError, match="at least 1"):
        mask_to_points(single, 0)


@pytest.mark.parametrize(
    ("shape", "transform"),
    [
        ((512, 512), ResizeLongestSide(1024)),
        ((100, 150), ResizeLongestSide(256)),
        ((2000, 700), ResizeLongestSide(1024)),
        ((300, 220), StretchResize(128)),
    ],
)
def test_mask_input_equals_resizing_the_mask_image(shape, transform):
    # The straightforward way: resize the mask like the image, pad, average 4 x 4 blocks.
    rng = np.random.default_rng(1)
    mask = _ellipse(shape, (0.4 * shape[0], 0.5 * shape[1]), (0.3 * shape[0], 0.25 * shape[1]))
    mask ^= rng.random(shape) < 0.05
    side = transform.target_length
    h, w = transform.input_size(shape)
    img = torch.from_numpy(mask.astype(np.float32))[None, None]
    img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    frac = F.avg_pool2d(F.pad(img, (0, side - w, 0, side - h)), 4)[0]
    expected = np.where(frac.numpy() >= 0.5, MASK_LOGIT, -MASK_LOGIT).astype(np.float32)
    np.testing.assert_array_equal(mask_to_mask_input(mask, transform, shape), expected)


@pytest.mark.parametrize(
    ("shape", "size"), [((512, 512), 1024), ((700, 333), 256), ((90, 200), 256), ((64, 64), 64)]
)
def test_mask_input_is_resize_pad_and_block_average(shape, size):
    """The banded per-axis operators give what the image path does to the mask: bilinear
    resize (antialiased when shrinking), zero padding, 4 x 4 block average, threshold 0.5."""
    rng = np.random.default_rng(sum(shape))
    transform = ResizeLongestSide(size)
    h, w = transform.input_size(shape)
    for mask in (
        rng.random(shape) < 0.4,
        _ellipse(shape, (0.4 * shape[0], 0.6 * shape[1]), (0.3 * shape[0], 0.2 * shape[1])),
    ):
        x = torch.from_numpy(mask.astype(np.float32))[None, None]
        if (h, w) != shape:
            x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)
        x = F.pad(x, (0, size - w, 0, size - h))
        fraction = F.avg_pool2d(x, 4)[0, 0].numpy()
        want = np.where(fraction >= 0.5, MASK_LOGIT, -MASK_LOGIT).astype(np.float32)
        got = mask_to_mask_input(mask, transform, shape)[0]
        # Float summation order may flip a block that is inside by exactly one half.
        differ = got != want
        assert differ.sum() <= 2
        assert np.all(np.abs(fraction[differ] - 0.5) < 1e-5)


@pytest.mark.parametrize(
    ("shape", "transform"),
    [((512, 512), ResizeLongestSide(1024)), ((333, 700), ResizeLongestSide(256))],
)
def test_mask_input_of_small_objects_anywhere(shape, transform):
    """Only the mask's bounding box is read and only the cells it reaches are computed: small
    objects in corners, on edges, a single pixel and a thin line give the full computation's
    answer everywhere, including the cells left at -MASK_LOGIT."""
    side = transform.target_length
    h, w = transform.input_size(shape)
    masks = []
    for r0, c0, r1, c1 in [
        (0, 0, 9, 14),
        (shape[0] - 7, shape[1] - 30, shape[0], shape[1]),
        (100, 3, 160, 40),
        (200, 250, 201, 251),
        (5, 0, 6, shape[1]),
    ]:
        mask = np.zeros(shape, bool)
        mask[r0:r1, c0:c1] = True
        masks.append(mask)
    for mask in masks:
        x = torch.from_numpy(mask.astype(np.float32))[None, None]
        x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)
        fraction = F.avg_pool2d(F.pad(x, (0, side - w, 0, side - h)), 4)[0, 0].numpy()
        want = np.where(fraction >= 0.5, MASK_LOGIT, -MASK_LOGIT).astype(np.float32)
        got = mask_to_mask_input(mask, transform, shape)[0]
        differ = got != want
        assert differ.sum() <= 1
        assert np.all(np.abs(fraction[differ] - 0.5) < 1e-5)
        assert (got > 0).any() == (want > 0).any()


# --------------------------------------------------------------------------------------------
# The Prompts type


def test_prompts_from_clicks_and_ambiguity():
    p = Prompts.from_clicks([[3, 4]], [[7.5, 1]], box=[0, 0, 9, 9])
    np.testing.assert_array_equal(p.points, [[3.0, 4.0], [7.5, 1.0]])
    np.testing.assert_array_equal(p.labels, [1, 0])
    np.testing.assert_array_equal(p.box, [0.0, 0.0, 9.0, 9.0])
    assert p.mask is None and not p.empty and not p.ambiguous
    assert Prompts().empty and not Prompts().ambiguous
    assert Prompts.from_clicks([[3, 4]]).ambiguous
    assert Prompts.from_clicks(negative=[[3, 4]]).ambiguous  # one click, whatever its sign
    assert not Prompts.from_clicks([[3, 4]], [[5, 5]]).ambiguous
    assert not Prompts.from_clicks(box=[1, 1, 5, 5]).ambiguous
    region = np.zeros((8, 8), bool)
    region[2:5, 2:5] = True
    assert not Prompts.from_clicks([[3, 4]], mask=region).ambiguous
    with pytest.raises(ValueError):
        Prompts.from_clicks(box=[1, 2, 3])


def test_prompts_key_and_extends():
    one = Prompts.from_clicks([[1.0, 2.0]])
    two = Prompts.from_clicks([[1.0, 2.0]], [[5.0, 5.0]])
    moved = Prompts.from_clicks([[1.5, 2.0]], [[5.0, 5.0]])
    boxed = Prompts(two.points, two.labels, box=np.array([0.0, 0, 9, 9]))
    assert one.key() == Prompts.from_clicks([[1, 2]]).key() != two.key()
    assert two.extends(one) and not one.extends(two) and not one.extends(one)
    assert not moved.extends(one) and not boxed.extends(one)


def test_prompts_predict_kwargs():
    transform = ResizeLongestSide(64)
    clicks = Prompts.from_clicks([[3, 4]], box=[1, 1, 9, 9]).predict_kwargs(transform, (32, 48))
    np.testing.assert_array_equal(clicks["point_coords"], [[3.0, 4.0]])
    np.testing.assert_array_equal(clicks["point_labels"], [1])
    np.testing.assert_array_equal(clicks["box"], [1.0, 1.0, 9.0, 9.0])
    assert clicks["mask_input"] is None
    region = _ellipse((32, 48), (16, 20), (6, 9))
    drawn = Prompts.from_clicks(mask=region).predict_kwargs(transform, (32, 48))
    assert drawn["point_coords"] is None and drawn["point_labels"] is None and drawn["box"] is None
    np.testing.assert_array_equal(
        drawn["mask_input"], mask_to_mask_input(region, transform, (32, 48))
    )

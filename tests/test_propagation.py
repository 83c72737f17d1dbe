"""Propagation control logic with a fake predictor; keep/overwrite writing.

The fake predictor answers each prompt set with the true object that its dense prompt overlaps
most on the current slice (a perfect SAM), or echoes the prompt back. The slice size equals the
encoder frame (64 px), so the dense prompt's 4-pixel cells map back without resizing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_sam.prompts import mask_to_box
from napari_sam.transforms import ResizeLongestSide
from napari_sam.volume.propagation import Step, merge_masks, propagate, write_masks

Z, H, W = 20, 64, 64


def disc(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def square(y0: int, x0: int, side: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def ball(label: int, cy: float, cx: float, z0: int, z1: int, r: float = 10.0) -> np.ndarray:
    """Labels volume with one object: a disc of radius ``r`` on slices z0..z1 (inclusive)."""
    truth = np.zeros((Z, H, W), np.uint8)
    for z in range(z0, z1 + 1):
        truth[z][disc(cy, cx, r)] = label
    return truth


class Source:
    """Embedding source whose 'embedding' is the slice index; records every fetch."""

    def __init__(self, n: int = Z) -> None:
        self.n = n
        self.slice_shape = (H, W)
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return self.n

    def get(self, index: int):
        self.fetched.append(index)
        return torch.full((1, 256, 4, 4), float(index)), (H, W), (H, W)


class FakePredictor:
    """Stands in for SamPredictor (same attributes and calls used by propagate)."""

    def __init__(self, truth: np.ndarray | None = None, pred_iou=lambda index: 0.95) -> None:
        self.transform = ResizeLongestSide(W)
        self.device = torch.device("cpu")
        self.truth = truth
        self.pred_iou = pred_iou
        self.calls: list[dict] = []

    def set_image_embedding(self, embedding, original_size, input_size=None):
        self.index = int(embedding.flatten()[0])
        assert tuple(original_size) == (H, W)

    def predict_torch(self, coords, labels, boxes=None, mask_input=None, multimask_output=True):
        assert mask_input is not None and mask_input.shape[1:] == (1, 16, 16)
        batch = mask_input.shape[0]
        self.calls.append(
            dict(index=self.index, batch=batch, boxes=boxes, coords=coords, labels=labels)
        )
        regions = (F.interpolate(mask_input, scale_factor=4, mode="nearest") > 0)[:, 0].numpy()
        out = []
        for region in regions:
            if self.truth is None:
                out.append(region)
                continue
            ids, counts = np.unique(self.truth[self.index][region], return_counts=True)
            counts[ids == 0] = 0
            hit = ids[np.argmax(counts)] if counts.any() else 0
            out.append(self.truth[self.index] == hit if hit else np.zeros((H, W), bool))
        masks = torch.from_numpy(np.stack(out))[:, None]
        iou = torch.full((batch, 1), float(self.pred_iou(self.index)))
        if multimask_output:
            # Three candidates; the true one in the middle with the best score.
            empty = torch.zeros_like(masks)
            masks = torch.cat([empty, masks, empty], dim=1)
            iou = torch.cat([iou - 0.5, iou, iou - 0.4], dim=1)
        return masks, iou, torch.zeros(batch, masks.shape[1], 16, 16)


def run(truth, seeds, predictor=None, source=None, **options):
    source = source or Source()
    predictor = predictor or FakePredictor(truth)
    labels = np.zeros((Z, H, W), np.uint16)
    for label, per in seeds.items():
        for z, m in per.items():
            labels[z][m] = label
    steps = []
    for step in propagate(source, predictor, seeds, **options):
        write_masks(labels, step, axis=0)
        steps.append(step)
    return steps, labels, predictor, source


def test_both_directions_until_the_object_ends():
    truth = ball(1, 30, 30, 4, 15)
    steps, labels, _pred, source = run(truth, {1: {10: truth[10] == 1}}, min_iou_prev=0.0)
    order = [s.index for s in steps]
    assert order[:6] == [11, 9, 12, 8, 13, 7]  # outward on both sides, alternating
    assert sorted(order) == [*range(3, 10), *range(11, 17)]
    np.testing.assert_array_equal(labels, truth)
    stops = {s.index: s.stopped for s in steps if s.stopped}
    assert stops == {3: {1: "empty"}, 16: {1: "empty"}}
    assert steps[-1].done == steps[-1].total == len(steps)
    assert all(s.done <= s.total for s in steps)
    assert sorted(source.fetched) == sorted(order)  # each slice's embedding fetched once
    assert all(s.scores == {1: pytest.approx(0.95)} for s in steps if s.masks)


@pytest.mark.parametrize(
    ("a", "b", "from_a", "from_b"),
    [(4, 11, [5, 6, 7], [8, 9, 10]), (4, 9, [5, 6], [7, 8]), (4, 8, [5, 6], [7]), (4, 6, [5], [])],
)
def test_gap_filled_from_both_sides_up_to_the_middle(a, b, from_a, from_b):
    # Echo predictor: each slice receives exactly the mask of the seed it was walked from.
    mask_a, mask_b = square(16, 16, 24), square(20, 20, 24)
    steps, _labels, _, _ = run(None, {2: {a: mask_a, b: mask_b}}, slice_range=(a, b + 1))
    got = {s.index: s.masks[2] for s in steps}
    assert sorted(got) == sorted(from_a + from_b)
    for z in from_a:
        np.testing.assert_array_equal(got[z], mask_a)
    for z in from_b:
        np.testing.assert_array_equal(got[z], mask_b)


def test_stop_when_the_mask_changes_too_much():
    truth = ball(1, 32, 32, 0, 19, r=8)
    truth[14][disc(32, 32, 24)] = 1  # suddenly three times wider: a leak, not the object
    steps, labels, _, _ = run(truth, {1: {10: truth[10] == 1}})
    assert {s.index: s.stopped for s in steps if s.stopped} == {14: {1: "changed too much"}}
    assert labels[11:14].any(axis=(1, 2)).all() and not labels[14:].any()
    assert labels[:10].any(axis=(1, 2)).all()  # the other direction runs to the end


def test_stop_on_low_predicted_iou():
    truth = ball(1, 32, 32, 0, 19)
    predictor = FakePredictor(truth, pred_iou=lambda z: 0.3 if z == 7 else 0.9)
    steps, labels, _, _ = run(truth, {1: {10: truth[10] == 1}}, predictor=predictor)
    assert {s.index: s.stopped for s in steps if s.stopped} == {7: {1: "low predicted IoU"}}
    assert not labels[:8].any() and labels[8:].any(axis=(1, 2)).all()
    # The threshold is an option.
    steps, labels, _, _ = run(
        truth, {1: {10: truth[10] == 1}}, predictor=predictor, min_pred_iou=0.2
    )
    np.testing.assert_array_equal(labels, truth)


def test_stop_below_min_area():
    truth = ball(1, 32, 32, 0, 19)
    truth[13] = 0
    truth[13][disc(32, 32, 3)] = 1  # 29 pixels
    steps, labels, _, _ = run(truth, {1: {10: truth[10] == 1}}, min_area=30, min_iou_prev=0)
    assert {s.index: s.stopped for s in steps if s.stopped} == {13: {1: "empty"}}
    assert not labels[13:].any()


def test_objects_share_each_slice_embedding_and_one_batched_decoder_call():
    truth = ball(1, 16, 16, 2, 17) + ball(2, 16, 48, 2, 17) + ball(3, 48, 32, 6, 14)
    seeds = {k: {10: truth[10] == k} for k in (1, 2, 3)}
    steps, labels, pred, source = run(truth, seeds, min_iou_prev=0)
    np.testing.assert_array_equal(labels, truth)
    assert len(pred.calls) == len(steps) == len(source.fetched) == len(set(source.fetched))
    batch = {c["index"]: c["batch"] for c in pred.calls}
    assert all(batch[z] == 3 for z in range(6, 15) if z != 10)
    # Object 3 stops at 5 and 15 (empty); objects 1 and 2 go on together.
    assert batch[5] == batch[15] == 3 and all(batch[z] == 2 for z in (2, 3, 4, 16, 17))


def test_objects_with_different_seed_slices_batch_where_they_meet():
    truth = ball(1, 16, 16, 0, 19) + ball(2, 48, 48, 0, 19)
    seeds = {1: {10: truth[10] == 1}, 2: {12: truth[12] == 2}}
    _steps, labels, pred, _ = run(truth, seeds, directions="forward")
    assert [(c["index"], c["batch"]) for c in pred.calls] == [
        (11, 1),
        (12, 1),
        *[(z, 2) for z in range(13, 20)],
    ]
    assert not labels[:10].any()


def test_slice_range_and_directions():
    truth = ball(1, 32, 32, 0, 19)
    seeds = {1: {10: truth[10] == 1}}
    steps, _, _, _ = run(truth, seeds, slice_range=(6, 15))
    assert sorted(s.index for s in steps) == [6, 7, 8, 9, 11, 12, 13, 14]
    steps, _, _, _ = run(truth, seeds, directions="backward")
    assert sorted(s.index for s in steps) == list(range(10))
    # A seed just outside the range still starts a walk into it; one farther away does not.
    steps, _, _, _ = run(truth, seeds, slice_range=(11, 14))
    assert sorted(s.index for s in steps) == [11, 12, 13]
    assert run(truth, seeds, slice_range=(12, 14))[0] == []


def test_empty_seed_marks_where_the_object_is_absent():
    truth = ball(1, 32, 32, 0, 19)
    seeds = {1: {10: truth[10] == 1, 6: np.zeros((H, W), bool)}}
    steps, labels, _, _ = run(truth, seeds)
    assert sorted(s.index for s in steps) == [7, 8, 9, *range(11, 20)]
    assert not labels[:7].any()


def test_multimask_keeps_the_best_candidate():
    truth = ball(1, 32, 32, 0, 19)
    _steps, labels, _, _ = run(truth, {1: {10: truth[10] == 1}}, multimask=True)
    np.testing.assert_array_equal(labels, truth)


def test_box_and_points_prompts_are_batched_and_padded():
    truth = ball(1, 20, 20, 0, 19) + ball(2, 44, 44, 0, 19, r=6)
    tiny = np.zeros((H, W), bool)
    tiny[40:42, 40:41] = True  # two pixels: room for two points only
    seeds = {1: {10: truth[10] == 1}, 2: {10: tiny}}
    predictor = FakePredictor(truth)
    gen = propagate(Source(), predictor, seeds, use_points=True, num_points=3)
    next(gen)
    gen.close()
    call = predictor.calls[0]
    np.testing.assert_array_equal(
        call["boxes"].numpy(), np.stack([mask_to_box(truth[10] == 1), mask_to_box(tiny)])
    )
    assert call["coords"].shape == (2, 3, 2)
    np.testing.assert_array_equal(call["labels"].numpy(), [[1, 1, 1], [1, 1, -1]])
    assert truth[10][20, 20] == 1 and call["coords"][0, 0].tolist() == [20.0, 20.0]


def test_closing_the_generator_leaves_only_whole_slices():
    truth = ball(1, 32, 32, 0, 19)
    labels = np.zeros((Z, H, W), np.uint16)
    labels[10] = truth[10]
    gen = propagate(Source(), FakePredictor(truth), {1: {10: truth[10] == 1}})
    for step in gen:
        write_masks(labels, step, axis=0)
        if step.done == 4:
            gen.close()
    written = [z for z in range(Z) if labels[z].any()]
    assert written == [8, 9, 10, 11, 12]
    for z in written:
        np.testing.assert_array_equal(labels[z], truth[z])
    with pytest.raises(StopIteration):
        next(gen)


def test_plain_function_source_needs_num_slices():
    truth = ball(1, 32, 32, 0, 19)
    src = Source()
    seeds = {1: {10: truth[10] == 1}}
    with pytest.raises(ValueError, match="num_slices"):
        list(propagate(src.get, FakePredictor(truth), seeds))
    steps = list(propagate(src.get, FakePredictor(truth), seeds, num_slices=Z))
    assert len(steps) == 19


@pytest.mark.parametrize(
    ("seeds", "options", "message"),
    [
        ({}, {}, "no seeds"),
        ({0: {3: np.ones((H, W), bool)}}, {}, "positive"),
        ({1: {}}, {}, "no seed slice"),
        ({1: {25: np.ones((H, W), bool)}}, {}, "outside the volume"),
        ({1: {3: np.ones((H, 3), bool)}}, {}, "expected the slice shape"),
        ({1: {3: np.ones((H, W), bool)}}, {"slice_range": (5, 5)}, "selects no slice"),
        ({1: {3: np.ones((H, W), bool)}}, {"directions": "up"}, "directions"),
    ],
)
def test_bad_arguments_are_clear_errors(seeds, options, message):
    with pytest.raises(ValueError, match=message):
        list(propagate(Source(), FakePredictor(), seeds, **options))
    with pytest.raises(TypeError, match="EmbeddingCache"):
        list(propagate(42, FakePredictor(), {1: {3: np.ones((H, W), bool)}}))


def test_merge_keep_overwrite_and_replace():
    current = np.zeros((4, 6), np.uint8)
    current[:, :2] = 5  # another object
    current[3, 5] = 1  # this object's old pixel elsewhere
    new = np.zeros((4, 6), bool)
    new[1:3, 1:4] = True

    kept = merge_masks(current, {1: new}, mode="keep")
    expected = current.copy()
    expected[3, 5] = 0
    expected[1:3, 2:4] = 1
    np.testing.assert_array_equal(kept, expected)

    over = merge_masks(current, {1: new}, mode="overwrite")
    expected[1:3, 1] = 1
    np.testing.assert_array_equal(over, expected)

    added = merge_masks(current, {1: new}, mode="keep", replace=False)
    assert added[3, 5] == 1
    np.testing.assert_array_equal(current[3], [5, 5, 0, 0, 0, 1])  # input untouched

    # Two new masks overlap: the lower id wins, in both modes.
    other = np.zeros((4, 6), bool)
    other[2:4, 3:6] = True
    for mode in ("keep", "overwrite"):
        both = merge_masks(current, {3: other, 1: new}, mode=mode)
        assert both[2, 3] == 1 and both[3, 3] == 3


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_merge_equals_the_pixel_rule_on_random_labels(dtype):
    """Pixel by pixel: cleared if replaced, then the lowest new label whose mask covers the
    pixel, if it may write there (keep: background or its own label), else unchanged."""
    rng = np.random.default_rng(int(np.dtype(dtype).itemsize))
    top = int(min(np.iinfo(dtype).max, 60000))
    for _ in range(6):
        ids = sorted({1, int(rng.integers(2, top)), top})
        current = rng.choice([0, *ids], size=(9, 11)).astype(dtype)
        masks = {i: rng.random((9, 11)) < 0.4 for i in rng.permutation(ids)[:2].tolist()}
        for mode in ("keep", "overwrite"):
            for replace in (True, False):
                got = merge_masks(current, masks, mode=mode, replace=replace)
                want = current.copy()
                for (y, x), value in np.ndenumerate(current):
                    if replace and value in masks:
                        value = 0
                    for label in sorted(masks):
                        if masks[label][y, x]:
                            if mode == "overwrite" or value in (0, label):
                                value = label
                            break
                    want[y, x] = value
                assert got.dtype == current.dtype
                np.testing.assert_array_equal(got, want)


def test_write_masks_counts_changes_along_any_axis():
    labels = np.zeros((3, 4, 5), np.int32)
    mask = np.zeros((3, 5), bool)  # a slice along axis 1
    mask[0, :] = True
    assert write_masks(labels, {7: mask}, axis=1, index=2) == 5
    assert labels[0, 2].tolist() == [7] * 5 and labels.sum() == 35
    assert write_masks(labels, {7: mask}, axis=1, index=2) == 0  # same again: nothing changes
    step = Step(index=1, masks={2: np.ones((4, 5), bool)})
    assert write_masks(labels, step, axis=0) == 20
    assert write_masks(labels, Step(index=2, masks={300: np.ones((4, 5), bool)}), axis=0) == 20
    with pytest.raises(ValueError, match="does not fit"):
        write_masks(np.zeros((2, 4, 5), np.uint8), {300: np.ones((4, 5), bool)}, index=0)
    with pytest.raises(ValueError, match="index is required"):
        write_masks(labels, {1: mask})
    with pytest.raises(ValueError, match="mode"):
        write_masks(labels, {1: mask}, axis=1, index=0, mode="merge")

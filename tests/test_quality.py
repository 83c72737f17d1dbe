"""Segmentation quality of the trained test fixture, end to end through ``SamPredictor``.

Held-out synthetic cases (seeds never used in training, which used
``tests/data/sam_test_tiny.json["train"]["seed"]``): one click, a box, a negative click on a
touching neighbour, and propagation through ellipsoid volumes with the previous slice's mask as
the dense prompt. These are the numbers the plugin's features rest on; they are measured with the
same code path as the real models (transforms, preprocessing, prompt encoder, mask decoder,
postprocessing), only the image encoder is small.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.predictor import SamPredictor
from napari_sam.training.evaluate import (
    CORE_AREA,
    click_and_box_ious,
    negative_click_gains,
    propagation_ious,
    scene_cases,
)
from testmodel import load_test_model, model_info

SEED = 4242  # held out: training used another seed (asserted below)


@pytest.fixture(scope="module")
def predictor():
    # One torch thread: the tiny encoder gains nothing from two, and on a shared (CI) machine
    # oversubscribed threads make it many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield SamPredictor(load_test_model())
    torch.set_num_threads(before)


def test_fixture_is_marked_as_a_test_model():
    model = load_test_model()
    assert model.spec.test_fixture and "test" in model.spec.name
    assert model.image_size == 256
    assert model_info()["train"]["seed"] != SEED


@pytest.fixture(scope="module")
def scene_results(predictor):
    cases = list(scene_cases(SEED, 100))  # issue #4 asks for >= 50; 100 halve the noise
    return click_and_box_ious(predictor, cases)


def test_one_click_segments_the_object(scene_results):
    clicks, _ = scene_results
    assert len(clicks) == 100
    print(f"one click: mean IoU {np.mean(clicks):.3f}, median {np.median(clicks):.3f}")
    # The best-scored of the three masks, as the widget shows it (issue #4's bar).
    assert np.mean(clicks) >= 0.85


def test_box_segments_the_object(scene_results):
    _, boxes = scene_results
    print(f"box: mean IoU {np.mean(boxes):.3f}, min {np.min(boxes):.3f}")
    assert np.mean(boxes) >= 0.9


def test_negative_click_on_a_touching_neighbour_helps(predictor):
    pairs = negative_click_gains(predictor, SEED + 1, 16)
    assert len(pairs) >= 10  # enough ambiguous cases were found
    before = np.array([a for a, _ in pairs])
    after = np.array([b for _, b in pairs])
    print(
        f"negative click: {len(pairs)} cases, IoU {before.mean():.3f} -> {after.mean():.3f}, "
        f"improved in {np.mean(after > before):.0%}"
    )
    assert (after - before).mean() > 0
    assert np.mean(after > before) > 0.5


@pytest.mark.parametrize("use_box", [True, False], ids=["mask+box", "mask-only"])
def test_previous_slice_mask_propagates_through_ellipsoids(predictor, use_box):
    volumes = propagation_ious(predictor, SEED + 2, 2, use_box=use_box)
    assert all(len(v) >= 8 for v in volumes)  # the walk went through the object
    slices = np.concatenate(volumes)
    core = slices[slices[:, 1] >= CORE_AREA, 0]
    caps = slices[slices[:, 1] < CORE_AREA, 0]
    print(
        f"propagation ({'mask+box' if use_box else 'mask only'}): {len(slices)} slices, "
        f"mean IoU {slices[:, 0].mean():.3f}; {len(core)} core slices: mean {core.mean():.3f}, "
        f"min {core.min():.3f}; end caps: {np.round(caps, 2)}"
    )
    # Slice after slice the mask stays on the object: IoU >= 0.9 on average over the slices
    # that hold the object's body, none of them below 0.85. The small caps at the ends (true
    # area under a quarter of the largest cross-section, a few pixels across) are where a
    # one-pixel outline error is already a large IoU error: they only enter the overall mean.
    assert core.mean() >= 0.9 and core.min() >= 0.85
    assert slices[:, 0].mean() >= 0.85

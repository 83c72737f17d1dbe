"""Sam2ImagePredictor against Meta's SAM2ImagePredictor (random weights, odd-sized images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.models.sam2.build import build_sam2
from napari_sam.predictor import default_to_uint8
from napari_sam.registry import get_spec
from napari_sam.sam2_predictor import Sam2ImagePredictor, fill_small_regions, preprocess

sam2_reference = pytest.importorskip("sam2_reference")

IMAGE_SIZE = 256


def _image(h: int = 217, w: int = 301, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    blob = np.exp(-(((yy - 0.4 * h) / 40.0) ** 2 + ((xx - 0.6 * w) / 55.0) ** 2))
    rgb = 180 * blob[..., None] + rng.normal(40, 12, (h, w, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def predictors():
    torch.set_num_threads(1)
    model = sam2_reference.build_reference_sam2(IMAGE_SIZE, seed=0)
    image = _image()
    ref = sam2_reference.image_predictor(model)
    ref.set_image(image)
    ours = Sam2ImagePredictor(model)
    ours.set_image(image)
    return ref, ours, image


PROMPTS = {
    "one click, three masks": dict(
        point_coords=np.array([[180.0, 87.0]]), point_labels=np.array([1]), multimask_output=True
    ),
    "two clicks": dict(
        point_coords=np.array([[180.0, 87.0], [40.5, 200.25]]),
        point_labels=np.array([1, 0]),
        multimask_output=False,
    ),
    "box": dict(box=np.array([120.0, 40.0, 260.0, 150.0]), multimask_output=False),
    "box and click": dict(
        box=np.array([120.0, 40.0, 260.0, 150.0]),
        point_coords=np.array([[180.0, 87.0]]),
        point_labels=np.array([1]),
        multimask_output=True,
    ),
    "normalised click": dict(
        point_coords=np.array([[0.6, 0.4]]),
        point_labels=np.array([1]),
        normalize_coords=False,
    ),
}


def _agree(ours, ref) -> None:
    (m1, iou1, low1), (m2, iou2, low2) = ours, ref
    assert m1.shape == m2.shape
    np.testing.assert_allclose(iou1, iou2, atol=1e-3)
    np.testing.assert_allclose(low1, low2, atol=1e-3)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_masks_logits_and_scores_match_reference(predictors, name):
    ref, ours, image = predictors
    kwargs = PROMPTS[name]
    got = ours.predict(**kwargs, return_logits=True)
    want = ref.predict(**kwargs, return_logits=True)
    _agree(got, want)
    assert got[0].shape[1:] == image.shape[:2]
    np.testing.assert_allclose(got[0], want[0], atol=1e-3)
    masks, _, _ = ours.predict(**kwargs)
    ref_masks, _, _ = ref.predict(**kwargs)
    assert masks.dtype == bool
    assert (masks == (ref_masks > 0)).mean() >= 0.999
    # Not a trivial agreement: the masks are neither empty nor full.
    assert 0.01 < masks.mean() < 0.99


def test_mask_input_round_trip(predictors):
    ref, ours, _ = predictors
    click = dict(point_coords=np.array([[180.0, 87.0]]), point_labels=np.array([1]))
    _, scores, low = ours.predict(**click)
    previous = low[np.argmax(scores)][None]
    got = ours.predict(**click, mask_input=previous, multimask_output=False, return_logits=True)
    want = ref.predict(**click, mask_input=previous, multimask_output=False, return_logits=True)
    _agree(got, want)
    np.testing.assert_allclose(got[0], want[0], atol=1e-3)


def test_embedding_matches_reference(predictors):
    ref, ours, _ = predictors
    emb = ours.get_image_embedding()
    assert emb.shape == (1, 256, IMAGE_SIZE // 16, IMAGE_SIZE // 16)
    torch.testing.assert_close(emb, ref.get_image_embedding(), atol=1e-5, rtol=0)
    for a, b in zip(ours._features["high_res_feats"], ref._features["high_res_feats"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_preprocessing_is_sam2s_transform():
    from sam2.utils.transforms import SAM2Transforms

    image = _image(37, 91, seed=3)
    want = SAM2Transforms(resolution=64, mask_threshold=0.0)(image)[None]
    torch.testing.assert_close(preprocess(image, 64), want, atol=1e-6, rtol=0)


def test_any_dtype_goes_through_to_uint8(predictors):
    ref, _, _ = predictors
    rng = np.random.default_rng(1)
    ct = rng.normal(300, 400, (61, 47)).astype(np.int16)
    ours = Sam2ImagePredictor(ref.model)
    ours.set_image(ct)
    ref_local = sam2_reference.image_predictor(ref.model)
    ref_local.set_image(default_to_uint8(ct))
    click = dict(point_coords=np.array([[20.0, 30.0]]), point_labels=np.array([1]))
    _agree(ours.predict(**click), ref_local.predict(**click))
    assert ours.original_size == (61, 47)


def test_errors_say_what_to_do(predictors):
    ref, ours, _ = predictors
    fresh = Sam2ImagePredictor(ref.model)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="outside the image"):
        ours.predict(point_coords=np.array([[400.0, 10.0]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="no prompt"):
        ours.predict()
    with pytest.raises(ValueError, match=r"mask_input must have shape \(1, 64, 64\)"):
        ours.predict(box=np.array([1, 1, 20, 20]), mask_input=np.zeros((1, 256, 256)))
    ours.reset_predictor()
    assert not ours.is_image_set
    with pytest.raises(RuntimeError):
        ours.get_image_embedding()


def test_fill_small_regions():
    logits = torch.full((1, 1, 12, 12), -5.0)
    logits[0, 0, 2:9, 2:9] = 5.0  # a 7x7 square ...
    logits[0, 0, 4:6, 4:6] = -1.0  # ... with a 4-pixel hole
    logits[0, 0, 10, 10] = 3.0  # and a one-pixel speck
    out = fill_small_regions(logits, max_hole_area=4, max_sprinkle_area=2)
    assert (out[0, 0, 4:6, 4:6] == 10.0).all()
    assert out[0, 0, 10, 10] == -10.0
    assert (out[0, 0, 2:9, 2:9] > 0).all()
    # The background (one large component) and the square stay as they were.
    untouched = torch.ones_like(logits, dtype=torch.bool)
    untouched[0, 0, 4:6, 4:6] = False
    untouched[0, 0, 10, 10] = False
    assert torch.equal(out[untouched], logits[untouched])
    # A hole larger than the limit is kept; both steps off returns the input itself.
    assert (fill_small_regions(logits, max_hole_area=3)[0, 0, 4:6, 4:6] == -1.0).all()
    assert fill_small_regions(logits) is logits


def test_project_sam2_predicts_like_the_reference(predictors):
    """The package's own SAM 2.1 with the reference's weights, through Sam2ImagePredictor."""
    ref, _, image = predictors
    model = build_sam2(get_spec("sam2.1_hiera_tiny").replace(image_size=IMAGE_SIZE))
    model.load_state_dict(ref.model.state_dict(), strict=True)
    ours = Sam2ImagePredictor(model)
    ours.set_image(image)
    for name in ("one click, three masks", "box and click"):
        kwargs = PROMPTS[name]
        got = ours.predict(**kwargs, return_logits=True)
        want = ref.predict(**kwargs, return_logits=True)
        _agree(got, want)
        np.testing.assert_allclose(got[0], want[0], atol=1e-3)
        assert ((got[0] > 0) == (want[0] > 0)).mean() >= 0.999

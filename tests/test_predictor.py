"""SamPredictor: parity with segment_anything / MobileSAM through the public loader, bad input.

Reference models get random weights (every parameter perturbed, so zero-initialised positional
and relative-position tables are exercised too), are saved as official-style ``.pth`` files and
loaded back through :func:`napari_sam.load_model`, which must detect their type from the tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_sam
from conftest import small_vit_spec
from napari_sam import SamPredictor

SMALL = small_vit_spec("test_small_vit", test_fixture=True)


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image with a few bright ellipses: masks are not pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float64)
    img += 40 * (xx / w)[..., None] + 30 * (yy / h)[..., None]
    for _ in range(4):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.05, 0.2) * h, rng.uniform(0.05, 0.2) * w
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        img[inside] += rng.uniform(80, 180, size=3)
    img += rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _prompt_cases(h: int, w: int):
    p = np.array([[0.4 * w, 0.5 * h]])
    n = np.array([[0.7 * w, 0.3 * h]])
    box = np.array([0.2 * w, 0.25 * h, 0.75 * w, 0.8 * h])
    return [
        ("point", {"point_coords": p, "point_labels": np.array([1])}, True),
        (
            "point+negative",
            {"point_coords": np.vstack([p, n]), "point_labels": np.array([1, 0])},
            True,
        ),
        ("box", {"box": box}, False),
        ("box+points", {"box": box, "point_coords": p, "point_labels": np.array([1])}, False),
        ("point single", {"point_coords": p, "point_labels": np.array([1])}, False),
    ]


def _compare(ours: SamPredictor, ref, image: np.ndarray) -> dict[str, float]:
    ours.set_image(image)
    ref.set_image(image)
    figures = {
        "embedding": float((ours.features - ref.features).abs().max()),
        "logits": 0.0,
        "iou": 0.0,
        "mask_disagreement": 0.0,
    }
    h, w = image.shape[:2]
    for _name, kwargs, multi in _prompt_cases(h, w):
        results = [m.predict(multimask_output=multi, **kwargs) for m in (ours, ref)]
        # mask_input from a previous call, fed back with a refining click
        results_mask = []
        for m, (_, scores, logits) in zip((ours, ref), results, strict=True):
            best = logits[int(np.argmax(scores))][None]
            results_mask.append(
                m.predict(
                    point_coords=np.array([[0.45 * w, 0.55 * h]]),
                    point_labels=np.array([1]),
                    mask_input=best,
                    multimask_output=False,
                )
            )
        for (m1, s1, l1), (m2, s2, l2) in (results, results_mask):
            assert m1.shape == m2.shape and m1.dtype == np.bool_
            figures["logits"] = max(figures["logits"], float(np.abs(l1 - l2).max()))
            figures["iou"] = max(figures["iou"], float(np.abs(s1 - s2).max()))
            figures["mask_disagreement"] = max(
                figures["mask_disagreement"], float((m1 != m2).mean())
            )
    return figures


def _assert_parity(figures: dict[str, float]) -> None:
    print("parity figures:", figures)
    assert figures["embedding"] <= 1e-4
    assert figures["logits"] <= 1e-3
    assert figures["iou"] <= 1e-4
    assert figures["mask_disagreement"] <= 1e-4  # identical on >= 99.99 % of pixels


def _reference_small(reference, seed: int = 0):
    torch.manual_seed(seed)
    return _perturb(reference.build_reference_sam(SMALL.image_size, SMALL.encoder_kwargs), seed)


@pytest.fixture(scope="module")
def reference():
    import reference as ref

    return ref


def test_small_config_parity_through_public_loader(reference, tmp_path):
    ref_model = _reference_small(reference, seed=1)
    path = tmp_path / "small.pth"
    torch.save(ref_model.state_dict(), path)
    ours = napari_sam.load_model(path, device="cpu")
    assert ours.spec.image_size == SMALL.image_size
    figures = _compare(
        SamPredictor(ours), reference.segment_anything.SamPredictor(ref_model), _image(200, 310)
    )
    _assert_parity(figures)


@pytest.mark.slow
def test_vit_b_parity_full_size(reference, tmp_path):
    torch.manual_seed(0)
    ref_model = _perturb(reference.segment_anything.sam_model_registry["vit_b"](), seed=0)
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(ref_model.state_dict(), path)
    ours = napari_sam.sam_model_registry["vit_b"](checkpoint=path)
    assert napari_sam.load_model(path, device="cpu").spec.name == "vit_b"
    figures = _compare(
        SamPredictor(ours), reference.segment_anything.SamPredictor(ref_model), _image(480, 640)
    )
    _assert_parity(figures)


@pytest.mark.slow
def test_vit_t_parity_full_size(reference, tmp_path):
    ms = reference.mobile_sam
    torch.manual_seed(0)
    ref_model = ms.sam_model_registry["vit_t"]()
    with torch.no_grad():  # BatchNorm running statistics are buffers: make them non-trivial too
        for name, buf in ref_model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    ref_model = _perturb(ref_model, seed=3)
    state = ref_model.state_dict()
    # the official file carries an unused classifier head; ours must tolerate exactly that
    state["image_encoder.norm_head.weight"] = torch.ones(320)
    state["image_encoder.norm_head.bias"] = torch.zeros(320)
    state["image_encoder.head.weight"] = torch.zeros(1000, 320)
    state["image_encoder.head.bias"] = torch.zeros(1000)
    path = tmp_path / "mobile_sam_random.pt"
    torch.save(state, path)
    ours = napari_sam.load_model(path, device="cpu")
    assert ours.spec.name == "vit_t"
    figures = _compare(SamPredictor(ours), ms.SamPredictor(ref_model), _image(600, 420, seed=2))
    _assert_parity(figures)


# -- bad input ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_predictor():
    torch.manual_seed(0)
    model = napari_sam.build_sam(SMALL)
    predictor = SamPredictor(model)
    predictor.set_image(_image(120, 160))
    return predictor


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((4, 5, 6, 3), np.uint8), "HxW"),
        (np.zeros((10, 10, 2), np.uint8), "HxW"),
        (np.zeros((0, 10), np.uint8), "empty"),
        (np.full((10, 10), np.nan, np.float32), "NaN"),
        (np.zeros((10, 10), np.complex64), "dtype"),
    ],
)
def test_bad_images_are_refused_with_a_clear_message(image, message):
    predictor = SamPredictor(napari_sam.build_sam(SMALL))
    with pytest.raises(ValueError, match=message):
        predictor.set_image(image)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no prompt"),
        ({"point_coords": np.zeros((0, 2)), "point_labels": np.zeros(0)}, "no prompt"),
        ({"point_coords": [[500, 10]], "point_labels": [1]}, "outside the image"),
        ({"point_coords": [[-1, 10]], "point_labels": [1]}, "outside the image"),
        ({"point_coords": [[10, 10]]}, "point_labels must be given"),
        ({"point_coords": [[10, 10, 3]], "point_labels": [1]}, "Nx2"),
        ({"point_coords": [[10, 10]], "point_labels": [1, 0]}, "shape"),
        ({"point_coords": [[10, 10]], "point_labels": [7]}, "foreground"),
        ({"point_coords": [[np.nan, 10]], "point_labels": [1]}, "NaN"),
        ({"box": [10, 10, 5, 50]}, "x0 <= x1"),
        ({"box": [1, 2, 3]}, "4 numbers"),
        ({"box": [1000, 1000, 1100, 1100]}, "outside the image"),
        ({"box": [10, 10, 50, 50], "mask_input": np.zeros((1, 256, 256))}, r"\(1, 64, 64\)"),
    ],
)
def test_bad_prompts_are_refused_with_a_clear_message(small_predictor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_predictor.predict(**kwargs)


def test_predict_before_set_image_says_what_to_do():
    predictor = SamPredictor(napari_sam.build_sam(SMALL))
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(point_coords=[[1, 1]], point_labels=[1])


def test_any_dtype_and_channel_count_is_accepted(small_predictor):
    predictor = SamPredictor(small_predictor.model)
    base = _image(90, 70)[..., 0]
    shapes = []
    for image in (
        base,
        base[..., None],
        np.dstack([base] * 3),
        np.dstack([base] * 3 + [np.full_like(base, 255)]),
        base.astype(np.int16) * 40 - 1000,
        base.astype(np.float64) / 255.0,
        base > 128,
    ):
        predictor.set_image(image)
        masks, scores, logits = predictor.predict(box=np.array([10, 10, 60, 80]))
        shapes.append((masks.shape, scores.shape, logits.shape))
    assert set(shapes) == {((3, 90, 70), (3,), (3, 64, 64))}


def test_min_max_conversion_is_what_the_encoder_sees(small_predictor):
    """int16 data min-max scaled equals the same data given as uint8."""
    predictor = SamPredictor(small_predictor.model)
    u8 = np.tile(np.arange(256, dtype=np.uint8), (20, 1))
    predictor.set_image(u8)
    a = predictor.get_image_embedding().clone()
    predictor.set_image(u8.astype(np.int16) * 10 - 500)
    b = predictor.get_image_embedding()
    assert torch.equal(a, b)


def test_set_image_embedding_reproduces_set_image(small_predictor):
    image = _image(100, 150, seed=4)
    p1 = SamPredictor(small_predictor.model)
    p1.set_image(image)
    p2 = SamPredictor(small_predictor.model)
    p2.set_image_embedding(p1.get_image_embedding().numpy(), image.shape[:2])
    assert p2.input_size == p1.input_size
    box = np.array([20, 20, 90, 80])
    for a, b in zip(p1.predict(box=box), p2.predict(box=box), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="shape"):
        p2.set_image_embedding(torch.zeros(1, 256, 64, 64), image.shape[:2])


def test_batched_boxes_give_one_mask_set_per_box(small_predictor):
    p = small_predictor
    boxes = torch.tensor([[10, 10, 60, 60], [40, 30, 150, 110], [0, 0, 160, 120]])
    boxes = p.transform.apply_boxes_torch(boxes, p.original_size)
    masks, iou, low = p.predict_torch(None, None, boxes=boxes, multimask_output=False)
    assert masks.shape == (3, 1, 120, 160) and iou.shape == (3, 1) and low.shape == (3, 1, 64, 64)
    # each batched result equals the single-box call
    single = p.predict(box=np.array([40, 30, 150, 110]), multimask_output=False)
    np.testing.assert_allclose(low[1].numpy(), single[2], atol=1e-5)

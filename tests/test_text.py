"""Text prompts: phrase parsing, the detectors on tiny random models, SAM on their boxes.

The detectors are tiny random Grounding DINO / OWLv2 models saved with ``save_pretrained`` and
loaded through the same path as real weights; their boxes are checked against transformers' own
post-processing. No claim about detection quality (random weights).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_sam.predictor import SamPredictor, default_to_uint8
from napari_sam.text import (
    Candidates,
    Detector,
    GroundingDinoDetector,
    Owlv2Detector,
    load_detector,
    parse_prompt,
    segment_boxes,
    segment_text,
    select_detections,
)
from napari_sam.weights import WeightsUnavailableError
from testmodel import load_test_model
from tiny_detectors import write_grounding_dino, write_owlv2

ODD = (45, 70)  # H, W: not square, so x and y scales differ


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    folder = write_grounding_dino(tmp_path_factory.mktemp("gdino") / "model")
    return load_detector(folder, device="cpu")


@pytest.fixture(scope="module")
def owl(tmp_path_factory):
    folder = write_owlv2(tmp_path_factory.mktemp("owl") / "model")
    return load_detector(folder, device="cpu")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(7).integers(0, 256, (*ODD, 3), dtype=np.uint8)


# -- phrases -----------------------------------------------------------------------------------


def test_parse_prompt():
    assert parse_prompt("liver. kidney.") == ["liver.", "kidney."]
    assert parse_prompt("  Left  Kidney ;LIVER\nliver.. ") == ["left kidney.", "liver."]
    assert parse_prompt(["Liver", "kidney, upper pole"]) == ["liver.", "kidney, upper pole."]
    for empty in ("", " . ; ", []):
        with pytest.raises(ValueError, match="no phrase"):
            parse_prompt(empty)


# -- the optional dependency -------------------------------------------------------------------


def test_importing_text_does_not_import_transformers():
    code = (
        "import sys, napari_sam.text, napari_sam.commands.segment\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_transformers_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'napari-sam-volumes\[text\]'"):
        load_detector(tmp_path)


def test_loading_errors(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bert' model, not a supported text detector"):
        load_detector(tmp_path)
    with pytest.raises(ValueError, match="reads 'owlv2' models"):
        Owlv2Detector.from_pretrained(tmp_path)
    with pytest.raises(WeightsUnavailableError, match="cannot load the text detector"):
        load_detector(tmp_path / "missing")


# -- selection ---------------------------------------------------------------------------------


def test_select_detections_thresholds_nms_and_limit():
    boxes = np.array(
        [
            [0, 0, 10, 10],  # 0: liver, best
            [1, 0, 11, 10],  # 1: liver, IoU 0.82 with 0 -> suppressed within the phrase
            [0, 0, 10, 10],  # 2: kidney, same box as 0 -> suppressed across phrases
            [30, 30, 40, 40],  # 3: kidney
            [50, 50, 50, 60],  # 4: no area
            [60, 60, 70, 70],  # 5: box score too low
            [80, 80, 90, 90],  # 6: phrase score too low
        ],
        dtype=float,
    )
    box_scores = np.array([0.9, 0.8, 0.7, 0.6, 0.95, 0.3, 0.9])
    phrase_scores = np.array(
        [[0.9, 0.1], [0.8, 0.1], [0.1, 0.7], [0.2, 0.6], [0.95, 0], [0.3, 0], [0.2, 0.2]]
    )
    found = Candidates(boxes, box_scores, phrase_scores)
    phrases = ["liver.", "kidney."]
    kw = dict(box_threshold=0.35, text_threshold=0.25)
    plain = select_detections(found, phrases, nms_iou=None, cross_phrase_iou=None, **kw)
    assert plain.phrases == ("liver.", "liver.", "kidney.", "kidney.")
    np.testing.assert_array_equal(plain.scores, [0.9, 0.8, 0.7, 0.6])
    within = select_detections(found, phrases, nms_iou=0.5, cross_phrase_iou=None, **kw)
    np.testing.assert_array_equal(within.boxes, boxes[[0, 2, 3]])
    both = select_detections(found, phrases, **kw)  # defaults: 0.5 within, 0.85 across
    np.testing.assert_array_equal(both.boxes, boxes[[0, 3]])
    assert both.phrases == ("liver.", "kidney.")
    assert len(select_detections(found, phrases, max_boxes=1, **kw)) == 1
    # The text threshold alone removes box 3 (kidney 0.6) at 0.65.
    strict = select_detections(found, phrases, box_threshold=0.35, text_threshold=0.65)
    np.testing.assert_array_equal(strict.boxes, boxes[[0]])
    with pytest.raises(ValueError, match=r"box_threshold must be in 0\.\.1"):
        select_detections(found, phrases, box_threshold=1.5, text_threshold=0.2)


# -- detectors against transformers' post-processing -------------------------------------------


def test_detectors_satisfy_the_interface(dino, owl):
    assert isinstance(dino, GroundingDinoDetector) and isinstance(owl, Owlv2Detector)
    assert isinstance(dino, Detector) and isinstance(owl, Detector)
    assert (dino.box_threshold, dino.text_threshold) == (0.35, 0.25)


def test_grounding_dino_boxes_are_pixels_of_the_original_image(dino, image):
    from transformers import GroundingDinoProcessor

    text = "liver. left kidney."
    found = dino.candidates(image, text)
    processor = GroundingDinoProcessor(dino.image_processor, dino.tokenizer)
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        out = dino.model(**inputs)
    ref = processor.post_process_grounded_object_detection(
        out, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=[ODD]
    )[0]
    h, w = ODD
    ref_boxes = ref["boxes"].double().numpy().clip(0, [w, h, w, h])
    assert len(ref_boxes) == len(found.boxes) == dino.model.config.num_queries
    np.testing.assert_allclose(found.boxes, ref_boxes, atol=1e-3)  # float32 boxes
    np.testing.assert_allclose(found.box_scores, ref["scores"].double().numpy(), atol=1e-6)
    assert (found.boxes >= 0).all() and (found.boxes[:, [0, 2]] <= w).all()
    assert (found.boxes[:, [1, 3]] <= h).all()
    # Not all boxes sit in one corner: x spans more than the height would allow.
    assert found.boxes[:, 2].max() > h


def test_owlv2_boxes_are_pixels_of_the_original_image(owl, image):
    from transformers import Owlv2Processor

    found = owl.candidates(image, "liver. kidney.")
    processor = Owlv2Processor(owl.image_processor, owl.tokenizer)
    inputs = processor(images=image, text=[["liver", "kidney"]], return_tensors="pt")
    with torch.no_grad():
        out = owl.model(**inputs)
    ref = processor.post_process_grounded_object_detection(out, threshold=0.0, target_sizes=[ODD])[
        0
    ]
    h, w = ODD
    probs = out.logits[0].sigmoid().double().numpy()
    np.testing.assert_allclose(found.phrase_scores, probs, atol=1e-6)
    # transformers returns the boxes above the threshold in query order, unclipped.
    above = probs.max(axis=1) > 0.0
    ref_boxes = ref["boxes"].double().numpy().clip(0, [w, h, w, h])
    np.testing.assert_allclose(found.boxes[above], ref_boxes, atol=1e-3)
    assert (found.boxes[:, [0, 2]] <= w).all() and (found.boxes[:, [1, 3]] <= h).all()


def test_thresholds_filter(dino, image):
    text = "liver. left kidney."
    found = dino.candidates(image, text)
    best = found.phrase_scores.max(axis=1)
    area = (found.boxes[:, 2] > found.boxes[:, 0]) & (found.boxes[:, 3] > found.boxes[:, 1])
    unlimited = dict(nms_iou=None, cross_phrase_iou=None, max_boxes=None)
    det = GroundingDinoDetector(dino.model, dino.image_processor, dino.tokenizer, **unlimited)
    counts = []
    for box_t, text_t in [(0.0, 0.0), (float(np.median(found.box_scores)), 0.0), (0.0, 0.9)]:
        got = det.detect(image, text, box_threshold=box_t, text_threshold=text_t)
        expected = (found.box_scores > box_t) & (best > text_t) & area
        assert len(got) == expected.sum()
        assert (got.scores > box_t).all()
        np.testing.assert_array_equal(np.sort(got.scores), np.sort(found.box_scores[expected]))
        counts.append(len(got))
    assert counts[0] > counts[1] > 0 and counts[0] > counts[2]


def test_phrases_map_back_to_their_tokens(dino, image):
    # One token per phrase: the phrase of a box is the one whose token scores highest.
    text = "liver. spleen."
    unlimited = dict(nms_iou=None, cross_phrase_iou=None, max_boxes=None)
    det = GroundingDinoDetector(dino.model, dino.image_processor, dino.tokenizer, **unlimited)
    got = det.detect(image, text, box_threshold=0.0, text_threshold=0.0)
    inputs = dino.tokenizer(text, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    columns = [ids.index(dino.tokenizer.convert_tokens_to_ids(w)) for w in ("liver", "spleen")]
    pixels = dino.image_processor(images=image, return_tensors="pt")
    with torch.no_grad():
        out = dino.model(**inputs, **pixels)
    probs = out.logits[0][:, columns].sigmoid().numpy()
    queries = det.candidates(image, text).boxes
    seen = set()
    for box, phrase in zip(got.boxes, got.phrases):
        q = int(np.flatnonzero(np.all(queries == box, axis=1))[0])
        assert phrase == ("liver.", "spleen.")[int(np.argmax(probs[q]))]
        seen.add(phrase)
    assert seen == {"liver.", "spleen."}


def test_owlv2_detect(owl, image):
    got = owl.detect(image, ["liver", "kidney"], box_threshold=0.0, text_threshold=0.0)
    assert 0 < len(got) <= owl.max_boxes
    assert set(got.phrases) <= {"liver.", "kidney."}
    assert np.all(np.diff(got.scores) <= 0)


def test_detect_rejects_bad_input(dino, owl, image):
    with pytest.raises(ValueError, match="HxWx3 uint8 RGB"):
        dino.detect(np.zeros((8, 8), np.float32), "liver.")
    limit = dino.model.config.max_text_len
    with pytest.raises(ValueError, match=f"detector reads at most {limit}"):
        dino.detect(image, " ".join(["liver"] * limit))
    with pytest.raises(ValueError, match="OWLv2 reads at most 16 per phrase"):
        owl.detect(image, "abcdefghijklmnopqrstuvwxyz")


# -- SAM on the boxes --------------------------------------------------------------------------


def test_segment_text_masks_are_sam_on_the_detected_boxes(dino):
    # A float grayscale slice: the detector and SAM both see predictor.to_uint8 of it.
    rng = np.random.default_rng(3)
    image = rng.normal(40.0, 20.0, (90, 120)).astype(np.float32)
    image[20:60, 30:90] += 120.0
    predictor = SamPredictor(load_test_model())
    result = segment_text(
        image, "liver. kidney.", predictor=predictor, detector=dino, box_threshold=0.0
    )
    expected = dino.detect(default_to_uint8(image), "liver. kidney.", box_threshold=0.0)
    assert len(result) == len(expected) > 1
    np.testing.assert_array_equal(result.boxes, expected.boxes)
    assert result.phrases == expected.phrases
    np.testing.assert_array_equal(result.scores, expected.scores)
    assert result.masks.shape == (len(result), 90, 120) and result.masks.dtype == bool
    for i, box in enumerate(result.boxes):
        masks, iou, low_res = predictor.predict(box=box, multimask_output=False)
        # One batch of N boxes against one box at a time: float32 rounding only.
        assert np.mean(masks[0] == result.masks[i]) >= 0.999
        np.testing.assert_allclose(result.iou_predictions[i], iou[0], atol=1e-4)
        np.testing.assert_allclose(result.low_res_logits[i], low_res[0], atol=1e-3)
    # The embedding already there is reused.
    again = segment_text(
        image,
        "liver. kidney.",
        predictor=predictor,
        detector=dino,
        box_threshold=0.0,
        image_is_set=True,
    )
    np.testing.assert_array_equal(again.masks, result.masks)


def test_segment_text_finds_nothing_above_threshold(dino, image):
    predictor = SamPredictor(load_test_model())
    result = segment_text(image, "liver.", predictor=predictor, detector=dino, box_threshold=1.0)
    assert len(result) == 0
    assert result.masks.shape == (0, *ODD) and result.boxes.shape == (0, 4)
    masks, iou, _ = segment_boxes(predictor, np.zeros((0, 4)))
    assert masks.shape == (0, *ODD) and iou.shape == (0,)

"""Text prompts in the widget: a tiny random Grounding DINO through the real code path.

The detector folder is written with ``save_pretrained`` (tests/tiny_detectors.py) and loaded by
the widget's backend in a worker thread, exactly like real weights; SAM is the trained test
fixture. Random detector weights: the tests check where the boxes go and what SAM does with
them, not detection quality. Run under Xvfb.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
pytest.importorskip("transformers")

from napari_sam._napari._backend import Backend
from napari_sam._napari.widget import SamWidget
from testmodel import load_test_model
from tiny_detectors import write_grounding_dino
from volume_helpers import one_torch_thread  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.gui

SHAPE = (5, 48, 64)
BLOBS = ((17, 17, 9), (25, 48, 11))  # (row, col, radius)
SCALE, TRANSLATE = (2.0, 0.8, 0.5), (3.0, -4.0, 7.0)  # anisotropic: boxes must be converted


class NoDiskCache(Backend):
    def cache_dir(self):
        return None


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    return write_grounding_dino(tmp_path_factory.mktemp("gdino") / "model")


@pytest.fixture
def text_widget(make_napari_viewer, qtbot):
    made = []

    def make(backend=None):
        viewer = make_napari_viewer()
        volume = np.random.default_rng(3).normal(100, 30, SHAPE).astype(np.float32)
        yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
        for cy, cx, r in BLOBS:  # bright discs through the volume, for SAM to find in boxes
            volume[:, (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += 300
        viewer.add_image(volume, name="volume", scale=SCALE, translate=TRANSLATE)
        widget = SamWidget(viewer, backend=backend or NoDiskCache())
        viewer.window.add_dock_widget(widget)
        widget.set_model(load_test_model(), "test model")
        made.append(widget)
        return viewer, widget

    yield make
    for widget in made:
        widget.cancel()
        qtbot.waitUntil(lambda w=widget: not w.jobs.busy, timeout=30000)


def settle(qtbot, widget, timeout=60000):
    qtbot.waitUntil(lambda: not widget.jobs.busy and not widget.pending, timeout=timeout)


def clipped(boxes, shape):
    h, w = shape
    return np.clip(np.asarray(boxes, float), 0, [w - 1, h - 1, w - 1, h - 1])


@pytest.mark.slow  # loads transformers and the detector in a worker: ~10 s on a busy CPU
def test_find_boxes_puts_detections_in_sam_boxes_then_segments_each(
    text_widget, dino_folder, qtbot
):
    viewer, widget = text_widget()
    assert widget.text_hint.isHidden() and widget.find_boxes_button.isEnabled()
    # The built-in choices come first, with Grounding DINO's thresholds; then a folder.
    assert widget.detector_source == "grounding-dino-tiny"
    widget.detector_combo.setCurrentIndex(widget.detector_combo.findData("owlv2"))
    assert (widget.box_threshold_spin.value(), widget.text_threshold_spin.value()) == (0.1, 0.1)
    widget.set_detector(dino_folder)
    assert widget.detector_source == str(dino_folder)
    assert (widget.box_threshold_spin.value(), widget.text_threshold_spin.value()) == (0.35, 0.25)

    index = 2
    viewer.dims.set_current_step(0, index)
    # Random weights score everything low: thresholds 0 keep the top boxes (max 20 after NMS).
    widget.box_threshold_spin.setValue(0.0)
    widget.text_threshold_spin.setValue(0.0)
    widget.text_edit.setText("Liver. kidney.")
    messages = []
    widget.status.setText = lambda text, f=widget.status.setText: (messages.append(text), f(text))
    widget.find_boxes()
    assert widget.jobs.busy  # the detector runs in the background
    settle(qtbot, widget)
    assert widget.last_error is None, widget.last_error

    session = widget.session
    detector = widget.backend.detector(str(dino_folder), "auto")  # the one the job loaded
    assert widget.backend.has_detector(str(dino_folder), "auto")
    found = detector.detect(
        session.slice_image(index), ["liver.", "kidney."], box_threshold=0.0, text_threshold=0.0
    )
    n = len(found)
    assert n >= 2 and any(m.startswith(f"Found {n} box(es) on slice {index}") for m in messages)

    boxes = widget.boxes_layer
    assert boxes.nshapes == n and set(boxes.shape_type) == {"rectangle"}
    # Added worst first, so the newest shape (the one the preview shows) is the best box.
    np.testing.assert_allclose(boxes.features["score"], found.scores[::-1], rtol=1e-12)
    assert list(boxes.features["phrase"]) == list(found.phrases[::-1])
    best_caption = f"{found.phrases[0].rstrip('.')} {found.scores[0]:.2f}"
    assert boxes.text.values[-1] == best_caption
    # Through the layers' scale and translate and back: the detector's pixels.
    read_back = widget._boxes.each(widget.image_layer, widget.frame(), index)
    got = np.array([p.box for p, _ in read_back])
    np.testing.assert_allclose(got, clipped(found.boxes[::-1], SHAPE[1:]), atol=1e-6)

    # SAM ran on the best box, as for a drawn box.
    best = clipped(found.boxes[:1], SHAPE[1:])[0]
    expected = session.preview(index, box=best, multimask=False).masks[0]
    np.testing.assert_array_equal(widget.preview_layer.data[index].astype(bool), expected)

    # Every box its own object, best score first (the lower id keeps contested pixels).
    widget.segment_all_boxes()
    settle(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    want = np.zeros(SHAPE[1:], np.int32)
    for k, box in enumerate(clipped(found.boxes, SHAPE[1:]), 1):
        mask = session.preview(index, box=box, multimask=False).masks[0]
        want[(want == 0) & mask] = k
    labels = widget.labels_layer
    np.testing.assert_array_equal(labels.data[index], want)
    assert not labels.data[[0, 1, 3, 4]].any()
    assert sorted(session.objects) == sorted(int(v) for v in np.unique(want) if v)
    assert boxes.nshapes == 0  # the prompts were used up
    labels.undo()  # one undo step for all of them
    assert not labels.data.any()


def test_find_boxes_cancelled_adds_nothing(text_widget, dino_folder, qtbot):
    _viewer, widget = text_widget()
    widget.set_detector(dino_folder)
    widget.text_edit.setText("liver.")
    widget.find_boxes()
    widget.cancel()  # stops at the job's first yield (loading the model)
    settle(qtbot, widget)
    assert widget.boxes_layer.nshapes == 0
    assert widget.status.text().startswith("Cancelled: nothing was written.")
    widget.text_edit.setText(" . ")
    widget.find_boxes()
    assert not widget.jobs.busy and "no phrase in the text prompt" in widget.status.text()


def test_segment_all_boxes_works_on_drawn_boxes(text_widget, qtbot):
    viewer, widget = text_widget()
    viewer.dims.set_current_step(0, 1)
    layer = widget.boxes_layer
    frame = widget.frame()
    drawn = np.array([[4.0, 6.0, 30.0, 28.0], [36.0, 10.0, 60.0, 40.0]])
    widget._quiet = True  # no preview runs: only the action is tested
    widget._boxes.add_boxes(widget.image_layer, frame, 1, drawn, ["", ""], [np.nan, np.nan])
    widget._quiet = False
    assert list(layer.text.values) == ["", ""]  # no caption on a drawn box
    widget.segment_all_boxes()
    settle(qtbot, widget)
    session = widget.session
    want = np.zeros(SHAPE[1:], np.int32)
    for k, box in enumerate(drawn, 1):  # drawn boxes keep the layer's order
        want[(want == 0) & session.preview(1, box=box, multimask=False).masks[0]] = k
    np.testing.assert_array_equal(widget.labels_layer.data[1], want)
    assert sorted(np.unique(want)) == [0, 1, 2]  # one object per box
    assert "Committed 2 object(s) from 2 box(es) on slice 1 (labels 1-2)" in widget.status.text()


def test_without_transformers_the_text_section_says_what_to_install(text_widget, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    _viewer, widget = text_widget()
    assert not widget.text_hint.isHidden()
    assert "pip install 'napari-sam-volumes[text]'" in widget.text_hint.text()
    for control in (widget.text_edit, widget.find_boxes_button, widget.detector_combo):
        assert not control.isEnabled()
    # Boxes drawn by hand still make one object each.
    assert widget.all_boxes_button.isEnabled()

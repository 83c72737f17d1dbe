"""The dock widget driven as a user would, with a fake engine (control flow, undo, threads).

The fake backend answers prompts with simple shapes (discs around clicks, filled boxes) and
propagates a seed mask unchanged, so every assertion is exact. Quality with a real model is in
test_widget_model.py. Run under Xvfb: ``xvfb-run -a pytest tests/test_widget.py``.
"""

from __future__ import annotations

import time
import weakref

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from qtpy.QtCore import QTimer

from napari_sam._napari._backend import Backend, ModelOption, WindowOption
from napari_sam._napari.widget import KEYS, SamWidget
from napari_sam.intensity import Window
from napari_sam.prompts import Prompts
from napari_sam.volume.propagation import Step

pytestmark = pytest.mark.gui

R = 4  # radius of the fake model's disc around a click, in pixels


class FakeCache:
    def __init__(self, volume, axis, delay):
        self.volume, self.axis, self.delay = volume, axis, delay
        self.slice_shape = tuple(s for i, s in enumerate(volume.shape[:3]) if i != axis)
        self.encoded: list[int] = []

    def has(self, index):
        return index in self.encoded

    def get(self, index):
        if index not in self.encoded:
            time.sleep(self.delay)  # a slow encoder; sleeping releases the GIL like torch does
            self.encoded.append(index)
        return None, self.slice_shape, self.slice_shape


class FakePredictor:
    def __init__(self):
        self.shape = None
        self.calls: list[dict] = []


def disc(shape, x, y, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx - x) ** 2 + (yy - y) ** 2 <= r * r


class FakeBackend(Backend):
    """The engine replaced by exact shapes; the slow parts sleep."""

    def __init__(self, encode_delay=0.0, step_delay=0.0, models=None):
        self.encode_delay, self.step_delay = encode_delay, step_delay
        self.caches: list[FakeCache] = []
        self.predictor = FakePredictor()
        self.loaded: list = []
        self.propagations: list[dict] = []
        self._models = models or [ModelOption("fake", "fake — cached", True, False)]
        self.downloads: list[str] = []

    def model_options(self):
        return list(self._models)

    def devices(self):
        return ["auto", "cpu"]

    def speeds(self):
        return [("Fast", "auto"), ("Exact", "exact")]

    def window_options(self):
        return [WindowOption("Auto", "auto"), WindowOption("napari", "contrast_limits")]

    def cache_dir(self):
        return None

    def load_model(self, source, device, precision):
        self.loaded.append((source, device, precision))
        return object()

    def make_predictor(self, model):
        return self.predictor

    def make_window(self, volume, mode, contrast_limits=None, rgb=False):
        # The window the widget asked for, recognisable: napari's limits, or (0, 1) otherwise.
        return Window(*contrast_limits) if mode == "contrast_limits" else Window(0.0, 1.0)

    def make_cache(self, model, volume, axis, window, cache_dir, **options):
        cache = FakeCache(volume, axis, self.encode_delay)
        self.caches.append(cache)
        return cache

    def embed(self, cache, predictor, index):
        cache.get(index)
        predictor.shape = cache.slice_shape

    def predict(self, predictor, *, points, point_labels, box, mask, mask_input, multimask):
        shape = predictor.shape
        prompts = Prompts(
            np.zeros((0, 2)) if points is None else points,
            np.zeros(0, int) if point_labels is None else point_labels,
            box,
            mask if mask_input is None else None,  # the drawn region when it is the dense prompt
        )
        predictor.calls.append(
            {"prompts": prompts, "mask_input": mask_input, "multimask": multimask}
        )
        mask = np.zeros(shape, bool)
        if prompts.box is not None:
            x0, y0, x1, y1 = np.round(prompts.box).astype(int)
            mask[y0 : y1 + 1, x0 : x1 + 1] = True
        if prompts.mask is not None:
            mask |= prompts.mask
        scale = (1, 2, 3) if multimask else (1,)
        masks = []
        for k in scale:
            m = mask.copy()
            for (x, y), label in zip(prompts.points, prompts.labels):
                d = disc(shape, x, y, R * k)
                m = (m | d) if label == 1 else (m & ~d)
            masks.append(m)
        ious = np.array([0.6, 0.9, 0.7][: len(masks)])
        low_res = np.full((len(masks), 8, 8), float(len(predictor.calls)))
        return np.stack(masks), ious, low_res

    def propagate(self, cache, predictor, seeds, *, slice_range):
        self.propagations.append({"seeds": seeds, "slice_range": slice_range})
        lo, hi = slice_range[0], slice_range[1] - 1  # (start, stop)
        plan = []
        for label, masks in seeds.items():
            first, last = min(masks), max(masks)
            plan += [(i, label, masks[last]) for i in range(last + 1, hi + 1)]
            plan += [(i, label, masks[first]) for i in range(first - 1, lo - 1, -1)]
        for done, (index, label, mask) in enumerate(plan, 1):
            time.sleep(self.step_delay)
            cache.get(index)
            yield Step(index, {label: mask.copy()}, done=done, total=len(plan))

    def segment_everything(self, cache, model, index):
        shape = cache.slice_shape
        for done in (1, 2):
            time.sleep(self.step_delay)
            yield f"everything {done}/2"
        found = np.zeros(shape, np.int32)
        found[disc(shape, 30, 20, 6)] = 1
        found[disc(shape, 50, 30, 4)] = 2
        return found

    def download(self, name, progress_callback, cancel):
        total = 1000
        for done in range(0, total + 1, 100):
            if cancel():
                raise _Cancelled("cancelled")
            progress_callback(done, total)
            time.sleep(0.05)
        self.downloads.append(name)
        self._models = [ModelOption(name, f"{name} — cached", True, True)]
        return f"/cache/{name}.pth"

    def is_cancelled_error(self, exc):
        return isinstance(exc, _Cancelled)


class _Cancelled(Exception):
    pass


@pytest.fixture
def make_widget(make_napari_viewer, qtbot):
    made = []

    def make(data, backend=None, **image_kwargs):
        viewer = make_napari_viewer()
        image = viewer.add_image(data, name="image", **image_kwargs)
        widget = SamWidget(viewer, backend=backend or FakeBackend())
        viewer.window.add_dock_widget(widget)
        made.append(widget)
        return viewer, image, widget

    yield make
    for widget in made:  # no worker may outlive its viewer
        widget.cancel()
        qtbot.waitUntil(lambda w=widget: not w.jobs.busy and not w.downloads.busy, timeout=10000)


def settle(qtbot, widget, timeout=10000):
    """Wait until no job runs and no re-run is pending."""
    qtbot.waitUntil(lambda: not widget.jobs.busy and not widget.pending, timeout=timeout)


def press(widget, layer, key):
    """A key press as napari dispatches it: the active layer's keymap, then the viewer's."""
    widget.viewer.layers.selection.active = layer
    layer.keymap[_kb(key)](layer) if _kb(key) in layer.keymap else widget.viewer.keymap[_kb(key)](
        widget.viewer
    )


def _kb(key):
    from app_model.types import KeyBinding

    return KeyBinding.from_str(key.replace("-", "+"))


def preview_slice(widget, index):
    return widget.preview_layer.data[index].astype(bool)


VOLUME = np.random.default_rng(0).normal(size=(8, 48, 64)).astype(np.float32)


def test_click_runs_sam_in_background_and_previews_best_mask(make_widget, qtbot):
    viewer, _image, widget = make_widget(VOLUME)
    viewer.dims.set_current_step(0, 3)
    messages = []
    widget.status.setText = lambda text, f=widget.status.setText: (messages.append(text), f(text))

    widget.points_layer.add([3, 20, 30])
    assert widget.jobs.busy  # the slot returned at once; SAM runs in a worker
    settle(qtbot, widget)

    assert any(m.startswith("Encoding slice 3") for m in messages)
    call = widget.backend.predictor.calls[-1]
    assert call["multimask"] and call["mask_input"] is None
    np.testing.assert_array_equal(call["prompts"].points, [[30, 20]])
    # Best of three by predicted IoU: the fake's second mask (radius 2R).
    np.testing.assert_array_equal(preview_slice(widget, 3), disc((48, 64), 30, 20, 2 * R))
    assert not widget.preview_layer.data[[0, 1, 2, 4, 5, 6, 7]].any()
    assert "mask 2 of 3" in widget.status.text()

    # N cycles through the other masks.
    press(widget, widget.points_layer, "N")
    np.testing.assert_array_equal(preview_slice(widget, 3), disc((48, 64), 30, 20, 3 * R))
    press(widget, widget.points_layer, "N")
    np.testing.assert_array_equal(preview_slice(widget, 3), disc((48, 64), 30, 20, R))
    assert widget.backend.caches[-1].encoded == [3]  # encoded once, on first need


def test_next_click_refines_with_previous_logits_and_moves_start_fresh(make_widget, qtbot):
    viewer, _image, widget = make_widget(VOLUME)
    viewer.dims.set_current_step(0, 0)
    points = widget.points_layer
    points.add([0, 10, 10])
    settle(qtbot, widget)
    first = widget.result
    points.add([0, 10, 40])
    settle(qtbot, widget)
    call = widget.backend.predictor.calls[-1]
    assert not call["multimask"]
    np.testing.assert_array_equal(call["mask_input"], first.low_res[first.chosen][None])

    points.data = np.array([[0, 12, 10], [0, 10, 40]])  # a moved point: no stale dense prompt
    settle(qtbot, widget)
    call = widget.backend.predictor.calls[-1]
    assert call["mask_input"] is None
    expected = disc((48, 64), 10, 12, R) | disc((48, 64), 40, 10, R)
    np.testing.assert_array_equal(preview_slice(widget, 0), expected)

    points.selected_data = {0}
    points.remove_selected()  # removing re-runs too
    settle(qtbot, widget)
    np.testing.assert_array_equal(preview_slice(widget, 0), disc((48, 64), 40, 10, 2 * R))


def test_t_toggles_sign_of_new_points(make_widget, qtbot):
    viewer, _image, widget = make_widget(VOLUME)
    viewer.dims.set_current_step(0, 0)
    points = widget.points_layer
    points.add([0, 20, 20])
    settle(qtbot, widget)
    press(widget, points, "T")
    assert "negative" in widget.sign_button.text()
    points.add([0, 20, 24])
    settle(qtbot, widget)
    assert list(points.features["sign"]) == ["positive", "negative"]
    np.testing.assert_allclose(points.face_color[1], [1, 0, 1, 1])  # magenta
    call = widget.backend.predictor.calls[-1]
    np.testing.assert_array_equal(call["prompts"].labels, [1, 0])
    expected = disc((48, 64), 20, 20, R) & ~disc((48, 64), 24, 20, R)
    np.testing.assert_array_equal(preview_slice(widget, 0), expected)
    # T on the Shapes layer is ours too (napari's default there is path mode).
    press(widget, widget.boxes_layer, "T")
    assert "positive" in widget.sign_button.text()
    assert widget.boxes_layer.mode != "add_path"


def test_box_and_ellipse_prompts(make_widget, qtbot):
    viewer, _image, widget = make_widget(VOLUME)
    viewer.dims.set_current_step(0, 5)
    boxes = widget.boxes_layer
    boxes.add([[5, 10, 20], [5, 10, 40], [5, 30, 40], [5, 30, 20]], shape_type="rectangle")
    settle(qtbot, widget)
    call = widget.backend.predictor.calls[-1]
    np.testing.assert_array_equal(call["prompts"].box, [20, 10, 40, 30])
    assert not call["multimask"]
    expected = np.zeros((48, 64), bool)
    expected[10:31, 20:41] = True
    np.testing.assert_array_equal(preview_slice(widget, 5), expected)

    # An ellipse is its bounding box plus the drawn region as a dense prompt.
    boxes.add([[5, 2, 2], [5, 2, 12], [5, 12, 12], [5, 12, 2]], shape_type="ellipse")
    settle(qtbot, widget)
    prompts = widget.backend.predictor.calls[-1]["prompts"]
    np.testing.assert_array_equal(prompts.box, [2, 2, 12, 12])
    assert prompts.mask[7, 7] and not prompts.mask[2, 2] and not prompts.mask[20, 20]


def test_commit_undo_and_overlap_rules(make_widget, qtbot):
    meta = {"nifti": {"affine": np.eye(4).tolist()}}
    viewer, image, widget = make_widget(
        VOLUME, scale=(2.5, 0.7, 0.7), translate=(4, -3, 2), metadata=meta
    )
    viewer.dims.set_current_step(0, 2)
    widget.points_layer.add(widget.points_layer.world_to_data(image.data_to_world([2, 20, 20])))
    settle(qtbot, widget)
    first = preview_slice(widget, 2).copy()
    press(widget, widget.points_layer, "C")

    labels = widget.labels_layer
    assert labels is not None and labels.name == "image labels"
    assert labels.data.shape == VOLUME.shape
    np.testing.assert_allclose(labels.scale, image.scale)
    np.testing.assert_allclose(labels.translate, image.translate)
    assert labels.metadata == meta and labels.metadata is not image.metadata
    np.testing.assert_array_equal(labels.data[2] == 1, first)
    assert labels.data[[0, 1, 3, 4, 5, 6, 7]].max() == 0
    assert len(widget.points_layer.data) == 0  # prompts clear after a commit
    assert not widget.preview_layer.data.any()

    # A second object overlapping the first: keep leaves label 1 where it was.
    widget.points_layer.add([2, 20, 26])
    settle(qtbot, widget)
    second = preview_slice(widget, 2).copy()
    widget.commit()
    np.testing.assert_array_equal(labels.data[2] == 1, first)
    np.testing.assert_array_equal(labels.data[2] == 2, second & ~first)

    labels.undo()  # Ctrl+Z undoes exactly the last commit
    np.testing.assert_array_equal(labels.data[2] == 1, first)
    assert (labels.data == 2).sum() == 0

    widget.overlap_combo.setCurrentIndex(widget.overlap_combo.findData("overwrite"))
    widget.points_layer.add([2, 20, 26])
    settle(qtbot, widget)
    widget.commit()
    np.testing.assert_array_equal(labels.data[2] == 2, second)
    np.testing.assert_array_equal(labels.data[2] == 1, first & ~second)

    # "Selected label id" writes into the label chosen in the layer.
    widget.label_mode_combo.setCurrentIndex(widget.label_mode_combo.findData("selected"))
    labels.selected_label = 7
    widget.points_layer.add([2, 40, 55])
    settle(qtbot, widget)
    widget.commit()
    assert (labels.data[2] == 7).sum() == (disc((48, 64), 55, 40, 2 * R)).sum()


def test_prompts_respect_scale_and_translate(make_widget, qtbot):
    viewer, image, widget = make_widget(VOLUME, scale=(3.0, 0.5, 2.0), translate=(10, 5, -7))
    world = image.data_to_world([4, 30, 12])
    viewer.dims.set_point(0, world[0])
    widget.points_layer.add(widget.points_layer.world_to_data(world))
    settle(qtbot, widget)
    np.testing.assert_array_equal(widget.backend.predictor.calls[-1]["prompts"].points, [[12, 30]])
    np.testing.assert_array_equal(preview_slice(widget, 4), disc((48, 64), 12, 30, 2 * R))


def _commit_disc(widget, qtbot, index, row, col):
    widget.viewer.dims.set_current_step(0, index)
    widget.points_layer.add([index, row, col])
    settle(qtbot, widget)
    widget.commit()


def test_propagation_is_one_undo_step(make_widget, qtbot):
    _viewer, _image, widget = make_widget(VOLUME)
    _commit_disc(widget, qtbot, 3, 20, 20)
    labels = widget.labels_layer
    seed = labels.data[3].copy()
    widget.from_spin.setValue(1)
    widget.to_spin.setValue(6)
    press(widget, widget.points_layer, "Shift-S")
    assert labels.mode == "pan_zoom"  # no painting into the running undo step
    settle(qtbot, widget)

    run = widget.backend.propagations[-1]
    assert run["slice_range"] == (1, 7)  # slices 1..6 as (start, stop)
    assert set(run["seeds"]) == {1} and set(run["seeds"][1]) == {3}
    for z in range(8):
        expected = seed if 1 <= z <= 6 else np.zeros_like(seed)
        np.testing.assert_array_equal(labels.data[z], expected, err_msg=f"slice {z}")
    assert "Propagation done: 5 slice(s) changed" in widget.status.text()

    labels.undo()  # the whole propagation at once; the commit stays
    np.testing.assert_array_equal(labels.data[3], seed)
    assert labels.data.sum() == seed.sum()
    labels.undo()
    assert labels.data.sum() == 0


def test_cancel_keeps_whole_finished_slices(make_widget, qtbot):
    backend = FakeBackend(step_delay=0.15)
    _viewer, _image, widget = make_widget(VOLUME, backend=backend)
    _commit_disc(widget, qtbot, 0, 20, 20)
    labels = widget.labels_layer
    seed = labels.data[0].copy()
    widget.propagate()
    qtbot.waitUntil(lambda: widget.progress.value() >= 2, timeout=10000)
    widget.cancel_button.click()
    settle(qtbot, widget)

    written = [z for z in range(1, 8) if labels.data[z].any()]
    assert 2 <= len(written) < 7
    assert written == list(range(1, len(written) + 1))  # contiguous from the seed
    for z in written:
        np.testing.assert_array_equal(labels.data[z], seed)  # whole slices only
    assert "cancelled" in widget.status.text()
    labels.undo()
    np.testing.assert_array_equal(labels.data[0], seed)
    assert labels.data.sum() == seed.sum()


def test_viewer_stays_responsive_while_encoding_and_propagating(make_widget, qtbot):
    backend = FakeBackend(encode_delay=0.5, step_delay=0.1)
    viewer, _image, widget = make_widget(VOLUME, backend=backend)
    _commit_disc(widget, qtbot, 4, 20, 20)  # creates the labels layer (napari's one-off setup)
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))

    def watch(run):
        """Largest gap between ticks of the main-thread timer while ``run`` works."""
        ticks.clear()
        widget.timer.durations.clear()
        timer.start()
        try:
            run()
            settle(qtbot, widget, timeout=20000)
        finally:
            timer.stop()
        name, longest = widget.timer.longest
        assert longest < 0.1, f"slot {name} took {longest * 1e3:.0f} ms"
        return len(ticks), np.diff(ticks).max()

    viewer.dims.set_current_step(0, 6)
    n, gap = watch(lambda: widget.points_layer.add([6, 30, 40]))  # encodes slice 6
    assert n > 30 and gap < 0.1, f"encoding: main thread blocked for {gap * 1e3:.0f} ms"
    widget.commit()
    n, gap = watch(widget.propagate)  # encodes the 6 other slices while propagating
    assert n > 200 and gap < 0.1, f"propagation: main thread blocked for {gap * 1e3:.0f} ms"
    assert widget.labels_layer.data.astype(bool).sum(axis=(1, 2)).min() > 0


def test_4d_series_slices_the_current_time_point(make_widget, qtbot):
    data = np.random.default_rng(1).normal(size=(3, 5, 32, 40)).astype(np.float32)
    viewer, _image, widget = make_widget(data)
    viewer.dims.set_current_step(0, 1)
    viewer.dims.set_current_step(1, 2)
    frame = widget.frame()
    assert frame.axis == 1 and frame.fixed == ((0, 1),)
    widget.points_layer.add([1, 2, 10, 12])
    settle(qtbot, widget)
    assert widget.backend.caches[-1].volume.shape == (5, 32, 40)
    widget.commit()
    labels = widget.labels_layer
    assert labels.data.shape == data.shape
    np.testing.assert_array_equal(labels.data[1, 2] == 1, disc((32, 40), 12, 10, 2 * R))
    assert labels.data.sum() == labels.data[1, 2].sum()

    # Slicing along another axis: the chooser reorders the viewer's dims.
    widget.axis_combo.setCurrentIndex(widget.axis_combo.findData(2))
    widget.axis_combo.activated.emit(widget.axis_combo.currentIndex())
    assert widget.frame().axis == 2 and widget.frame().plane == (1, 3)


def test_2d_rgb_image(make_widget, qtbot):
    rgb = np.random.default_rng(2).integers(0, 255, size=(40, 50, 3), dtype=np.uint8)
    _viewer, _image, widget = make_widget(rgb, rgb=True)
    assert not widget.axis_combo.isEnabled()
    widget.points_layer.add([20, 25])
    settle(qtbot, widget)
    assert widget.backend.caches[-1].volume.shape == (1, 40, 50, 3)
    widget.commit()
    labels = widget.labels_layer
    assert labels.data.shape == (40, 50)
    np.testing.assert_array_equal(labels.data == 1, disc((40, 50), 25, 20, 2 * R))
    widget.propagate()
    assert "single slice" in widget.status.text()


def test_window_choice_reaches_the_engine_and_contrast_limits_follow(make_widget, qtbot):
    gray = np.random.default_rng(3).normal(100, 20, size=(40, 50)).astype(np.float32)
    _viewer, image, widget = make_widget(gray)
    widget.window_combo.setCurrentIndex(widget.window_combo.findData("contrast_limits"))
    image.contrast_limits = (60.0, 140.0)
    widget.points_layer.add([20, 25])
    settle(qtbot, widget)
    caches = widget.backend.caches
    assert len(caches) == 1 and caches[0].volume.shape == (1, 40, 50)  # a 2D image: one slice
    assert widget.session.window == Window(60.0, 140.0)
    np.testing.assert_array_equal(widget.preview_layer.data > 0, disc((40, 50), 25, 20, 2 * R))

    # New contrast limits = another 8-bit image for SAM: a new cache, SAM runs again.
    image.contrast_limits = (80.0, 120.0)
    settle(qtbot, widget)
    assert len(caches) == 2 and widget.session.window == Window(80.0, 120.0)
    assert widget.backend.loaded == [("fake", "auto", "auto")]  # the model itself is kept
    widget.commit()
    np.testing.assert_array_equal(widget.labels_layer.data == 1, disc((40, 50), 25, 20, 2 * R))


def test_speed_choice_reloads_the_model_at_that_precision(make_widget, qtbot):
    viewer, _image, widget = make_widget(VOLUME)
    viewer.dims.set_current_step(0, 2)
    widget.points_layer.add([2, 20, 20])
    settle(qtbot, widget)
    assert widget.backend.loaded == [("fake", "auto", "auto")]  # fast by default
    widget.speed_combo.setCurrentIndex(widget.speed_combo.findData("exact"))
    widget.points_layer.add([2, 20, 30])
    settle(qtbot, widget)
    assert widget.backend.loaded[-1] == ("fake", "auto", "exact")
    assert len(widget.backend.caches) == 2  # exact embeddings are not the fast ones


def test_polygon_is_a_box_plus_mask_prompt(make_widget, qtbot):
    viewer, _image, widget = make_widget(VOLUME)
    viewer.dims.set_current_step(0, 1)
    triangle = [[1, 10, 10], [1, 10, 40], [1, 40, 10]]
    widget.boxes_layer.add(triangle, shape_type="polygon")
    settle(qtbot, widget)
    prompts = widget.backend.predictor.calls[-1]["prompts"]
    np.testing.assert_array_equal(prompts.box, [10, 10, 40, 40])
    assert prompts.mask[15, 15] and not prompts.mask[35, 35]  # inside / outside the triangle
    np.testing.assert_array_equal(
        preview_slice(widget, 1), prompts.mask | _box_mask(10, 10, 40, 40)
    )


def _box_mask(x0, y0, x1, y1, shape=(48, 64)):
    mask = np.zeros(shape, bool)
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def test_segment_everything_commits_new_ids_in_one_undo_step(make_widget, qtbot):
    viewer, _image, widget = make_widget(VOLUME)
    _commit_disc(widget, qtbot, 5, 20, 20)  # label 1, under the first automatic object
    labels = widget.labels_layer
    first = labels.data[5].copy()
    viewer.dims.set_current_step(0, 5)
    widget.everything_button.click()
    settle(qtbot, widget)
    shape = (48, 64)
    np.testing.assert_array_equal(labels.data[5] == 1, first)  # keep: label 1 untouched
    np.testing.assert_array_equal(labels.data[5] == 2, disc(shape, 30, 20, 6) & (first == 0))
    np.testing.assert_array_equal(labels.data[5] == 3, disc(shape, 50, 30, 4))
    assert "found 2 object(s), 2 added (labels 2-3)" in widget.status.text()
    assert widget.committed(widget.frame()) == {1: [5], 2: [5], 3: [5]}
    labels.undo()
    np.testing.assert_array_equal(labels.data[5], first)

    # Cancelled while running: nothing is written.
    widget.backend.step_delay = 0.3
    widget.segment_everything()
    qtbot.waitUntil(lambda: "everything 1/2" in widget.status.text(), timeout=5000)
    widget.cancel_button.click()
    settle(qtbot, widget)
    assert widget.status.text() == "Cancelled: nothing was written."
    np.testing.assert_array_equal(labels.data[5], first)


def test_engine_errors_are_shown_and_the_next_prompt_retries(make_widget, qtbot):
    class Broken(FakeBackend):
        fail = True

        def load_model(self, source, device, precision):
            if self.fail:
                raise FileNotFoundError("weights.pth is not a checkpoint file")
            return super().load_model(source, device, precision)

    viewer, _image, widget = make_widget(VOLUME, backend=Broken())
    viewer.dims.set_current_step(0, 2)
    widget.points_layer.add([2, 20, 20])
    settle(qtbot, widget)
    assert widget.status.text() == "weights.pth is not a checkpoint file"
    assert widget.result is None and not widget.progress.isVisible()

    widget.backend.fail = False
    widget.points_layer.add([2, 20, 30])
    settle(qtbot, widget)
    assert widget.last_error is None and widget.preview_layer.data[2].any()


def test_model_download_progress_and_cancel(make_widget, qtbot):
    options = [ModelOption("vit_x", "vit_x — will download 1 MB", False, True, 1_000_000)]
    viewer, _image, widget = make_widget(VOLUME, backend=FakeBackend(models=options))
    viewer.dims.set_current_step(0, 0)
    widget.set_model(object(), name="mine")  # a model added by hand stays listed throughout
    widget.model_combo.setCurrentIndex(0)
    assert widget.download_button.isVisibleTo(widget)

    # The first prompt starts the download in the background; Cancel keeps nothing.
    widget.points_layer.add([0, 10, 10])
    assert widget.downloads.busy and not widget.jobs.busy
    qtbot.waitUntil(lambda: widget.download_progress.value() > 0, timeout=5000)
    widget.download_cancel_button.click()
    qtbot.waitUntil(lambda: not widget.downloads.busy, timeout=5000)
    assert "cancelled" in widget.status.text() and widget.backend.downloads == []
    assert widget.result is None and widget.download_button.isVisibleTo(widget)

    # The Download button: once the model is there, SAM runs on the waiting prompt.
    widget.download_button.click()
    qtbot.waitUntil(lambda: not widget.downloads.busy, timeout=5000)
    assert widget.backend.downloads == ["vit_x"]
    assert widget.model_combo.currentText() == "vit_x — cached"
    assert widget.model_combo.itemText(1) == "in memory: mine"
    assert not widget.download_button.isVisibleTo(widget)
    widget.points_layer.add([0, 10, 30])
    settle(qtbot, widget)
    assert widget.preview_layer.data[0].any()


def test_real_key_presses_on_the_canvas(make_widget, qtbot):
    """Keys typed into napari's canvas reach the widget, also over layer defaults."""
    from qtpy.QtCore import Qt

    viewer, _image, widget = make_widget(VOLUME)
    for key in KEYS:
        assert _kb(key) in viewer.keymap
        assert _kb(key) in widget.points_layer.keymap and _kb(key) in widget.boxes_layer.keymap
    canvas = viewer.window._qt_viewer.canvas.native
    viewer.layers.selection.active = widget.boxes_layer
    qtbot.keyClick(canvas, Qt.Key.Key_T)  # Shapes' own T would switch to path mode
    assert widget.boxes_layer.mode == "add_rectangle"
    assert "negative" in widget.sign_button.text()
    qtbot.keyClick(canvas, Qt.Key.Key_T)

    viewer.dims.set_current_step(0, 2)
    viewer.layers.selection.active = widget.points_layer
    widget.points_layer.add([2, 20, 20])
    settle(qtbot, widget)
    qtbot.keyClick(canvas, Qt.Key.Key_C)
    assert (widget.labels_layer.data[2] == 1).sum() == disc((48, 64), 20, 20, 2 * R).sum()
    qtbot.keyClick(canvas, Qt.Key.Key_S, Qt.KeyboardModifier.ShiftModifier)
    assert widget.jobs.name == "propagate"
    settle(qtbot, widget)
    assert all(widget.labels_layer.data[z].any() for z in range(8))


def test_closing_the_widget_releases_the_viewer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(VOLUME)
    widget = SamWidget(viewer, backend=FakeBackend())
    dock = viewer.window.add_dock_widget(widget)
    points, calls = widget.points_layer, widget.backend.predictor.calls
    assert _kb("C") in viewer.keymap
    viewer.window.remove_dock_widget(dock)  # napari deletes the dock and the widget in it
    qtbot.waitUntil(lambda: _kb("C") not in viewer.keymap, timeout=5000)
    viewer.dims.set_current_step(0, 1)
    points.add([1, 10, 10])  # nothing listens any more: no job, no error
    viewer.layers.remove(points)
    qtbot.wait(50)
    assert calls == []


def test_manifest_opens_the_widget_with_registry_models(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(VOLUME)
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-volumes", "Segment Anything")
    assert isinstance(widget, SamWidget) and widget.viewer is viewer
    assert widget.labels_combo.count() == 1  # its own preview layer is no target
    labels = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    # Nothing is cached in the test's model folder: each registry model says what it costs.
    assert any(t.startswith("vit_b — will download 375 MB, Apache-2.0") for t in labels)
    # MedSAM downloads from the Hugging Face Hub (transformers format).
    assert any(t.startswith("medsam_vit_b — will download 375 MB") for t in labels)
    assert not any("test" in t for t in labels)  # the test fixture model is never offered
    assert widget.download_button.isVisibleTo(widget)
    # napari's console gets the widget and the scripting session (weak references until the
    # console is first opened).
    names = {}
    for item in viewer.window._qt_viewer.console_backlog:
        names.update({k: v() if isinstance(v, weakref.ref) else v for k, v in item.items()})
    assert names["sam_widget"] is widget
    assert names["sam_session"] is widget.console_session
    widget.cleanup()


def test_switching_images_replaces_the_prompt_layers_in_one_batch(make_widget, qtbot):
    """The widget's own layers go in one batched removal: napari collects garbage once per
    batch (0.17 s with torch loaded) instead of once per removed layer."""
    viewer, _image, widget = make_widget(np.zeros((3, 20, 30), np.float32))
    old = [widget.points_layer, widget.boxes_layer]
    events = []
    viewer.layers.events.begin_batch.connect(lambda e: events.append("begin"))
    viewer.layers.events.end_batch.connect(lambda e: events.append("end"))
    viewer.layers.events.removed.connect(lambda e: events.append("removed"))
    viewer.add_image(np.zeros((4, 20, 30), np.float32), name="other")
    widget.image_combo.setCurrentIndex(widget.image_combo.findText("other"))
    assert events == ["begin", "removed", "removed", "removed", "end"]
    assert widget.points_layer not in old and widget.points_layer in viewer.layers
    assert widget.points_layer.data.shape[1] == 3  # prompts in the new image's dimensions


@pytest.mark.slow  # four layer removals, each a full garbage collection in napari
def test_removing_layers_down_to_a_2d_viewer_keeps_the_widget_working(make_widget, qtbot):
    """Regression: with fewer viewer dims than the image has (layers being removed), the
    widget's slicing fell over (IndexError in _layer_axes)."""
    viewer, image, widget = make_widget(VOLUME)
    flat = viewer.add_image(np.zeros((48, 64), np.float32), name="flat")
    errors = []
    widget.set_status = lambda text, error=False: errors.append(text) if error else None
    # One by one, as a user deletes them: the widget's own 3D layers, then the 3D image (the
    # viewer drops to 2 dims while the widget still works on that image).
    for layer in [widget.points_layer, widget.boxes_layer, widget.preview_layer, image]:
        viewer.layers.remove(layer)
    assert viewer.dims.ndim == 2 and errors == []
    assert widget.image_layer is flat and widget.frame().axis is None
    assert not widget.axis_combo.isEnabled()
    widget.points_layer.add([20, 30])
    settle(qtbot, widget)
    np.testing.assert_array_equal(widget.preview_layer.data > 0, disc((48, 64), 30, 20, 2 * R))


def test_download_button_shows_the_model_name_as_written(make_widget):
    """Regression: "Download vit_b" showed as "Download vit  b"."""
    from napari_sam._napari._models import button_text

    options = [ModelOption("vit_b", "vit_b — will download 375 MB", False, True, 375_000_000)]
    _viewer, _image, widget = make_widget(VOLUME, backend=FakeBackend(models=options))
    button = widget.download_button
    assert button.text() == "Download vit_b 375 MB"
    assert button_text("R&D_model") == "R&&D_model"  # Qt shows "&&" as "&", not a mnemonic

    def painted(text):
        button.setText(text)
        image = button.grab().toImage()
        bits = image.constBits()
        bits.setsize(image.sizeInBytes())
        return np.frombuffer(bits, np.uint8).copy()

    # The underscore is painted: the button differs from one with a space in its place.
    assert (painted("Download vit_b 375 MB") != painted("Download vit b 375 MB")).any()


def test_dock_leaves_most_of_the_default_window_to_the_canvas(make_widget, qtbot):
    viewer, _image, widget = make_widget(VOLUME)
    window = viewer.window._qt_window
    window.show()
    qtbot.waitExposed(window)
    width = window.width()
    hint, minimum = widget.sizeHint().width(), widget.minimumSizeHint().width()
    print(f"main window {width} px, dock sizeHint {hint} px, minimumSizeHint {minimum} px")
    assert hint <= width / 3 and minimum <= width / 3
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.waitUntil(lambda: canvas.width() > 0, timeout=5000)
    assert canvas.width() >= widget.width(), (canvas.width(), widget.width())
    # Folding a section gives its height back.
    section = widget.sections["model"]
    section.set_expanded(False)
    assert not section.expanded and not widget.model_combo.isVisibleTo(widget)

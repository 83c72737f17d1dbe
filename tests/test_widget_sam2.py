"""The widget with a SAM 2 model: single-slice preview from SAM 2's image predictor, Propagate
by tracking (background, one undo step), the same labels as a VolumeSession script.

The model is the package's SAM 2.1 hiera-tiny at a 128 px input with random weights (object
score lifted so that objects are seen), as in test_session_tracking.py: the real code path;
mask quality is not the point. Run under Xvfb.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_sam._napari._backend import Backend
from napari_sam._napari.widget import SamWidget
from napari_sam.models.sam2.build import build_sam2
from napari_sam.registry import get_spec
from napari_sam.sam2_predictor import Sam2ImagePredictor
from napari_sam.volume.sam2_features import FeatureCache
from napari_sam.volume.session import VolumeSession
from volume_helpers import one_torch_thread  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.gui

Z, H, W = 8, 45, 37


@pytest.fixture(scope="module")
def sam2_model():
    torch.manual_seed(0)
    model = build_sam2(get_spec("sam2.1_hiera_tiny").replace(image_size=128))
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 3.0
    return model.eval()


def blob_volume() -> np.ndarray:
    zz, yy, xx = np.mgrid[:Z, :H, :W]
    blob = (yy - 22) ** 2 + (xx - 18) ** 2 < (10 - np.abs(zz - 4)) ** 2
    return (200 * blob + np.random.default_rng(0).normal(30, 5, (Z, H, W))).astype(np.float32)


class NoDiskCache(Backend):
    def cache_dir(self):
        return None


def settle(qtbot, widget, timeout=120000):
    qtbot.waitUntil(lambda: not widget.jobs.busy and not widget.pending, timeout=timeout)


def test_model_chooser_lists_sam2_models():
    sources = [o.source for o in Backend().model_options()]
    for name in ("sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_large", "medsam2"):
        assert name in sources


@pytest.mark.slow  # SAM 2 encodes 8 slices and tracks them: ~15 s on a busy 2-core CPU
def test_sam2_preview_commit_and_propagate_by_tracking(make_napari_viewer, qtbot, sam2_model):
    volume = blob_volume()
    viewer = make_napari_viewer()
    viewer.add_image(volume, name="volume")
    widget = SamWidget(viewer, backend=NoDiskCache())
    viewer.window.add_dock_widget(widget)
    widget.set_model(sam2_model, "sam2 test")
    widget.window_combo.setCurrentIndex(widget.window_combo.findData("minmax"))

    viewer.dims.set_current_step(0, 4)
    widget.points_layer.add([4, 22, 18])
    settle(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    session = widget.session
    assert isinstance(session.predictor, Sam2ImagePredictor)
    assert isinstance(session.cache, FeatureCache)

    # The same precision as the widget's (its default "auto" is bf16 on CPUs with AMX).
    precision = widget.speed_combo.currentData() or "auto"
    script = VolumeSession(volume, model=sam2_model, window="minmax", precision=precision)
    answer = script.preview(4, points=[[18, 22]])  # one click: three masks, the best shown
    best = answer.masks[int(np.argmax(answer.scores))]
    np.testing.assert_array_equal(widget.preview_layer.data[4].astype(bool), best)
    assert best.any()

    widget.commit()
    labels = widget.labels_layer
    np.testing.assert_array_equal(labels.data[4] == 1, best)

    widget.propagate()
    assert widget.jobs.busy and widget.cancel_button.isEnabled()  # background, cancellable
    settle(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    assert "Propagation done" in widget.status.text()

    # The script's propagation with SAM 2 parts tracks; the widget's writes the same labels.
    script.add_mask(4, best, label_id=1)
    script.propagate()
    np.testing.assert_array_equal(labels.data, script.labels)
    tracked = [i for i in range(Z) if i != 4 and (labels.data[i] == 1).any()]
    assert tracked, "tracking wrote no slice besides the seed"

    # The whole tracking run is one undo step: the committed slice stays.
    labels.undo()
    np.testing.assert_array_equal(labels.data[4] == 1, best)
    assert not np.delete(labels.data, 4, axis=0).any()
    script.close()

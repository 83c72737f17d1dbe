"""Remote encoding from the widget and the session: an in-process dask LocalCluster encodes,
prompting stays local; a dead address falls back to local encoding with a message. Run under
Xvfb."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
pytest.importorskip("distributed")

import distributed

from napari_sam._napari._backend import Backend
from napari_sam._napari.widget import SamWidget
from napari_sam.volume.session import VolumeSession
from testmodel import TEST_MODEL_PATH, load_test_model
from volume_helpers import one_torch_thread  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.gui

SHAPE = (4, 40, 56)
BOX = [10, 8, 34, 30]  # x0, y0, x1, y1 around the disc below


def volume():
    data = np.random.default_rng(5).normal(80, 20, SHAPE).astype(np.float32)
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    data[:, (yy - 19) ** 2 + (xx - 22) ** 2 <= 81] += 300
    return data


class Quick(Backend):
    """The real engine, memory-only embeddings (a disk hit would skip the encoder)."""

    remote_timeout = 3.0

    def cache_dir(self):
        return None


@pytest.fixture(scope="module")
def cluster():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dask's notes about ports and threads
        local = distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        )
    yield local
    local.close()


def settle(qtbot, widget, timeout=60000):
    qtbot.waitUntil(lambda: not widget.jobs.busy and not widget.pending, timeout=timeout)


@pytest.mark.slow  # a cluster, a model loaded on its worker, three encodings: ~10 s when busy
def test_widget_encodes_on_the_cluster_and_falls_back_to_local(
    make_napari_viewer, qtbot, cluster, monkeypatch
):
    address = cluster.scheduler_address
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", address)
    viewer = make_napari_viewer()
    viewer.add_image(volume(), name="volume")
    widget = SamWidget(viewer, backend=Quick())
    viewer.window.add_dock_widget(widget)
    assert widget.encoding == address  # the environment's scheduler is the default
    widget.set_encoding("local")
    assert widget.encoding == "local"
    widget.set_checkpoint(TEST_MODEL_PATH)  # by path: the workers load the same file
    messages = []
    widget.status.setText = lambda text, f=widget.status.setText: (messages.append(text), f(text))
    viewer.dims.set_current_step(0, 2)
    widget.boxes_layer.add(
        [[2, BOX[1], BOX[0]], [2, BOX[1], BOX[2]], [2, BOX[3], BOX[2]], [2, BOX[3], BOX[0]]],
        shape_type="rectangle",
    )
    settle(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    local = widget.preview_layer.data[2].astype(bool).copy()
    assert widget.session.encoder is None and local.sum() > 100

    # The cluster encodes the slice again (a new cache), the mask is the same.
    widget.set_encoding(address)
    settle(qtbot, widget)
    encoder = widget.session.encoder
    assert (encoder.remote_slices, encoder.local_slices) == (1, 0)
    assert f"Encoding on {address}." in messages
    np.testing.assert_array_equal(widget.preview_layer.data[2].astype(bool), local)

    # A scheduler that is not there: encoded locally, said in the status line, Retry offered.
    dead = "tcp://127.0.0.1:9"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the encoder's own warning
        widget.set_encoding(dead)
        settle(qtbot, widget)
        qtbot.waitUntil(lambda: widget.encoding_retry_button.isVisibleTo(widget), timeout=10000)
    assert encoder.address == address and widget.session.encoder.address == dead
    assert (widget.session.encoder.remote_slices, widget.session.encoder.local_slices) == (0, 1)
    status = widget.status.text()
    assert f"Remote encoding on {dead} failed" in status and "encoding locally" in status
    np.testing.assert_array_equal(widget.preview_layer.data[2].astype(bool), local)
    # The fallback note stays under later messages until Retry.
    widget.set_status("something else")
    assert "encoding locally" in widget.status.text()
    widget.retry_encoding()
    assert not widget.encoding_retry_button.isVisibleTo(widget)
    assert widget.session.encoder.remote  # the next slice tries the cluster again
    assert "encoding locally" not in widget.status.text()

    # Closing the widget closes the encoder the session made.
    widget.cleanup()
    assert widget.session.encoder is None


@pytest.mark.slow  # shares the cluster above
def test_session_encoding_option_owns_its_encoder(cluster):
    data = volume()
    box = np.array(BOX, float)
    with VolumeSession(data, load_test_model(), precision=None) as local:
        want = local.preview(2, box=box, multimask=False).masks[0]
    with VolumeSession(
        data, str(TEST_MODEL_PATH), device="cpu", encoding=cluster.scheduler_address
    ) as session:
        encoder = session.encoder
        got = session.preview(2, box=box, multimask=False).masks[0]
        assert (encoder.remote_slices, encoder.local_slices) == (1, 0)
        session.set_encoding("local")  # closes it; the next cache encodes here
        assert session.encoder is None
        assert session.preview(1, box=box, multimask=False).masks.shape == (1, *SHAPE[1:])
        assert encoder.remote_slices == 1
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="not a model object"):
        VolumeSession(data, load_test_model(), encoding=cluster.scheduler_address)
    with pytest.raises(ValueError, match="encode_fn= or encoding="):
        VolumeSession(data, str(TEST_MODEL_PATH), encoding="tcp://x:1", encode_fn=lambda m, i: None)

"""VolumeSession's lifecycle, writer and parts with a fake model (control flow, exact numbers).

Quality with a real model is in test_session.py; these check what the widget and console rely
on: re-targeting without rebuilding, writes through a LabelsWriter with undo steps, objects per
labels and axis, and model work through SessionParts.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.volume.labels_writer import ArrayWriter
from napari_sam.volume.parts import SessionParts
from napari_sam.volume.propagation import Step
from napari_sam.volume.session import VolumeSession


class FakeCache:
    def __init__(self, volume, axis):
        self.axis, self.encoded = axis, []
        self.slice_shape = tuple(s for i, s in enumerate(volume.shape[:3]) if i != axis)

    def has(self, index):
        return index in self.encoded

    def get(self, index):
        self.encoded.append(index)
        return None, self.slice_shape, self.slice_shape


class FakeParts(SessionParts):
    """A box prompt gives the filled box; propagation copies each seed to every other slice."""

    def __init__(self):
        super().__init__()
        self.caches, self.calls = [], []

    def make_predictor(self, model):
        return {"model": model}

    def make_cache(self, model, volume, axis, window, cache_dir, **options):
        self.caches.append(FakeCache(volume, axis))
        return self.caches[-1]

    def embed(self, cache, predictor, index):
        cache.get(index)
        predictor["shape"] = cache.slice_shape

    def predict(self, predictor, *, points, point_labels, box, mask, mask_input, multimask):
        self.calls.append({"box": box, "mask": mask, "mask_input": mask_input})
        out = np.zeros(predictor["shape"], bool)
        x0, y0, x1, y1 = np.asarray(box, int)
        out[y0 : y1 + 1, x0 : x1 + 1] = True
        return out[None], np.array([0.9]), np.zeros((1, 4, 4), np.float32)

    def propagate(self, cache, predictor, seeds, *, slice_range=None):
        lo, hi = slice_range or (0, 6)
        for done, index in enumerate(range(lo, hi), 1):
            masks = {k: s[min(s)] for k, s in seeds.items() if index not in s}
            yield Step(index, masks, done=done, total=hi - lo)


def make(shape=(6, 10, 12), **kwargs):
    return VolumeSession(np.zeros(shape, np.float32), model=object(), parts=FakeParts(), **kwargs)


def test_preview_writes_nothing_and_commit_is_one_undo_step():
    session = make()
    result = session.preview(2, box=[1, 2, 4, 5])
    assert session.labels.sum() == 0 and result.masks.shape == (1, 10, 12)
    assert result.all_logits.shape == (1, 4, 4) and session.is_encoded(2)
    label = session.commit()
    assert label == 1 and session.objects == {1: [2]}
    assert (session.labels[2] == 1).sum() == 4 * 4
    session.undo()
    assert session.labels.sum() == 0
    # The undone object's id is free again (as in napari); its stale seed is no seed.
    assert session.next_label_id() == 1 and session.seeds() == {}


def test_propagation_is_computed_then_written_as_one_undo_step():
    session = make()
    box = np.zeros((10, 12), bool)
    box[3:6, 4:8] = True
    session.add_mask(1, box, label_id=3)
    steps = list(session.propagation_steps(slice_range=(0, 4)))  # computed, nothing written
    assert [s.index for s in steps] == [0, 1, 2, 3] and (session.labels == 3).sum() == 12
    changed = [session.write_step(s) for s in steps]
    assert changed == [12, 0, 12, 12]
    summary = session.propagate(slice_range=(4, 6))
    assert summary.slices == 2 and summary.changed_voxels == 24
    session.undo()  # the whole propagate() run
    assert [int((session.labels[z] == 3).sum()) for z in range(6)] == [12, 12, 12, 12, 0, 0]


def test_objects_belong_to_labels_and_axis_and_come_back():
    session = make()
    first = session.labels
    session.add_mask(0, np.ones((10, 12), bool))
    session.set_axis(1)
    assert session.objects == {} and session.slice_shape == (6, 12)
    session.set_axis(0)
    assert session.objects == {1: [0]}
    other = np.zeros((6, 10, 12), np.uint16)
    session.set_labels(other)
    assert session.objects == {} and session.labels is other
    session.set_labels(first)
    assert session.objects == {1: [0]}


def test_retarget_keeps_the_model_and_rebuilds_embeddings_lazily():
    session = make()
    model, parts = session.model, session.parts
    session.preview(0, box=[0, 0, 1, 1])
    session.set_volume(np.zeros((3, 8, 8), np.float32), window=(0.0, 1.0))
    assert session.model is model and len(parts.caches) == 1  # no cache until needed
    assert session.labels.shape == (3, 8, 8) and session.objects == {}
    session.preview(1, box=[0, 0, 1, 1])
    assert len(parts.caches) == 2 and parts.caches[-1].slice_shape == (8, 8)
    session.set_window((0.0, 2.0))
    session.preview(1, box=[0, 0, 1, 1])
    assert len(parts.caches) == 3


def test_add_objects_takes_new_ids_and_keeps_existing_labels():
    session = make()
    session.add_mask(2, np.pad(np.ones((2, 2), bool), ((0, 8), (0, 10))), label_id=5)
    found = np.zeros((10, 12), np.int32)
    found[0:3, 0:3] = 1  # overlaps label 5 at [0:2, 0:2]
    found[6:8, 6:8] = 2
    assert session.add_objects(2, found) == [6, 7]
    assert (session.labels[2] == 5).sum() == 4 and (session.labels[2] == 6).sum() == 5
    assert session.objects == {5: [2], 6: [2], 7: [2]}
    session.undo()
    assert set(np.unique(session.labels)) == {0, 5}


def test_remove_object_is_undoable_and_hooks_see_each_use():
    needs = []
    session = make()
    session.before_use = lambda s, n: needs.append(sorted(n))
    session.add_mask(1, np.ones((10, 12), bool), label_id=2)
    session.preview(1, box=[0, 0, 2, 2])
    assert needs == [["labels"], ["model"]]
    assert session.remove_object(2) == 120 and session.objects == {}
    session.undo()
    assert (session.labels == 2).sum() == 120


def test_array_writer_bounds_its_history():
    labels = np.zeros((2, 4, 4), np.uint8)
    writer = ArrayWriter(labels, max_undo=2)
    for value in (1, 2, 3):
        with writer.undo_step():
            writer.write(0, np.array([0]), np.array([0]), value)
    writer.undo()
    writer.undo()
    assert labels[0, 0, 0] == 1
    with pytest.raises(ValueError, match="nothing to undo"):
        writer.undo()


def test_a_session_without_volume_or_model_says_what_to_do():
    session = VolumeSession(model=None, parts=FakeParts())
    with pytest.raises(ValueError, match="no volume"):
        session.preview(0, box=[0, 0, 1, 1])
    session.set_volume(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="no model"):
        session.preview(0, box=[0, 0, 1, 1])

"""The widget's Qt-free parts: slicing frames, prompt bookkeeping, propagation seeds."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam._napari._slicing import SliceFrame
from napari_sam.prompts import Prompts
from napari_sam.volume.session import VolumeSession


def test_3d_frame_maps_points_and_masks_both_ways():
    frame = SliceFrame.for_layer((10, 20, 30), axis=1)
    assert frame.plane == (0, 2) and frame.slice_shape == (10, 30) and frame.n_slices == 20
    assert frame.locate(np.array([3.2, 7.6, 12.0])) == (8, 3.2, 12.0)
    assert frame.locate(np.array([3.0, 20.4, 1.0])) is None  # beyond the last slice
    labels = np.zeros((10, 20, 30), np.uint16)
    rows, cols = np.array([1, 2]), np.array([5, 6])
    labels[frame.nd_index(8, rows, cols)] = 3
    assert labels[1, 8, 5] == 3 and labels[2, 8, 6] == 3 and labels.sum() == 6
    view = frame.slice_of(labels, 8)
    assert view.shape == (10, 30) and np.shares_memory(view, labels)


def test_4d_frame_holds_the_time_point_and_drops_it_for_the_engine():
    data = np.arange(3 * 4 * 5 * 6).reshape(3, 4, 5, 6)
    frame = SliceFrame.for_layer(data.shape, axis=None, point=np.array([1.7, 0, 0, 0]))
    assert frame.axis == 1 and frame.fixed == ((0, 2),) and frame.plane == (2, 3)
    volume = frame.volume(data)
    np.testing.assert_array_equal(volume, data[2])
    assert frame.engine_axis == 0
    assert frame.locate(np.array([1.0, 3.0, 2.0, 4.0])) is None  # another time point
    assert frame.locate(np.array([2.0, 3.0, 2.0, 4.0])) == (3, 2.0, 4.0)
    # Slicing along the time axis instead: the z axis is then held fixed.
    along_t = SliceFrame.for_layer(data.shape, axis=0, point=np.array([0, 2, 0, 0]))
    assert along_t.fixed == ((1, 2),) and along_t.engine_axis == 0
    np.testing.assert_array_equal(along_t.volume(data), data[:, 2])


def test_2d_and_rgb_frames_are_one_slice():
    frame = SliceFrame.for_layer((40, 50), rgb=True)
    rgb = np.zeros((40, 50, 3), np.uint8)
    assert frame.n_slices == 1 and frame.volume(rgb).shape == (1, 40, 50, 3)
    assert frame.locate(np.array([10.0, 20.0])) == (0, 10.0, 20.0)
    with pytest.raises(ValueError, match="2 coordinates"):
        frame.locate(np.array([1.0, 2.0, 3.0]))


def test_bad_frames_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="must not be one of the plane axes"):
        SliceFrame.for_layer((4, 5, 6), axis=1, plane=(1, 2))
    with pytest.raises(ValueError, match="needs 1 fixed"):
        SliceFrame((3, 4, 5, 6), axis=1)
    with pytest.raises(ValueError, match="outside axis 0"):
        SliceFrame((3, 4, 5, 6), axis=1, fixed=((0, 3),))


def test_prompts_extend_only_by_added_clicks():
    one = Prompts(np.array([[1.0, 2.0]]), np.array([1]))
    two = Prompts(np.array([[1.0, 2.0], [5.0, 5.0]]), np.array([1, 0]))
    moved = Prompts(np.array([[1.5, 2.0], [5.0, 5.0]]), np.array([1, 0]))
    boxed = Prompts(two.points, two.labels, box=np.array([0.0, 0, 9, 9]))
    assert two.extends(one)
    assert not moved.extends(one) and not one.extends(one) and not boxed.extends(one)
    assert one.key() == Prompts(np.array([[1.0, 2.0]]), np.array([1])).key()
    assert Prompts().empty and not one.empty


def test_seed_masks_from_commits_and_from_painted_labels():
    """The widget's propagation seeds are the session's (no model needed to read them)."""
    labels = np.zeros((6, 8, 8), np.uint16)
    labels[2, 1:4, 1:4] = 1
    labels[4, 5:7, 5:7] = 2
    labels[5, 0, 0] = 2
    session = VolumeSession(np.zeros((6, 8, 8), np.float32), model=None, labels=labels)
    session.annotate(1, 2)
    session.annotate(1, 3)
    seeds = session.seeds()
    assert list(seeds) == [1] and list(seeds[1]) == [2]  # slice 3 holds nothing of label 1
    np.testing.assert_array_equal(seeds[1][2], labels[2] == 1)
    # The selected label, never committed but painted on two slices: both are seeds.
    painted = session.seeds([2])
    assert list(painted) == [2] and sorted(painted[2]) == [4, 5]
    assert session.seeds([7]) == {}

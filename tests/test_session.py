"""VolumeSession with the small trained test model: quality of box + propagation, several objects,
NIfTI geometry (synthetic and the real MNI152 MRI), preview/refine, cancel, cache reuse, errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from conftest import SHARED_DATA
from napari_sam.io.nifti import read_nifti
from napari_sam.predictor import encode_image
from napari_sam.prompts import mask_to_box
from napari_sam.training.synthetic import ellipsoid_volume
from napari_sam.volume.propagation import merge_masks
from napari_sam.volume.session import VolumeSession
from testmodel import load_test_model
from volume_helpers import dice, one_torch_thread  # noqa: F401 (autouse fixture)

MNI_T1 = SHARED_DATA / "mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


@pytest.fixture(scope="module")
def model():
    return load_test_model()


@pytest.fixture(scope="module")
def scene():
    """Two ellipsoids in a textured, noisy volume (held out: seed unseen in training)."""
    volume, truth = ellipsoid_volume(np.random.default_rng(2024), (28, 128, 160), n_objects=2)
    return volume, truth


def middle_box(truth: np.ndarray, label: int, axis: int = 0, margin: int = 2):
    """The slice where an object is largest and its bounding box with a margin."""
    obj = np.moveaxis(truth == label, axis, 0)
    z = int(np.argmax(obj.sum(axis=(1, 2))))
    x0, y0, x1, y1 = mask_to_box(obj[z])
    h, w = obj.shape[1:]
    box = [max(x0 - margin, 0), max(y0 - margin, 0), min(x1 + margin, w), min(y1 + margin, h)]
    return z, box


def test_box_on_middle_slice_propagates_to_dice_0_9(model, scene):
    volume, truth = scene
    with VolumeSession(volume, model) as session:
        z, box = middle_box(truth, 1)
        mask = session.segment_slice(z, box=box, label_id=1, multimask=False)
        assert iou(mask, truth[z] == 1) >= 0.9
        summary = session.propagate([1])
        d = dice(session.labels == 1, truth == 1)
        print(f"box + propagation Dice {d:.3f} over {summary.slices} slices")
        assert d >= 0.9
        present = np.flatnonzero((truth == 1).any(axis=(1, 2)))
        lo, hi = summary.extent[1]
        assert abs(lo - present[0]) <= 2 and abs(hi - present[-1]) <= 2


def test_multimask_propagation_resizes_only_the_best_mask_and_keeps_it(model, scene):
    from napari_sam.predictor import SamPredictor
    from napari_sam.volume.propagation import propagate

    class AllThree(SamPredictor):
        """Answers "best" with all three masks, as a boolean-only predictor would."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.requests = []

        def predict_torch(self, *args, multimask_output=True, **kwargs):
            self.requests.append(multimask_output)
            return super().predict_torch(*args, multimask_output=bool(multimask_output), **kwargs)

    volume, truth = scene
    with VolumeSession(volume, model) as session:
        z, _ = middle_box(truth, 1)
        seeds = {1: {z: truth[z] == 1}}
        walks = []
        all_three = AllThree(model)
        for predictor in (session.predictor, all_three):
            steps = propagate(session.cache, predictor, seeds, multimask=True)
            walks.append({s.index: s.masks.get(1) for s in steps})
    assert all_three.requests and set(all_three.requests) == {"best"}
    best, three = walks
    assert best.keys() == three.keys() and len(best) >= 8
    for index, mask in best.items():
        assert (mask is None) == (three[index] is None)
        if mask is not None:
            np.testing.assert_array_equal(mask, three[index])


def test_two_objects_in_one_batched_call_per_slice(model, scene):
    volume, truth = scene
    # Both objects are segmented on the slice where the smaller of the two is largest.
    areas = np.stack([(truth == label).sum(axis=(1, 2)) for label in (1, 2)])
    z = int(np.argmax(areas.min(axis=0)))
    with VolumeSession(volume, model) as session:
        for label in (1, 2):
            x0, y0, x1, y1 = mask_to_box(truth[z] == label)
            box = [x0 - 2, y0 - 2, x1 + 2, y1 + 2]
            session.segment_slice(z, box=box, label_id=label, multimask=False)
        calls = []
        decode = session.predictor.predict_torch

        def counting(*args, **kwargs):
            out = decode(*args, **kwargs)
            calls.append(out[0].shape[0])
            return out

        session.predictor.predict_torch = counting
        steps = list(session.propagate_iter())
        assert len(calls) == len(steps)  # one decoder call per slice...
        assert calls.count(2) >= 4  # ...answering both objects wherever both go on
        for label in (1, 2):
            d = dice(session.labels == label, truth == label)
            print(f"object {label}: Dice {d:.3f}")
            assert d >= 0.85


def test_propagation_along_another_axis(model, scene):
    volume, truth = scene
    with VolumeSession(volume, model, axis=2) as session:
        x, box = middle_box(truth, 1, axis=2)
        assert session.slice_shape == (28, 128)
        session.segment_slice(x, box=box, label_id=1, multimask=False)
        session.propagate()
        d = dice(session.labels == 1, truth == 1)
        print(f"axis 2 Dice {d:.3f}")
        assert d >= 0.85


def _lps_nifti(path, volume: np.ndarray) -> nib.Nifti1Image:
    """Store a display-space volume in a file with LPS-like axes and anisotropic voxels."""
    data = np.ascontiguousarray(np.transpose(volume, (2, 1, 0))[::-1])  # file axes (x, y, z)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    affine[:3, 3] = [40.0, 60.0, -30.0]
    img = nib.Nifti1Image(data.astype(np.int16) * 4 - 200, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return img


def test_nifti_in_labels_out_with_exact_geometry(model, scene, tmp_path):
    volume, truth = scene
    source = tmp_path / "scan.nii.gz"
    img = _lps_nifti(source, volume)
    with VolumeSession(source, model) as session:
        shown = read_nifti(source)
        assert session.volume.shape == shown.data.shape
        truth_shown = read_nifti_like(truth, tmp_path, img)
        z, box = middle_box(truth_shown, 1)
        session.segment_slice(z, box=box, label_id=1, multimask=False)
        session.propagate()
        assert dice(session.labels == 1, truth_shown == 1) >= 0.85
        out = session.save(tmp_path / "labels.nii.gz")
        labels = session.labels.copy()
    saved = nib.load(out)
    np.testing.assert_array_equal(saved.affine, img.affine)
    assert saved.shape == img.shape and saved.header.get_intent()[0] == "label"
    assert saved.header["qform_code"] == 1 and saved.header["sform_code"] == 1
    # In the file's own voxel order the object sits where it is in the scan.
    file_truth = np.transpose(truth, (2, 1, 0))[::-1] == 1
    assert dice(np.asarray(saved.dataobj) == 1, file_truth) >= 0.85
    np.testing.assert_array_equal(read_nifti(out).data, labels)


def read_nifti_like(array: np.ndarray, folder, img: nib.Nifti1Image) -> np.ndarray:
    """An array laid out like ``img``'s file, read back in display orientation."""
    path = folder / "truth.nii.gz"
    data = np.ascontiguousarray(np.transpose(array, (2, 1, 0))[::-1]).astype(np.uint8)
    nib.save(nib.Nifti1Image(data, img.affine), path)
    return read_nifti(path).data


def test_real_mri_geometry_of_saved_labels(model, tmp_path):
    t1 = nib.load(MNI_T1)
    with VolumeSession(MNI_T1, model) as session:
        z = session.num_slices // 2
        h, w = session.slice_shape
        session.segment_slice(
            z, box=[w // 4, h // 4, 3 * w // 4, 3 * h // 4], label_id=3, multimask=False
        )
        session.propagate(slice_range=(z - 3, z + 4), min_pred_iou=0.0, min_iou_prev=0.0)
        assert set(np.unique(session.labels)) <= {0, 3}
        written = {i for i in range(session.num_slices) if session.labels[i].any()}
        assert z in written and written <= set(range(z - 3, z + 4))
        out = session.save(tmp_path / "mni_labels.nii.gz")
        labels = session.labels.copy()
    saved = nib.load(out)
    np.testing.assert_array_equal(saved.affine, t1.affine)
    assert saved.shape == t1.shape and saved.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(read_nifti(out).data, labels)
    # The file's voxels hold exactly the session's labels, mapped through the display transform.
    assert np.count_nonzero(np.asarray(saved.dataobj)) == np.count_nonzero(labels)


def test_preview_refine_replace_and_overlap_rules(model, scene):
    volume, truth = scene
    with VolumeSession(volume, model) as session:
        z, box = middle_box(truth, 1)
        preview = session.segment_slice(z, box=box, commit=False)
        assert not session.labels.any() and session.objects == {}
        assert session.last_result.logits.shape == (1, 64, 64)
        assert session.last_result.masks.shape == (3, 128, 160)  # multimask by default
        # Refine with the previous logits plus a click inside.
        cy, cx = np.argwhere(preview)[len(np.argwhere(preview)) // 2]
        refined = session.segment_slice(
            z,
            points=[[cx, cy]],
            mask_input=session.last_result.logits,
            label_id=1,
            multimask=False,
        )
        assert iou(refined, truth[z] == 1) >= 0.85
        np.testing.assert_array_equal(session.labels[z] == 1, refined)
        assert session.objects == {1: [z]} and session.next_label_id() == 2
        # A painted mask as the prompt reproduces itself closely.
        painted = truth[z] == 1
        again = session.segment_slice(z, mask_input=painted, label_id=1, multimask=False)
        assert iou(again, painted) >= 0.85
        # Segmenting the same object again replaces its mask on that slice.
        small = np.zeros_like(painted)
        small[10:20, 10:20] = True
        session.add_mask(z, small, label_id=1)
        np.testing.assert_array_equal(session.labels[z] == 1, small)
        # keep: another object does not take label 1's pixels; overwrite does.
        big = np.zeros_like(painted)
        big[5:30, 5:30] = True
        session.add_mask(z, big, label_id=2, mode="keep")
        assert (session.labels[z][small] == 1).all()
        session.add_mask(z, big, label_id=2, mode="overwrite")
        assert (session.labels[z][big] == 2).all()


def test_propagate_iter_stopped_early_leaves_whole_slices(model, scene):
    volume, truth = scene
    with VolumeSession(volume, model) as session:
        z, box = middle_box(truth, 1)
        session.segment_slice(z, box=box, label_id=1, multimask=False)
        before = session.labels.copy()
        steps = []
        for step in session.propagate_iter():
            steps.append(step)
            if len(steps) == 3:
                break
        touched = {i for i in range(session.num_slices) if (session.labels[i] != before[i]).any()}
        assert touched == {s.index for s in steps if s.masks}
        for s in steps:
            expected = merge_masks(before[s.index], s.masks)
            np.testing.assert_array_equal(session.labels[s.index], expected)


def test_seeds_follow_hand_edits_and_absent_slices(model, scene):
    volume, _ = scene
    with VolumeSession(volume, model) as session:
        mask = np.zeros(session.slice_shape, bool)
        mask[40:80, 50:100] = True
        label = session.add_mask(12, mask)
        assert label == 1
        session.labels[12, 40:60] = 0  # edited by hand, e.g. in napari
        np.testing.assert_array_equal(session.seeds()[1][12], session.labels[12] == 1)
        session.mark_absent(1, 20)
        assert not session.seeds()[1][20].any()
        session.propagate(min_pred_iou=0.0, min_iou_prev=0.0)
        assert not session.labels[20:].any()  # propagation never crossed the absent slice
        session.labels[3, 0, 0] = 7
        session.annotate(7, 3)
        assert session.objects == {1: [12], 7: [3]}
        assert session.remove_object(1) > 0 and 1 not in session.objects
        assert not (session.labels == 1).any()


def test_precompute_then_reuse_from_disk(model, scene, tmp_path):
    volume, _ = scene
    calls = []

    def counting(m, image):
        calls.append(1)
        return encode_image(m, image)

    with VolumeSession(volume, model, cache_dir=tmp_path, encode_fn=counting) as session:
        assert session.precompute(range(4)) == 4
        assert len(calls) == 4
    with VolumeSession(volume, model, cache_dir=tmp_path, encode_fn=counting) as session:
        assert session.precompute(range(6)) == 6 and len(calls) == 6
        session.segment_slice(2, box=[20, 20, 60, 60], commit=False)
        assert len(calls) == 6
        session.set_window((0, 200))  # another window: other embeddings
        assert not session.cache.has(2)


def test_lifecycle_and_clear_errors(model, scene, tmp_path):
    volume, _ = scene
    session = VolumeSession(volume, model)
    with pytest.raises(IndexError, match="28 slices"):
        session.segment_slice(28, box=[0, 0, 5, 5])
    with pytest.raises(ValueError, match="between 1 and 65535"):
        session.add_mask(0, np.ones(session.slice_shape, bool), label_id=70000)
    with pytest.raises(ValueError, match="no object to propagate"):
        session.propagate()
    with pytest.raises(ValueError, match="no seed slice"):
        session.propagate([5])
    with pytest.raises(ValueError, match="window"):
        session.set_window(42)
    session.close()
    assert "closed" in repr(session)
    with pytest.raises(RuntimeError, match="closed"):
        session.segment_slice(3, box=[0, 0, 5, 5])
    session.close()  # twice is fine

    with pytest.raises(ValueError, match="2D image"):
        VolumeSession(volume[0], model)
    with pytest.raises(ValueError, match="volume=i"):
        VolumeSession(volume[None], model)
    with pytest.raises(ValueError, match="labels must be"):
        VolumeSession(volume, model, labels=np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="labels must be"):
        VolumeSession(volume, model, labels=np.zeros(volume.shape, np.float32))
    with pytest.raises(TypeError, match="in place"):
        VolumeSession(volume, model, labels=np.zeros(volume.shape, np.uint8).tolist())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VolumeSession(tmp_path / "missing.nii.gz", model)
    with pytest.raises(ValueError, match="checkpoint"):
        VolumeSession(volume, model, checkpoint=tmp_path / "x.pth")

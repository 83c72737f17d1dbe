"""VolumeSession with a SAM 2 model: preview, track, corrections, undo, propagate by tracking.

The model is the package's own SAM 2.1 hiera-tiny at a 128 px input with random weights (its
object score lifted so that objects are seen): the real code path, small enough to be quick.
Mask quality is not the point here (random weights); what is written where, and undo, is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.models.sam2.build import build_sam2
from napari_sam.registry import get_spec
from napari_sam.sam2_predictor import Sam2ImagePredictor
from napari_sam.volume.parts import SessionParts, parts_for
from napari_sam.volume.sam2_features import FeatureCache
from napari_sam.volume.sam2_parts import Sam2Parts, mask_to_logits
from napari_sam.volume.session import VolumeSession

Z, H, W = 8, 45, 37


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sam2 = build_sam2(get_spec("sam2.1_hiera_tiny").replace(image_size=128))
    with torch.no_grad():
        sam2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 3.0
    return sam2


def _volume() -> np.ndarray:
    zz, yy, xx = np.mgrid[:Z, :H, :W]
    blob = (yy - 22) ** 2 + (xx - 18) ** 2 < (10 - np.abs(zz - 4)) ** 2
    return (200 * blob + np.random.default_rng(0).normal(30, 5, (Z, H, W))).astype(np.float32)


def _session(model, **kwargs) -> VolumeSession:
    return VolumeSession(_volume(), model=model, window="minmax", **kwargs)


def test_sam2_model_gets_sam2_parts(model):
    session = _session(model)
    assert isinstance(session.parts, Sam2Parts)
    assert isinstance(session.predictor, Sam2ImagePredictor)
    assert isinstance(session.cache, FeatureCache)
    # The session's bound (32 SAM 1 slices of 4 MiB) holds as many bytes of SAM 2 features.
    assert session.cache.max_memory_slices * session.cache.bytes_per_slice <= 32 * 4 * 2**20
    assert type(parts_for(object())) is SessionParts
    given = SessionParts()
    assert VolumeSession(_volume(), model=model, parts=given).parts is given
    result = session.preview(4, points=[[18, 22]])
    assert result.mask.shape == (H, W)
    drawn = np.zeros((H, W), bool)
    drawn[15:30, 10:26] = True
    assert session.preview(4, mask=drawn, multimask=False).mask.shape == (H, W)
    logits = mask_to_logits(drawn, 32)
    assert logits.shape == (1, 32, 32)
    assert np.isclose(logits.max(), 20.0, atol=1e-4) and np.isclose(logits.min(), -20.0, atol=1e-4)
    with pytest.raises(ValueError, match="needs a SAM 1 model"):
        list(session.segment_everything_iter(4))


def test_track_writes_every_slice_in_one_undo_step(model):
    session = _session(model)
    steps = list(session.track_iter(4, points=[[18, 22]], obj_id=3))
    assert steps[0].slice == 4 and steps[0].direction == 0
    assert sorted(s.slice for s in steps[1:]) == list(range(Z))  # 4 again: its walk starts
    assert steps[-1].done == steps[-1].total == Z
    labels = session.labels
    for step in steps[1:]:
        np.testing.assert_array_equal(labels[step.slice] == 3, step.masks_by_id()[3])
    assert (labels == 3).any(axis=(1, 2)).sum() >= Z - 1
    assert session.objects == {3: [4]}
    session.undo()
    assert not labels.any()  # the prompt and every tracked slice, undone together


def test_correction_retracks_only_downstream(model):
    session = _session(model)
    session.track(4, points=[[18, 22]], obj_id=1)
    before = session.labels.copy()
    steps = list(session.track_iter(6, points=[[18, 22], [2, 2]], labels=[1, 0], obj_id=1))
    assert [s.slice for s in steps] == [6, 6, 7]
    np.testing.assert_array_equal(session.labels[:6], before[:6])
    # A second object, tracked on its own; the first stays as it is.
    other = list(session.track_iter(2, box=[5, 5, 20, 20], obj_id=2, mode="keep"))
    assert all(s.updated == (2,) for s in other[1:])
    assert session.objects == {1: [4, 6], 2: [2]}
    with pytest.raises(IndexError):
        session.track(Z, points=[[1, 1]])


def test_propagate_tracks_painted_seeds(model):
    session = _session(model)
    drawn = np.zeros((H, W), bool)
    drawn[14:31, 9:28] = True
    label = session.add_mask(3, drawn)
    summary = session.propagate(slice_range=(1, 7), min_iou_prev=0.5)
    np.testing.assert_array_equal(session.labels[3] == label, drawn)  # the seed is kept
    assert summary.slices == 6  # 1..6: the seed slice is visited (its mask is not rewritten)
    assert not session.labels[0].any() and not session.labels[7].any()  # outside the range
    assert all((session.labels[i] == label).any() for i in (1, 2, 4, 5, 6))


def test_tracking_needs_sam2():
    class NotSam2:
        spec = None

    session = VolumeSession(_volume(), model=None)
    session.model = NotSam2()
    with pytest.raises(ValueError, match="needs a SAM 2 model"):
        session.track(2, points=[[3, 3]])


@pytest.mark.slow
def test_segment_command_tracks_with_a_sam2_checkpoint(model, tmp_path):
    import nibabel as nib

    from napari_sam.cli import main
    from napari_sam.io.nifti import read_nifti
    from napari_sam.weights import save_checkpoint

    checkpoint = save_checkpoint(model, tmp_path / "sam2_small.pt")  # spec embedded: 128 px
    scan = tmp_path / "scan.nii.gz"
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(np.transpose(_volume(), (2, 1, 0)), affine), scan)
    out = tmp_path / "labels.nii.gz"
    argv = ["segment", str(scan), "--slice", "4", "--point", "18", "22", "--model"]
    # The command line's default precision ("auto"): exact, or bf16 on CPUs with AMX.
    assert main([*argv, str(checkpoint), "--no-cache", "-o", str(out), "--quiet"]) == 0
    labels = read_nifti(out).data
    assert labels.shape == (Z, H, W) and set(np.unique(labels)) <= {0, 1}
    assert all(labels[i].any() for i in range(Z))  # tracked through every slice
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(scan).affine)

"""``napari-sam segment --text``: a tiny random detector's boxes, SAM, labels; through the CLI.

The detector is a tiny random Grounding DINO folder (tests/tiny_detectors.py): the boxes mean
nothing, so the checks are that the command writes exactly what the detector's boxes give
through SAM (and, on a volume, what the same boxes given as box prompts give).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from napari_sam.cli import main
from napari_sam.io.nifti import read_nifti
from napari_sam.predictor import SamPredictor, default_to_uint8
from napari_sam.text import load_detector
from napari_sam.training.synthetic import ellipsoid_volume
from napari_sam.volume.propagation import merge_masks
from napari_sam.volume.session import VolumeSession
from testmodel import TEST_MODEL_PATH, load_test_model
from tiny_detectors import write_grounding_dino
from volume_helpers import one_torch_thread  # noqa: F401 (autouse fixture)

MODEL = str(TEST_MODEL_PATH)


@pytest.fixture(scope="module")
def detector_folder(tmp_path_factory):
    return write_grounding_dino(tmp_path_factory.mktemp("gdino") / "model")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan")
    volume, _ = ellipsoid_volume(np.random.default_rng(11), (10, 64, 80), n_objects=2)
    path = folder / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(volume, (2, 1, 0)), np.eye(4)), path)
    return path


def _threshold_for(scores: np.ndarray, n: int) -> float:
    """A box threshold that keeps exactly the best ``n`` of these scores."""
    s = np.sort(scores)[::-1]
    assert s[n - 1] > s[n], "tied scores: pick another seed"
    return float((s[n - 1] + s[n]) / 2)


def test_text_on_an_image_writes_sam_masks_of_the_detected_boxes(detector_folder, tmp_path, capsys):
    rng = np.random.default_rng(5)
    image = rng.integers(0, 60, (56, 72), dtype=np.uint8)
    image[10:40, 20:60] += 150
    src = tmp_path / "photo.png"
    Image.fromarray(image).save(src)
    detector = load_detector(detector_folder, device="cpu")
    rgb = default_to_uint8(image)
    every = detector.detect(rgb, "liver. kidney.", box_threshold=0.0)
    threshold = _threshold_for(every.scores, 3)
    out = tmp_path / "labels.png"
    argv = ["segment", str(src), "--text", "Liver. Kidney.", "--detector", str(detector_folder)]
    argv += ["--box-threshold", str(threshold), "--model", MODEL, "--device", "cpu"]
    assert main([*argv, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    labels = np.asarray(Image.open(out))
    assert labels.shape == image.shape and labels.dtype == np.uint8

    found = detector.detect(rgb, "liver. kidney.", box_threshold=threshold)
    assert len(found) == 3
    predictor = SamPredictor(load_test_model())
    predictor.set_image(image)
    masks = {
        i + 1: predictor.predict(box=box, multimask_output=False)[0][0]
        for i, box in enumerate(found.boxes)
    }
    expected = merge_masks(np.zeros(image.shape, np.uint16), masks)
    assert np.mean(labels == expected) >= 0.999
    for i, phrase in enumerate(found.phrases):
        assert f"object {i + 1}: {phrase} score {found.scores[i]:.3f}" in printed
    # The same again refuses to overwrite, then --force replaces.
    assert main([*argv, "-o", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main([*argv, "-o", str(out), "--force"]) == 0


def test_text_on_a_volume_equals_box_prompts_on_the_detected_boxes(
    scan, detector_folder, tmp_path, capsys
):
    z = 5
    detector = load_detector(detector_folder, device="cpu")
    with VolumeSession(scan, MODEL, device="cpu") as session:
        rgb = session.slice_image(z)
        threshold = _threshold_for(detector.detect(rgb, "liver.", box_threshold=0.0).scores, 3)
        found = detector.detect(rgb, "liver.", box_threshold=threshold)
        seen = [
            session.segment_slice(z, box=box, multimask=False, commit=False).any()
            for box in found.boxes
        ]
    common = ["--model", MODEL, "--device", "cpu", "--no-cache", "--quiet"]

    out = tmp_path / "text.nii.gz"
    argv = ["segment", str(scan), "--slice", str(z), "--text", "liver."]
    argv += ["--detector", str(detector_folder), "--box-threshold", str(threshold)]
    assert main([*argv, *common, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    for i, phrase in enumerate(found.phrases):
        assert f"object {i + 1}: {phrase} score {found.scores[i]:.3f}" in printed
        assert (f"object {i + 1}: SAM found nothing" in printed) == (not seen[i])

    # The objects SAM found, given as box prompts with the same labels.
    prompts = tmp_path / "prompts.json"
    objects = [
        {"label": i + 1, "prompts": [{"slice": z, "box": [float(v) for v in box]}]}
        for i, box in enumerate(found.boxes)
        if seen[i]
    ]
    assert objects, "SAM found nothing in any box: pick another seed"
    prompts.write_text(json.dumps({"objects": objects}))
    ref = tmp_path / "boxes.nii.gz"
    assert main(["segment", str(scan), "--prompts", str(prompts), *common, "-o", str(ref)]) == 0
    labels, expected = read_nifti(out).data, read_nifti(ref).data
    np.testing.assert_array_equal(labels, expected)
    assert labels[z].any() and set(np.unique(labels)) <= {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--slice", "5", "--box", "1", "1", "9", "9"], "--text replaces --box"),
        ([], "--text on a volume needs --slice Z"),
        (["--slice", "5", "--box-threshold", "1.5"], "--box-threshold must be in 0..1"),
        (["--slice", "5", "--box-threshold", "1.0"], "the detector found nothing for 'liver.'"),
        (["--slice", "50"], "--slice 50 is outside the volume"),
    ],
)
def test_text_errors(scan, detector_folder, tmp_path, capsys, extra, message):
    argv = ["segment", str(scan), "--text", "liver.", "--detector", str(detector_folder)]
    argv += ["--model", MODEL, "--device", "cpu", "--no-cache", "-o", str(tmp_path / "x.nii")]
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["photo.npy", "slice.nii.gz"])
def test_text_on_an_image_needs_an_image_output(detector_folder, tmp_path, capsys, name):
    src = tmp_path / name
    image = np.zeros((20, 30), np.float32)
    if name.endswith(".npy"):
        np.save(src, image)
    else:  # a 2-D NIfTI is an image too
        nib.save(nib.Nifti1Image(image, np.eye(4)), src)
    argv = ["segment", str(src), "--text", "liver.", "--detector", str(detector_folder)]
    assert main([*argv, "-o", str(tmp_path / "labels.nii.gz")]) == 2
    assert "for a 2-D image write .png, .tif, .tiff, .npy" in capsys.readouterr().err

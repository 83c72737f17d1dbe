"""napari contributions: reader, labels writer, sample data, manifest (npe2) and a real viewer."""

from __future__ import annotations

import importlib.resources
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_sam._napari.reader import get_reader
from napari_sam._napari.sample_data import PHANTOM_LABELS, ct_phantom, make_ct_phantom, mni152_t1
from napari_sam._napari.writer import write_labels
from napari_sam.intensity import ct_window, percentile_window
from napari_sam.io.nifti import read_nifti

napari = pytest.importorskip("napari")

NIBABEL_DATA = importlib.resources.files("nibabel.tests.data")


def _nibabel_file(name: str) -> Path:
    return Path(str(NIBABEL_DATA / name))


def test_reader_declines_what_it_cannot_read(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    corrupt = tmp_path / "corrupt.nii"
    corrupt.write_bytes(b"\x00" * 10 + b"garbage" * 100)
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(_nibabel_file("anatomical.nii").read_bytes()[:1000])
    folder = tmp_path / "folder.nii"
    folder.mkdir()
    for path in (
        text,
        corrupt,
        truncated,
        folder,
        tmp_path / "missing.nii.gz",
        _nibabel_file("row_major.dconn.nii"),
        [str(text), str(_nibabel_file("anatomical.nii"))],
        [],
    ):
        assert get_reader(path) is None, path
    assert get_reader(str(_nibabel_file("anatomical.nii"))) is not None


@pytest.mark.parametrize(
    "name", ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "standard.nii.gz"]
)
def test_reader_gives_image_layers_with_geometry(name):
    path = _nibabel_file(name)
    reader = get_reader(str(path))
    assert callable(reader)
    [(data, kwargs, layer_type)] = reader(str(path))
    assert layer_type == "image"
    vol = read_nifti(path)
    np.testing.assert_array_equal(data, vol.data)
    assert kwargs["scale"] == vol.scale and kwargs["translate"] == vol.translate
    assert kwargs["metadata"]["nifti"]["affine"].shape == (4, 4)
    assert kwargs["name"] == name.split(".")[0]
    assert kwargs["rgb"] is False
    # MR-like data gets the whole volume's percentile window as contrast limits, uint8 0..255.
    window = percentile_window(data)
    expected = (0.0, 255.0) if data.dtype == np.uint8 else (window.low, window.high)
    assert kwargs["contrast_limits"] == expected
    layer = napari.layers.Layer.create(data, kwargs, layer_type)
    assert layer.ndim == data.ndim
    np.testing.assert_allclose(layer.scale, vol.scale)
    if data.ndim == 4:  # time first: napari slices it with its own slider
        assert data.shape[0] == nib.load(path).shape[3]


def test_reader_takes_a_list_of_files():
    paths = [str(_nibabel_file("anatomical.nii")), str(_nibabel_file("standard.nii.gz"))]
    layers = get_reader(paths)(paths)
    assert [kw["name"] for _, kw, _ in layers] == ["anatomical", "standard"]


def test_ct_gets_the_soft_tissue_window(tmp_path):
    volume, spacing, _ = make_ct_phantom(shape=(8, 32, 32))
    nib.save(nib.Nifti1Image(volume, np.diag([*spacing[::-1], 1.0])), tmp_path / "ct.nii.gz")
    [(data, kwargs, _)] = get_reader(str(tmp_path / "ct.nii.gz"))(str(tmp_path / "ct.nii.gz"))
    assert data.dtype == np.int16
    assert kwargs["contrast_limits"] == (-160.0, 240.0)


@pytest.fixture
def plugin_manager():
    """npe2's plugin manager with this plugin discovered (a viewer does this at start-up)."""
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManager.instance()
    pm.discover()
    assert "napari-sam-volumes" in {m.name for m in pm.iter_manifests()}
    return pm


def test_writer_round_trip_through_a_napari_labels_layer(tmp_path, plugin_manager):
    path = _nibabel_file("anatomical.nii")
    [(data, kwargs, _)] = get_reader(str(path))(str(path))
    image = napari.layers.Image(data, **kwargs)
    labels = napari.layers.Labels(
        np.zeros(data.shape, np.uint8),
        metadata=image.metadata,
        scale=image.scale,
        translate=image.translate,
    )
    labels.data[3, 4, 5] = 2
    labels.data[-1, -1, -1] = 1
    ldata, attributes, layer_type = labels.as_layer_data_tuple()
    assert layer_type == "labels"
    [written] = write_labels(tmp_path / "seg.nii.gz", ldata, attributes)
    saved = nib.load(written)
    source = nib.load(path)
    assert np.array_equal(saved.affine, source.affine)
    assert saved.shape == source.shape
    got = np.asanyarray(saved.dataobj)
    # display (i0, i1, i2) -> file (i2, Y-1-i1, Z-1-i0) for this LAS file
    assert got[5, 41 - 1 - 4, 25 - 1 - 3] == 2
    assert got[32, 0, 0] == 1
    assert np.count_nonzero(got) == 2
    # The same through napari's own save machinery and the plugin name.
    out = labels.save(str(tmp_path / "seg2.nii"), plugin="napari-sam-volumes")
    assert np.array_equal(np.asanyarray(nib.load(out[0]).dataobj), got)


def test_writer_without_metadata_uses_layer_scale_and_translate(tmp_path):
    labels = napari.layers.Labels(
        np.zeros((3, 4, 5), np.uint8), scale=(2.0, 0.5, 0.5), translate=(10.0, -5.0, 1.0)
    )
    labels.data[1, 2, 3] = 4
    data, attributes, _ = labels.as_layer_data_tuple()
    [written] = write_labels(tmp_path / "plain.nii.gz", data, attributes)
    back = read_nifti(written)
    np.testing.assert_array_equal(back.data, labels.data)
    np.testing.assert_allclose(back.scale, labels.scale)
    np.testing.assert_allclose(back.translate, labels.translate)


def test_writer_refuses_other_extensions(tmp_path):
    with pytest.raises(ValueError, match=r"\.nii or \.nii\.gz"):
        write_labels(tmp_path / "seg.tif", np.zeros((2, 2, 2), np.uint8), {})
    assert not list(tmp_path.iterdir())


def test_mni152_sample():
    [(data, kwargs, layer_type)] = mni152_t1()
    assert layer_type == "image"
    assert data.shape == (189, 233, 197) and data.dtype == np.uint8
    assert kwargs["scale"] == (1.0, 1.0, 1.0)
    assert kwargs["metadata"]["nifti"]["affine"].shape == (4, 4)
    assert kwargs["contrast_limits"] == (0.0, 255.0)
    # Orientation against anatomy: in MNI space the head reaches about 73 mm in front of the
    # anterior commissure and 107 mm behind it, and its top is about 82 mm above it.
    head = data > 40
    rows = np.nonzero(head.any(axis=(0, 2)))[0]
    first_a, last_a = -(kwargs["translate"][1] + rows[[0, -1]])  # display axis 1 is -A
    assert 60 < first_a < 85 and -115 < last_a < -95  # anterior at the top of axial slices
    top = np.nonzero(head.any(axis=(1, 2)))[0][0]
    assert 70 < -(kwargs["translate"][0] + top) < 90  # slice 0 side is the top of the head


def test_ct_phantom_values_and_geometry(tmp_path):
    volume, spacing, truth = make_ct_phantom()
    assert volume.shape == (64, 256, 256) and volume.dtype == np.int16
    assert spacing == (2.5, 0.7, 0.7)
    again, _, truth2 = make_ct_phantom()
    assert np.array_equal(volume, again) and np.array_equal(truth, truth2)
    assert not np.array_equal(volume, make_ct_phantom(seed=1)[0])
    medians = {
        name: float(np.median(volume[truth == value])) for name, value in PHANTOM_LABELS.items()
    }
    assert abs(float(np.median(volume[truth == 0])) + 1000) < 5
    assert abs(medians["right_lung"] + 800) < 5 and abs(medians["left_lung"] + 800) < 5
    assert abs(medians["liver"] - 60) < 5 and medians["spine"] > 650
    assert set(np.unique(truth)) == {0, *PHANTOM_LABELS.values()}
    # The liver is on the patient's right: the left half of the screen.
    liver_cols = np.nonzero(truth == PHANTOM_LABELS["liver"])[2]
    assert liver_cols.mean() < 128
    # Lungs above the liver (axis 0 runs head to feet).
    lung_z = np.nonzero(truth == PHANTOM_LABELS["right_lung"])[0]
    liver_z = np.nonzero(truth == PHANTOM_LABELS["liver"])[0]
    assert lung_z.mean() < liver_z.mean()
    small, small_spacing, _ = make_ct_phantom(shape=(10, 40, 50), spacing=(3.0, 1.0, 0.9))
    assert small.shape == (10, 40, 50) and small_spacing == (3.0, 1.0, 0.9)

    [(data, kwargs, _)] = ct_phantom()
    assert np.array_equal(data, volume)
    window = ct_window("soft_tissue")
    assert kwargs["contrast_limits"] == (window.low, window.high)
    assert kwargs["scale"] == spacing
    # Labels drawn on the phantom save as NIfTI and read back onto the same voxels.
    [written] = write_labels(tmp_path / "truth.nii.gz", truth, kwargs)
    back = read_nifti(written)
    np.testing.assert_array_equal(back.data, truth)
    np.testing.assert_allclose(back.scale, kwargs["scale"])
    np.testing.assert_allclose(back.translate, kwargs["translate"])


def test_manifest_validates_with_imports():
    # `npe2 validate` as a user runs it (python -m npe2 is the same CLI, found with this python).
    pytest.importorskip("npe2")
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-sam-volumes", "--imports"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


@pytest.mark.gui
def test_viewer_opens_nifti_and_saves_labels(make_napari_viewer, tmp_path):
    source = tmp_path / "anat.nii.gz"
    nib.save(nib.load(_nibabel_file("anatomical.nii")), source)
    viewer = make_napari_viewer()
    [image] = viewer.open(str(source), plugin="napari-sam-volumes")
    assert image.data.shape == (25, 41, 33)
    assert tuple(image.scale) == (2.0, 2.0, 2.0)
    assert viewer.dims.ndim == 3
    labels = viewer.add_labels(
        np.zeros(image.data.shape, np.uint8),
        metadata=dict(image.metadata),
        scale=image.scale,
        translate=image.translate,
    )
    labels.data_setitem((np.array([2]), np.array([3]), np.array([4])), 5)
    out = labels.save(str(tmp_path / "seg.nii.gz"), plugin="napari-sam-volumes")
    saved = nib.load(out[0])
    assert np.array_equal(saved.affine, nib.load(source).affine)
    got = np.asanyarray(saved.dataobj)
    assert got[4, 41 - 1 - 3, 25 - 1 - 2] == 5 and np.count_nonzero(got) == 1
    viewer.layers.selection = {labels}
    out2 = viewer.layers.save(
        str(tmp_path / "seg2.nii"), selected=True, plugin="napari-sam-volumes"
    )
    assert np.array_equal(np.asanyarray(nib.load(out2[0]).dataobj), got)
    # Sample data through napari's menu machinery.
    viewer.open_sample("napari-sam-volumes", "ct_phantom")
    assert viewer.layers[-1].data.dtype == np.int16

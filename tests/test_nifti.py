"""NIfTI read/write: display orientation, metadata, and exact label round trips.

The expected display array is derived independently of the module, from nibabel's canonical
(RAS+) image and the documented convention: display axes (I, P, L), i.e. the canonical array with
every axis reversed and the axis order reversed. Labels drawn at display voxels must land on the
file voxels the affines say.
"""

from __future__ import annotations

import gzip
import importlib.resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import SHARED_DATA
from napari_sam.io import nifti
from napari_sam.io.nifti import NiftiError, image_from_display, read_nifti, write_labels

NIBABEL_DATA = importlib.resources.files("nibabel.tests.data")
NIBABEL_FILES = sorted(
    p.name for p in NIBABEL_DATA.iterdir() if p.name.endswith((".nii", ".nii.gz"))
)
MNI = SHARED_DATA / "mni152"


def _nibabel_file(name: str) -> Path:
    return Path(str(NIBABEL_DATA / name))


def _display_from_canonical(canon: np.ndarray) -> np.ndarray:
    """(R, A, S[, T]) canonical array -> (I, P, L) display array, time kept last."""
    spatial = canon[::-1, ::-1, ::-1]
    return np.moveaxis(spatial, (0, 1, 2), (2, 1, 0))


def _expected_file_labels(img, display_labels: np.ndarray) -> np.ndarray:
    """Where labels drawn in display space must sit in the file's voxel grid, via the affines."""
    canon = nib.as_closest_canonical(img)
    shape = canon.shape[:3]
    out = np.zeros(img.shape[:3], dtype=display_labels.dtype)
    disp = np.argwhere(display_labels)
    # display (i0, i1, i2) -> canonical voxel (X-1-i2, Y-1-i1, Z-1-i0)
    canon_vox = np.stack(
        [shape[0] - 1 - disp[:, 2], shape[1] - 1 - disp[:, 1], shape[2] - 1 - disp[:, 0]], axis=1
    )
    to_file = np.linalg.inv(img.affine) @ canon.affine
    file_vox = nib.affines.apply_affine(to_file, canon_vox)
    file_idx = np.rint(file_vox).astype(int)
    assert np.allclose(file_vox, file_idx, atol=1e-4)  # canonical is a permutation + flips
    out[tuple(file_idx.T)] = display_labels[tuple(disp.T)]
    return out


def _draw(shape: tuple[int, ...], seed: int = 0, n: int = 25) -> np.ndarray:
    """Labels at random display voxels (values 1..n), plus the voxel at index 0 and the last."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint16)
    flat = rng.choice(labels.size, size=min(n, labels.size), replace=False)
    labels.flat[flat] = np.arange(1, flat.size + 1)
    labels.flat[0] = 300
    labels.flat[-1] = 7
    return labels


def _check_round_trip(path: Path, tmp_path: Path, **read_kw) -> None:
    img = nib.load(path)
    vol = read_nifti(path, **read_kw)
    meta = vol.metadata["nifti"]
    canon = nib.as_closest_canonical(img)

    # Display data follows the documented convention, dtype follows the file.
    if img.ndim == 4 and read_kw.get("volume") is None:
        expected = np.moveaxis(_display_from_canonical(np.asanyarray(canon.dataobj)), -1, 0)
    elif img.ndim == 4:
        expected = _display_from_canonical(np.asanyarray(canon.dataobj)[..., read_kw["volume"]])
    else:
        expected = _display_from_canonical(np.asanyarray(canon.dataobj))
    np.testing.assert_allclose(vol.data, expected, rtol=1e-6)
    assert vol.data.dtype.isnative
    if img.dataobj.slope == 1 and img.dataobj.inter == 0:
        assert vol.data.dtype == img.get_data_dtype().newbyteorder("=")
    else:
        assert vol.data.dtype == np.float32

    # napari geometry: scale = voxel sizes, world = (-S, -A, -R) of the voxel centre.
    zooms = canon.header.get_zooms()[:3]
    np.testing.assert_allclose(vol.scale[-3:], zooms[::-1], rtol=1e-5)
    oblique = not np.allclose(np.abs(canon.affine[:3, :3]), np.diag(zooms), atol=1e-4)
    if not oblique:
        last = np.array(meta["display_shape"]) - 1
        for disp in (np.zeros(3), last):
            world = np.array(vol.translate[-3:]) + np.array(vol.scale[-3:]) * disp
            canon_vox = np.array(canon.shape[:3]) - 1 - disp[::-1]
            ras = nib.affines.apply_affine(canon.affine, canon_vox)
            np.testing.assert_allclose(world, -ras[::-1], atol=1e-4)

    assert meta["qform_code"] == int(img.header["qform_code"])
    assert meta["sform_code"] == int(img.header["sform_code"])
    assert np.array_equal(meta["affine"], img.affine)
    assert tuple(meta["shape"]) == img.shape
    assert meta["dtype"] == img.get_data_dtype().str

    labels = _draw(meta["display_shape"])
    for suffix in (".nii.gz", ".nii"):
        out = write_labels(tmp_path / f"labels{suffix}", labels, vol.metadata)
        saved = nib.load(out)
        assert type(saved.header) is type(img.header)
        assert np.array_equal(saved.affine, img.affine)
        assert np.array_equal(saved.header.get_qform(), img.header.get_qform())
        assert np.array_equal(saved.header.get_sform(), img.header.get_sform())
        assert int(saved.header["qform_code"]) == int(img.header["qform_code"])
        assert int(saved.header["sform_code"]) == int(img.header["sform_code"])
        assert saved.header.get_xyzt_units() == img.header.get_xyzt_units()
        assert saved.get_data_dtype() == np.dtype(np.uint16).newbyteorder(
            img.header.endianness
        )  # largest label 300
        assert saved.header.get_intent()[0] == "label"
        assert saved.dataobj.slope == 1 and saved.dataobj.inter == 0
        data = np.asanyarray(saved.dataobj)
        assert data.shape == (img.shape[:3] if img.ndim >= 3 else img.shape)
        assert np.array_equal(data.reshape(img.shape[:3]), _expected_file_labels(img, labels))
        # Reading the labels back gives the drawn display array.
        assert np.array_equal(read_nifti(out).data, labels)


@pytest.mark.parametrize("name", NIBABEL_FILES)
def test_every_nibabel_example_file(name, tmp_path):
    path = _nibabel_file(name)
    try:
        img = nib.load(path)
    except Exception:
        img = None
    if img is None or isinstance(img, nib.Cifti2Image):
        with pytest.raises(NiftiError, match=r"CIFTI|cannot read"):
            read_nifti(path)
        return
    if img.ndim == 4:
        _check_round_trip(path, tmp_path)
        _check_round_trip(path, tmp_path, volume=img.shape[3] - 1)
    else:
        _check_round_trip(path, tmp_path)


def test_nibabel_files_cover_the_cases_we_claim():
    kinds = {}
    for name in NIBABEL_FILES:
        path = _nibabel_file(name)
        try:
            kinds[name] = read_nifti(path).metadata["nifti"]
        except NiftiError as exc:
            kinds[name] = str(exc)
    assert "CIFTI" in kinds["row_major.dconn.nii"]
    assert kinds["anatomical.nii"]["dtype"] == ">i2"
    assert kinds["example_nifti2.nii.gz"]["format"] == "nifti2"
    assert kinds["functional.nii"]["scl_slope"] != 1.0
    assert kinds["example4d.nii.gz"]["time_first"]


def _synthetic(tmp_path: Path, name: str, affine: np.ndarray, shape=(6, 7, 5), **kw) -> Path:
    # Every voxel holds its own flat index: display data then says where each voxel came from.
    data = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=kw.get("qform_code", 1))
    img.header.set_sform(affine, code=kw.get("sform_code", 1))
    path = tmp_path / name
    nib.save(img, path)
    return path


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def _affine(rzs: np.ndarray, offset) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = rzs
    aff[:3, 3] = offset
    return aff


SYNTHETIC = {
    "lps.nii.gz": _affine(np.diag([-0.8, -0.8, 1.5]), [100.0, 120.0, -50.0]),
    "anisotropic.nii": _affine(np.diag([0.7, 0.7, 2.5]), [-90.0, -80.0, 10.0]),
    # Sagittal acquisition: file axes run A, S, L.
    "permuted.nii.gz": _affine(
        np.array([[0, 0, -1.2], [0.9, 0, 0], [0, 3.0, 0]], dtype=float), [30.0, -60.0, -20.0]
    ),
    "oblique.nii.gz": _affine(
        _rotation(0, 17) @ _rotation(2, -11) @ np.diag([0.9, 1.1, 3.0]), [-40.0, 25.0, 60.0]
    ),
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic_orientations_round_trip(name, tmp_path):
    path = _synthetic(tmp_path, name, SYNTHETIC[name])
    _check_round_trip(path, tmp_path)
    # The voxel-index encoding makes the orientation check independent of nibabel's canonical.
    vol = read_nifti(path)
    img = nib.load(path)
    for disp in [(0, 0, 0), (1, 2, 3), tuple(np.array(vol.data.shape) - 1)]:
        file_vox = np.unravel_index(int(vol.data[disp]), img.shape)
        ras = nib.affines.apply_affine(img.affine, file_vox)
        if name != "oblique.nii.gz":
            world = np.array(vol.translate) + np.array(vol.scale) * np.array(disp)
            np.testing.assert_allclose(world, -ras[::-1], atol=1e-4)
        display_ras = nib.affines.apply_affine(vol.metadata["nifti"]["display_affine"], disp)
        np.testing.assert_allclose(display_ras, ras, atol=1e-4)


def test_oblique_keeps_affine_exactly_and_codes(tmp_path):
    aff = SYNTHETIC["oblique.nii.gz"]
    path = _synthetic(tmp_path, "obl.nii", aff, qform_code=1, sform_code=4)
    vol = read_nifti(path)
    out = write_labels(tmp_path / "obl_labels.nii", np.ones(vol.data.shape, np.uint8), vol.metadata)
    saved = nib.load(out)
    src = nib.load(path)
    assert np.array_equal(saved.affine, src.affine)
    assert saved.header["qform_code"] == 1 and saved.header["sform_code"] == 4
    # The qform holds the same rotation as the sform: an ITK reader (qform first) agrees.
    np.testing.assert_allclose(saved.header.get_qform(), saved.header.get_sform(), atol=1e-5)
    # Header fields other than data type, scaling, intent and calibration are byte-identical.
    for field in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "srow_x", "pixdim"):
        assert np.array_equal(saved.header[field], src.header[field]), field


def test_scaled_integers_read_as_float32(tmp_path):
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, -1024.0)
    nib.save(img, tmp_path / "ct.nii.gz")
    vol = read_nifti(tmp_path / "ct.nii.gz")
    assert vol.data.dtype == np.float32
    expected = _display_from_canonical(data * 0.5 - 1024.0)
    np.testing.assert_array_equal(vol.data, expected)
    out = write_labels(tmp_path / "l.nii.gz", (vol.data > -1010).astype(np.uint8), vol.metadata)
    saved = nib.load(out)
    assert saved.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(saved.dataobj), (data * 0.5 - 1024 > -1010))


def test_unscaled_int16_stays_int16_and_float64_stays(tmp_path):
    for dtype in (np.int16, np.uint16, np.float64):
        img = nib.Nifti1Image(np.ones((2, 3, 4), dtype=dtype), np.eye(4))
        nib.save(img, tmp_path / "x.nii")
        assert read_nifti(tmp_path / "x.nii").data.dtype == dtype


def test_two_d_image(tmp_path):
    data = np.arange(12, dtype=np.int16).reshape(3, 4)
    img = nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0]))
    nib.save(img, tmp_path / "slice.nii")
    vol = read_nifti(tmp_path / "slice.nii")
    # An axial 2D image: rows posterior-ward, columns leftward.
    np.testing.assert_array_equal(vol.data, data[::-1, ::-1].T)
    assert vol.scale == (3.0, 2.0)
    assert vol.translate == (-9.0, -4.0)
    labels = np.zeros(vol.data.shape, np.uint8)
    labels[0, 1] = 5  # display (row 0, col 1) = file (x = 2 - 1, y = 3 - 0)
    out = write_labels(tmp_path / "slice_labels.nii", labels, vol.metadata)
    saved = nib.load(out)
    assert saved.shape == (3, 4)
    expected = np.zeros((3, 4), np.uint8)
    expected[1, 3] = 5
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), expected)
    with pytest.raises(NiftiError, match="volume"):
        read_nifti(tmp_path / "slice.nii", volume=0)


def test_four_d_volume_choice_and_per_volume_labels(tmp_path):
    path = _nibabel_file("example4d.nii.gz")
    full = read_nifti(path)
    assert full.data.ndim == 4 and full.scale[0] == 1.0 and full.translate[0] == 0.0
    last = read_nifti(path, volume=-1)
    np.testing.assert_array_equal(last.data, full.data[-1])
    assert last.metadata["nifti"]["volume"] == 1
    with pytest.raises(NiftiError, match="out of range"):
        read_nifti(path, volume=2)
    # One label map per volume for a series read whole.
    labels = np.zeros(full.data.shape, np.uint8)
    labels[1, 3, 4, 5] = 2
    out = write_labels(tmp_path / "series.nii.gz", labels, full.metadata)
    saved = nib.load(out)
    assert saved.shape == nib.load(path).shape
    assert np.array_equal(read_nifti(out).data, labels)
    with pytest.raises(ValueError, match="does not match the source image"):
        write_labels(tmp_path / "bad.nii.gz", labels[:, :-1], full.metadata)
    with pytest.raises(ValueError, match="does not match the source image"):
        write_labels(tmp_path / "bad.nii.gz", labels, last.metadata)


def test_rgb_nifti(tmp_path):
    rgb = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    data = np.zeros((3, 4, 5), dtype=rgb)
    data["R"] = 10
    data["G"] = np.arange(4)[None, :, None]
    data["B"] = np.arange(5)[None, None, :]
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "rgb.nii")
    vol = read_nifti(tmp_path / "rgb.nii")
    assert vol.rgb and vol.data.dtype == np.uint8 and vol.data.shape == (5, 4, 3, 3)
    # display (i0, i1, i2) = file (2 - i2, 3 - i1, 4 - i0)
    assert vol.data[0, 0, 0].tolist() == [10, 3, 4]
    assert vol.data[4, 3, 2].tolist() == [10, 0, 0]
    out = write_labels(tmp_path / "rgb_labels.nii", np.ones((5, 4, 3), np.uint8), vol.metadata)
    assert nib.load(out).shape == (3, 4, 5) and nib.load(out).get_data_dtype() == np.uint8


def test_bad_files_raise_nifti_error(tmp_path):
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"this is not a NIfTI header" * 20)
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(_nibabel_file("anatomical.nii").read_bytes()[:2000])
    gz_truncated = tmp_path / "truncated.nii.gz"
    gz_truncated.write_bytes(gzip.compress(_nibabel_file("anatomical.nii").read_bytes())[:1500])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for path, message in [
        (garbage, "cannot read"),
        (truncated, "truncated"),
        (gz_truncated, "cannot read"),
        (text, "not a NIfTI file"),
        (tmp_path / "missing.nii", "does not exist"),
        (_nibabel_file("row_major.dconn.nii"), "CIFTI"),
    ]:
        with pytest.raises(NiftiError, match=message):
            read_nifti(path)
    assert issubclass(NiftiError, ValueError)


def test_label_dtype_and_bad_labels(tmp_path):
    vol = read_nifti(_nibabel_file("standard.nii.gz"))
    shape = vol.data.shape
    for top, dtype in [
        (1, np.uint8),
        (255, np.uint8),
        (256, np.uint16),
        (65535, np.uint16),
        (65536, np.int32),
    ]:
        labels = np.zeros(shape, np.int64)
        labels[0, 0, 0] = top
        out = write_labels(tmp_path / "l.nii.gz", labels, vol.metadata)
        saved = nib.load(out)
        assert saved.get_data_dtype() == dtype
        assert int(np.asanyarray(saved.dataobj).max()) == top
        assert saved.header["cal_max"] == top
    bool_out = write_labels(tmp_path / "b.nii", np.ones(shape, bool), vol.metadata)
    assert nib.load(bool_out).get_data_dtype() == np.uint8
    with pytest.raises(ValueError, match=">= 0"):
        write_labels(tmp_path / "n.nii", -np.ones(shape, np.int32), vol.metadata)
    with pytest.raises(ValueError, match="int32"):
        write_labels(tmp_path / "n.nii", np.full(shape, 2**40), vol.metadata)
    with pytest.raises(ValueError, match="integer or boolean"):
        write_labels(tmp_path / "f.nii", np.ones(shape, np.float32), vol.metadata)
    with pytest.raises(ValueError, match="does not match"):
        write_labels(tmp_path / "s.nii", np.ones((1, 2, 3), np.uint8), vol.metadata)
    with pytest.raises(ValueError, match=r"\.nii or \.nii\.gz"):
        write_labels(tmp_path / "labels.tif", np.ones(shape, np.uint8), vol.metadata)


def test_atomic_write_and_overwrite_rules(tmp_path, monkeypatch):
    vol = read_nifti(_nibabel_file("standard.nii.gz"))
    target = tmp_path / "labels.nii.gz"
    write_labels(target, np.ones(vol.data.shape, np.uint8), vol.metadata)
    before = target.read_bytes()
    with pytest.raises(FileExistsError):
        write_labels(target, np.zeros(vol.data.shape, np.uint8), vol.metadata, overwrite=False)
    assert target.read_bytes() == before

    def failing_save(img, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nifti.nib, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_labels(target, np.zeros(vol.data.shape, np.uint8), vol.metadata)
    assert target.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz"]  # no temp left


def test_temp_file_keeps_suffix_so_gzip_is_used(tmp_path):
    vol = read_nifti(_nibabel_file("standard.nii.gz"))
    gz = write_labels(tmp_path / "a.nii.gz", np.ones(vol.data.shape, np.uint8), vol.metadata)
    plain = write_labels(tmp_path / "a.nii", np.ones(vol.data.shape, np.uint8), vol.metadata)
    assert gz.read_bytes()[:2] == b"\x1f\x8b"
    assert plain.read_bytes()[344:348] == b"n+1\x00"


def test_labels_without_nifti_metadata_use_scale_and_translate(tmp_path):
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 2, 3] = 9
    scale, translate = (2.5, 0.7, 0.8), (-10.0, 20.0, -30.0)
    out = write_labels(tmp_path / "free.nii.gz", labels, {}, scale=scale, translate=translate)
    saved = nib.load(out)
    assert nib.aff2axcodes(saved.affine) == ("R", "A", "S")
    assert saved.header["qform_code"] == saved.header["sform_code"] == 2
    back = read_nifti(out)
    np.testing.assert_array_equal(back.data, labels)
    np.testing.assert_allclose(back.scale, scale)
    np.testing.assert_allclose(back.translate, translate)
    # The labelled voxel's scanner position is minus its reversed world position.
    ras = nib.affines.apply_affine(saved.affine, np.argwhere(np.asanyarray(saved.dataobj))[0])
    world = np.array(translate) + np.array(scale) * np.array([1, 2, 3])
    np.testing.assert_allclose(ras, -world[::-1])
    # 2D and defaults
    flat = write_labels(tmp_path / "flat.nii", np.eye(3, dtype=np.uint8), None)
    assert np.array_equal(read_nifti(flat).data, np.eye(3))
    with pytest.raises(ValueError, match="one per axis"):
        image_from_display(labels, scale=(1.0, 1.0))


def test_mni152_white_matter_round_trip(tmp_path):
    t1_path = next(MNI.glob("*_t1_*.nii.gz"))
    wm_path = next(MNI.glob("*_wm_*.nii.gz"))
    t1 = read_nifti(t1_path)
    wm = read_nifti(wm_path)
    assert t1.data.shape == wm.data.shape == (189, 233, 197)
    assert t1.scale == (1.0, 1.0, 1.0)
    mask = (wm.data > 127).astype(np.uint8)
    out = write_labels(tmp_path / "wm.nii.gz", mask, t1.metadata)
    saved = nib.load(out)
    source = nib.load(wm_path)
    assert np.array_equal(saved.affine, nib.load(t1_path).affine)
    truth = np.asanyarray(source.dataobj) > 127
    got = np.asanyarray(saved.dataobj)
    assert got.dtype == np.uint8
    assert np.array_equal(got.astype(bool), truth)
    assert truth.sum() > 100_000  # a real brain mask, not an empty one


@pytest.mark.parametrize(
    ("name", "suffix", "stem"),
    [
        ("ct.nii.gz", ".nii.gz", "ct"),
        ("CT.NII.GZ", ".nii.gz", "CT"),
        ("brain.t1.nii", ".nii", "brain.t1"),
        ("dir.nii/scan.Nii", ".nii", "scan"),
        ("archive.gz", None, "archive.gz"),
        ("ct.nii.gz.bak", None, "ct.nii.gz.bak"),
        ("notnii", None, "notnii"),
    ],
)
def test_nifti_suffix_helpers(name, suffix, stem):
    assert nifti.nifti_suffix(name) == suffix
    assert nifti.nifti_suffix(Path(name)) == suffix
    assert nifti.is_nifti_path(name) == (suffix is not None)
    assert nifti.nifti_stem(name) == stem

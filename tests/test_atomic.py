"""io.atomic.atomic_path: the one way the package writes a file a user keeps."""

from __future__ import annotations

import os
import stat

import pytest

from napari_sam.io.atomic import atomic_path


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_the_new_file_replaces_the_old_one_only_when_complete(tmp_path):
    target = tmp_path / "labels.nii.gz"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".labels.tmp-")
        assert tmp.name.endswith(".nii.gz")  # writers that read the suffix choose alike
        assert tmp.read_bytes() == b""
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing visible before the body returns
    assert target.read_bytes() == b"new"
    assert _names(tmp_path) == ["labels.nii.gz"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"par")
        raise KeyboardInterrupt  # a cancel is cleaned up like an error
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["model.safetensors"]


def test_explicit_suffix_and_umask_mode(tmp_path):
    previous = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "out", suffix=".npy") as tmp:
            assert tmp.name.startswith(".out.tmp-") and tmp.name.endswith(".npy")
            tmp.write_bytes(b"x")
    finally:
        os.umask(previous)
    # A normal new file's mode (0666 less the umask), not mkstemp's private 0600.
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o640


def test_a_missing_folder_is_an_error_not_a_silent_mkdir(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "no" / "file.npy"):
        pass

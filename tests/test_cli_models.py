"""``napari-sam models``: listing, cache status, download with progress, paths, inspection."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import small_vit_spec
from napari_sam import weights
from napari_sam.cli import main
from napari_sam.registry import MODELS
from test_weights import file_spec, serve

OFFICIAL = ("vit_h", "vit_l", "vit_b", "vit_t", "medsam_vit_b")


def _status_lines(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        first = line.split(" ", 1)[0]
        if first in MODELS:
            rows[first] = line
    return rows


def test_help_exits_zero():
    result = subprocess.run(
        [sys.executable, "-m", "napari_sam.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "models" in result.stdout
    with pytest.raises(SystemExit) as info:
        main(["models", "--help"])
    assert info.value.code == 0


def test_list_shows_cache_status(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = _status_lines(out)
    assert set(OFFICIAL) <= set(rows)
    for name in OFFICIAL:
        assert rows[name].endswith("not cached"), rows[name]
    assert str(weights.cache_dir()) in out
    assert "2.6 GB" in rows["vit_h"] and "375 MB" in rows["vit_b"]
    assert "Apache-2.0" in rows["vit_t"]
    assert "github.com/bowang-lab/MedSAM" in out  # where to get the file without a URL

    placed = weights.destination("vit_b")
    placed.write_bytes(b"weights")
    assert main(["models", "list"]) == 0
    rows = _status_lines(capsys.readouterr().out)
    assert rows["vit_b"].endswith(f"cached: {placed}")
    assert rows["vit_l"].endswith("not cached")


def test_path_prints_destination(capsys):
    assert main(["models", "path", "medsam_vit_b"]) == 0
    assert capsys.readouterr().out.strip() == str(weights.cache_dir() / "medsam_vit_b.pth")
    assert main(["models", "path", "no_such_model"]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


def test_download_with_progress_and_checksum(monkeypatch, capsys):
    data = os.urandom(1_500_000)
    spec = file_spec(data, None)
    monkeypatch.setitem(MODELS, spec.name, spec)
    with serve({"tiny_test.pth": data}) as base:
        assert main(["models", "download", "tiny_test", "--base-url", base]) == 0
        captured = capsys.readouterr()
        assert "100%" in captured.err  # tqdm progress bar
        assert spec.sha256 in captured.out
        assert weights.cached_path(spec).read_bytes() == data
        # Already there: nothing is fetched again.
        assert main(["models", "download", "tiny_test", "--base-url", base]) == 0
        assert "already cached" in capsys.readouterr().out

    monkeypatch.setitem(MODELS, spec.name, spec.replace(sha256="f" * 64))
    with serve({"tiny_test.pth": data}) as base:
        code = main(["models", "download", "tiny_test", "--base-url", base, "--force"])
    assert code == 2
    assert "SHA-256 mismatch" in capsys.readouterr().err
    assert weights.cached_path(spec).read_bytes() == data  # the verified file is kept


def test_download_failures_exit_nonzero(monkeypatch, capsys):
    monkeypatch.delenv("NAPARI_SAM_BASE_URL", raising=False)
    # MedSAM now downloads from the Hugging Face Hub (tests/test_hub.py); a spec without any
    # source still says where to get the file.
    no_url = MODELS["vit_b"].replace(name="no_url", url=None, filename="no_url.pth")
    monkeypatch.setitem(MODELS, "no_url", no_url)
    assert main(["models", "download", "no_url"]) == 2
    err = capsys.readouterr().err
    assert "no stable URL" in err and str(weights.destination("no_url")) in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["models", "download", "medsam_vit_b"]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "wanglab/medsam-vit-base" in err
    with serve({}) as base:
        pass
    assert main(["models", "download", "vit_b", "--base-url", base]) == 2
    err = capsys.readouterr().err
    assert f"{base}/sam_vit_b_01ec64.pth" in err
    assert list(weights.cache_dir().iterdir()) == []


def test_inspect_reports_model_type(tmp_path, capsys):
    from napari_sam.models.build import build_sam

    plain = tmp_path / "plain.pth"
    torch.save(build_sam(small_vit_spec()).state_dict(), plain)
    assert main(["models", "inspect", str(plain)]) == 0
    out = capsys.readouterr().out
    assert "custom_vit_e64_d2_h2_s256 (from the tensor shapes)" in out
    assert "image_size 256" in out
    bad = tmp_path / "bad.pth"
    bad.write_bytes(plain.read_bytes()[:300])
    assert main(["models", "inspect", str(bad)]) == 2
    assert f"{bad}: it is truncated, corrupt" in capsys.readouterr().err

"""``napari-sam amg``: the reference script's outputs from images of any type and NIfTI slices."""

from __future__ import annotations

import inspect
import json
import os

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import build_seeded, small_vit_spec
from napari_sam.amg_utils import coco_decode_rle, rle_to_mask
from napari_sam.automatic import SamAutomaticMaskGenerator
from napari_sam.cli import build_parser, main
from napari_sam.commands.amg import (
    AMG_SETTINGS,
    METADATA_HEADER,
    amg_kwargs,
    read_image,
)
from napari_sam.intensity import parse_window, to_rgb_uint8
from napari_sam.speed import with_precision
from napari_sam.weights import save_checkpoint

LOOSE = ["--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--points-per-side", "3"]


@pytest.fixture(scope="module")
def model():
    return build_seeded(small_vit_spec("cli_small")).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "small.pth")


def _image(h=60, w=80, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 30, np.uint8)
    img[10:40, 20:60] = (220, 80, 40)
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


def _run(*argv) -> int:
    return main(["amg", *map(str, argv), "--quiet"])


def test_png_folder_output_matches_generator(model, checkpoint, tmp_path, capsys):
    img = _image()
    Image.fromarray(img).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    argv = [tmp_path / "photo.png", "-o", out, "--model", checkpoint, "--precision", "auto"]
    assert _run(*argv, *LOOSE) == 0
    # The command runs at precision "auto" (its default); so does the generator here. Both then
    # do the same float32 operations in the same order and agree exactly, on any CPU. (The
    # exact path differs from the fast one by float32 rounding: 7e-8 on a predicted IoU of
    # 0.06 on an AMD EPYC, enough to miss a default approx and to flip a pixel at threshold.)
    records = SamAutomaticMaskGenerator(
        with_precision(model, "auto"),
        points_per_side=3,
        pred_iou_thresh=0,
        stability_score_thresh=0,
    ).generate(img)
    folder = out / "photo"
    assert len(records) > 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{i}.png" for i in range(len(records))] + ["metadata.csv"]
    )
    for i, r in enumerate(records):
        png = np.asarray(Image.open(folder / f"{i}.png"))
        assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
        np.testing.assert_array_equal(png == 255, r["segmentation"])
    lines = (folder / "metadata.csv").read_text().split("\n")
    assert lines[0] == METADATA_HEADER
    first = lines[1].split(",")
    assert len(first) == len(METADATA_HEADER.split(","))
    assert int(first[1]) == records[0]["area"]
    assert [int(v) for v in first[2:6]] == records[0]["bbox"]
    assert float(first[8]) == records[0]["predicted_iou"]  # str(float) reads back exactly
    assert f"{len(records)} masks" in capsys.readouterr().out


def test_any_dtype_folder_and_rle(checkpoint, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    gray16 = (_image()[..., 0].astype(np.uint16) * 250).astype(np.uint16)
    tifffile.imwrite(src / "a16.tif", gray16)
    np.save(src / "b.npy", np.moveaxis(_image(seed=1).astype(np.float32), -1, 0))  # C x H x W
    Image.fromarray(_image(seed=2)).convert("RGBA").save(src / "c.png")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert _run(src, "-o", out, "--model", checkpoint, "--convert-to-rle", *LOOSE) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a16.json", "b.json", "c.json"]
    assert "skipping" in capsys.readouterr().out
    records = json.loads((out / "a16.json").read_text())
    assert records
    for r in records:
        mask = rle_to_mask(coco_decode_rle(r["segmentation"]))
        assert mask.shape == (60, 80) and mask.sum() == r["area"]
        assert set(r) == {
            "segmentation",
            "area",
            "bbox",
            "predicted_iou",
            "point_coords",
            "stability_score",
            "crop_box",
        }


def test_nifti_slice(checkpoint, tmp_path, capsys):
    vol = np.zeros((50, 40, 6), np.int16)  # x, y, z on disk
    vol[10:30, 5:25, :] = 900
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    out = tmp_path / "out"
    assert _run(path, "-o", out, "--model", checkpoint, "--slice", 2, *LOOSE) == 0
    assert (out / "ct_slice2" / "metadata.csv").exists()
    image, to_uint8, name = read_image(path, 2, 0, "minmax")
    assert name == "ct_slice2" and image.ndim == 2
    assert to_uint8(image).shape == (*image.shape, 3)
    assert _run(path, "-o", out, "--model", checkpoint, *LOOSE) == 2
    assert "--slice Z" in capsys.readouterr().err
    assert _run(path, "-o", out, "--model", checkpoint, "--slice", 99, *LOOSE) == 2
    assert "outside" in capsys.readouterr().err


def test_window_option(tmp_path):
    img = np.arange(100, dtype=np.float32).reshape(10, 10)
    np.save(tmp_path / "x.npy", img)
    _, default, _ = read_image(tmp_path / "x.npy")
    np.testing.assert_array_equal(default(img), to_rgb_uint8(img))

    _, windowed, _ = read_image(tmp_path / "x.npy", window=parse_window("0,50"))
    assert windowed(img)[9, 9, 0] == 255 and windowed(img)[0, 2, 0] == 10


def test_existing_output_and_errors(checkpoint, tmp_path, capsys):
    Image.fromarray(_image()).save(tmp_path / "p.png")
    out = tmp_path / "out"
    assert _run(tmp_path / "p.png", "-o", out, "--model", checkpoint, *LOOSE) == 0
    marker = out / "p" / "0.png"
    before = marker.stat().st_mtime_ns
    assert _run(tmp_path / "p.png", "-o", out, "--model", checkpoint, *LOOSE) == 2
    assert "--force" in capsys.readouterr().err
    assert marker.stat().st_mtime_ns == before  # nothing replaced
    assert _run(tmp_path / "p.png", "-o", out, "--model", checkpoint, "--force", *LOOSE) == 0
    assert sorted(p.name for p in out.iterdir()) == ["p"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "p").stat().st_mode & 0o777 == 0o777 & ~umask  # a normal folder
    assert marker.stat().st_mode & 0o777 == 0o666 & ~umask
    assert _run(tmp_path / "missing.png", "-o", out, "--model", checkpoint) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _run(tmp_path / "p.png", "-o", out, "--model", tmp_path / "nope.pth") == 2
    assert "nope.pth" in capsys.readouterr().err
    assert _run(tmp_path / "p.png", "-o", out, "--model", checkpoint, "--points-per-side", 0) == 2
    assert "points_per_side" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert _run(tmp_path / "bad.png", "-o", out, "--model", checkpoint) == 2
    assert "cannot read" in capsys.readouterr().err


def test_amg_settings_reach_the_generator():
    argv = "amg x.png -o out --model-type vit_t --crop-n-layers 1 --crop-overlap-ratio 0.25"
    argv += " --min-mask-region-area 10 --box-nms-thresh 0.5"
    args = build_parser().parse_args(argv.split())
    assert args.model == "vit_t"
    assert amg_kwargs(args) == {
        "crop_n_layers": 1,
        "crop_overlap_ratio": 0.25,
        "min_mask_region_area": 10,
        "box_nms_thresh": 0.5,
    }
    # Every option maps to a keyword the generator accepts.
    accepted = inspect.signature(SamAutomaticMaskGenerator).parameters
    assert all(o[2:].replace("-", "_") in accepted for o, _, _ in AMG_SETTINGS)

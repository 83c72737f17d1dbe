"""``napari-sam segment`` and ``napari-sam embed``: results with the test model, error paths."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_sam.cli import main
from napari_sam.io.nifti import read_nifti
from napari_sam.prompts import mask_to_box, mask_to_points
from napari_sam.training.synthetic import ellipsoid_volume
from testmodel import TEST_MODEL_PATH
from volume_helpers import dice, one_torch_thread  # noqa: F401 (autouse fixture)

MODEL = str(TEST_MODEL_PATH)


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A NIfTI volume with two ellipsoids, and its truth in display orientation."""
    folder = tmp_path_factory.mktemp("scan")
    volume, truth = ellipsoid_volume(np.random.default_rng(2024), (28, 128, 160), n_objects=2)
    affine = np.diag([0.9, 0.9, 2.0, 1.0])
    path = folder / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(volume, (2, 1, 0)), affine), path)
    nib.save(
        nib.Nifti1Image(np.transpose(truth, (2, 1, 0)).astype(np.uint8), affine),
        folder / "truth.nii.gz",
    )
    return path, read_nifti(folder / "truth.nii.gz").data


def largest_slice_box(truth: np.ndarray, label: int) -> tuple[int, list[int]]:
    z = int(np.argmax((truth == label).sum(axis=(1, 2))))
    x0, y0, x1, y1 = (int(v) for v in mask_to_box(truth[z] == label))
    return z, [x0 - 2, y0 - 2, x1 + 2, y1 + 2]


def test_segment_box_propagates(scan, tmp_path, capsys):
    path, truth = scan
    z, box = largest_slice_box(truth, 1)
    out = tmp_path / "labels.nii.gz"
    argv = ["segment", str(path), "--slice", str(z), "--box", *map(str, box), "--model", MODEL]
    code = main([*argv, "--cache-dir", str(tmp_path / "cache"), "-o", str(out), "--quiet"])
    assert code == 0
    assert f"wrote {out}" in capsys.readouterr().out
    labels = read_nifti(out).data
    d = dice(labels == 1, truth == 1)
    print(f"segment command: Dice {d:.3f}")
    assert d >= 0.9 and set(np.unique(labels)) == {0, 1}
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(path).affine)
    # --no-propagate: the prompted slice only.
    flat = tmp_path / "flat.nii.gz"
    assert main([*argv, "--no-propagate", "--no-cache", "-o", str(flat), "--quiet"]) == 0
    only = read_nifti(flat).data
    assert [i for i in range(only.shape[0]) if only[i].any()] == [z]


def test_segment_accepts_model_type(scan, tmp_path):
    # segment_anything's scripts spell the model option --model-type; every command takes it.
    path, truth = scan
    z, box = largest_slice_box(truth, 1)
    out = tmp_path / "one_slice.nii.gz"
    argv = ["segment", str(path), "--slice", str(z), "--box", *map(str, box), "--no-propagate"]
    assert main([*argv, "--model-type", MODEL, "--no-cache", "-o", str(out), "--quiet"]) == 0
    labels = read_nifti(out).data
    assert [i for i in range(labels.shape[0]) if labels[i].any()] == [z]
    assert dice(labels[z] == 1, truth[z] == 1) >= 0.9


def test_segment_runs_the_fast_path_by_default_and_exact_on_request(scan, tmp_path, monkeypatch):
    import napari_sam.speed as speed

    made = []
    real = speed.with_precision

    def spy(model, precision="auto"):
        out = real(model, precision)
        made.append((precision, type(out).__name__))
        return out

    monkeypatch.setattr(speed, "with_precision", spy)
    path, truth = scan
    z, box = largest_slice_box(truth, 1)
    argv = ["segment", str(path), "--slice", str(z), "--box", *map(str, box), "--model", MODEL]
    fast, exact = tmp_path / "fast.nii.gz", tmp_path / "exact.nii.gz"
    assert main([*argv, "--no-cache", "-o", str(fast), "--quiet"]) == 0
    assert main([*argv, "--no-cache", "--precision", "exact", "-o", str(exact), "--quiet"]) == 0
    assert made == [("auto", "FastSam"), ("exact", "Sam")]
    a, b = read_nifti(fast).data, read_nifti(exact).data
    agreement = dice(a == 1, b == 1)
    print(f"fast vs exact labels: Dice {agreement:.5f}")
    assert agreement >= 0.99 and dice(a == 1, truth == 1) >= 0.9


def test_segment_prompts_json_several_objects(scan, tmp_path):
    path, truth = scan
    z1, box1 = largest_slice_box(truth, 1)
    z2, _ = largest_slice_box(truth, 2)
    inside = mask_to_points(truth[z2] == 2, 1)[0].tolist()  # the deepest pixel of the object
    doc = {
        "objects": [
            {"label": 4, "name": "first", "prompts": [{"slice": z1, "box": box1}]},
            {"label": 9, "prompts": [{"slice": z2, "points": [inside]}]},
        ]
    }
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(doc))
    out = tmp_path / "two.nii.gz"
    args = ["segment", str(path), "--prompts", str(prompts), "--model", MODEL, "--no-cache"]
    assert main([*args, "-o", str(out), "--quiet"]) == 0
    labels = read_nifti(out).data
    assert set(np.unique(labels)) == {0, 4, 9}
    assert dice(labels == 4, truth == 1) >= 0.85
    assert dice(labels == 9, truth == 2) >= 0.7  # one click only


def test_embed_then_reuse(scan, tmp_path, capsys):
    path, _ = scan
    cache = tmp_path / "emb"
    args = ["embed", str(path), "--model", MODEL, "--cache-dir", str(cache), "--quiet"]
    assert main([*args, "--slices", "3:7"]) == 0
    assert "4 slices (4 encoded, 0 already stored)" in capsys.readouterr().out
    (store,) = cache.iterdir()
    assert sorted(p.name for p in store.glob("slice_*.npz")) == [
        f"slice_{i:05d}.npz" for i in range(3, 7)
    ]
    assert main([*args, "--slices", "5:9"]) == 0
    assert "4 slices (2 encoded, 2 already stored)" in capsys.readouterr().out


def _write(folder, name, content):
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no prompt"),
        (["--box", "1", "1", "9", "9"], "need --slice"),
        (["--slice", "3", "--negative", "5", "5"], "--negative alone"),
        (["--slice", "40", "--box", "1", "1", "9", "9"], "slice 40 is outside"),
        (["--slice", "3", "--point", "160", "5"], "point (160, 5) is outside"),
        (["--slice", "3", "--point", "-1", "5"], "outside slice 3"),
        (["--slice", "3", "--box", "9", "1", "1", "9"], "X0 < X1"),
        (["--slice", "3", "--box", "1", "1", "200", "9"], "reaches outside"),
        (["--slice", "3", "--box", "1", "1", "9", "9", "--slices", "9:4"], "--slices"),
        (["--slice", "3", "--box", "1", "1", "9", "9", "--label", "0"], "--label"),
        (["--slice", "3", "--box", "1", "1", "9", "9", "--window", "5,1"], "HIGH must be"),
        (["--slice", "3", "--box", "1", "1", "9", "9", "--window", "weird"], "window mode"),
        (["--slice", "3", "--box", "1", "1", "9", "9", "--model", "vit_q"], "vit_q"),
        (["--slice", "3", "--box", "1", "1", "9", "9", "--model", "nope.pth"], "nope.pth"),
    ],
)
def test_segment_errors(scan, tmp_path, capsys, extra, message):
    path, _ = scan
    argv = ["segment", str(path), "-o", str(tmp_path / "o.nii.gz"), "--quiet", "--no-cache"]
    if "--model" not in extra:
        argv += ["--model", MODEL]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-sam segment: error:") and message in err
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"objects": []}, "at least one object"),
        ({"objects": [{"label": 0, "prompts": [{"slice": 1, "box": [1, 1, 5, 5]}]}]}, "'label'"),
        ({"objects": [{"label": 1, "prompts": []}]}, "non-empty list"),
        ({"objects": [{"label": 1, "prompts": [{"slice": 1}]}]}, "give a 'box'"),
        ({"objects": [{"label": 1, "prompts": [{"slice": 1, "box": [1, 2]}]}]}, "4 numbers"),
        ({"objects": [{"label": 1, "prompts": [{"slice": 1, "absent": True}]}]}, "every prompt"),
        ({"objects": [{"label": 1, "colour": "red", "prompts": []}]}, "unknown keys"),
        (
            [
                {"label": 2, "prompts": [{"slice": 1, "box": [1, 1, 5, 5]}]},
                {"label": 2, "prompts": [{"slice": 2, "box": [1, 1, 5, 5]}]},
            ],
            "used by two objects",
        ),
        ({"objects": [{"label": 1, "prompts": [{"slice": 99, "box": [1, 1, 5, 5]}]}]}, "slice 99"),
    ],
)
def test_prompts_file_errors(scan, tmp_path, capsys, doc, message):
    path, _ = scan
    prompts = _write(tmp_path, "p.json", doc)
    argv = ["segment", str(path), "--prompts", prompts, "-o", str(tmp_path / "o.nii.gz")]
    assert main([*argv, "--model", MODEL]) == 2
    assert message in capsys.readouterr().err


def test_path_errors(scan, tmp_path, capsys):
    path, _ = scan
    box = ["--slice", "3", "--box", "1", "1", "9", "9", "--model", MODEL]
    cases = [
        (
            ["segment", str(tmp_path / "none.nii.gz"), *box, "-o", str(tmp_path / "o.nii.gz")],
            "does not exist",
        ),
        (
            ["segment", _write(tmp_path, "a.txt", "x"), *box, "-o", str(tmp_path / "o.nii.gz")],
            "not a NIfTI",
        ),
        (["segment", str(path), *box, "-o", str(tmp_path / "o.png")], "must end in .nii"),
        (["segment", str(path), *box, "-o", str(tmp_path / "no" / "o.nii.gz")], "does not exist"),
        (["segment", str(path), *box, "-o", str(path)], "pass --force"),
        (
            ["segment", str(path), *box, "--prompts", "p.json", "-o", str(tmp_path / "o.nii.gz")],
            "not both",
        ),
        (
            [
                "segment",
                str(path),
                "--prompts",
                str(tmp_path / "missing.json"),
                "-o",
                str(tmp_path / "o.nii.gz"),
            ],
            "missing.json does not exist",
        ),
        (["embed", str(tmp_path / "none.nii"), "--model", MODEL], "does not exist"),
        (["embed", str(path), "--model", MODEL, "--slices", "a:b"], "--slices"),
        (["embed", str(path), "--model", MODEL, "--no-cache"], "--no-cache"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    truncated = tmp_path / "broken.nii.gz"
    truncated.write_bytes(path.read_bytes()[:200])
    assert main(["segment", str(truncated), *box, "-o", str(tmp_path / "o.nii.gz")]) == 2
    assert "cannot read" in capsys.readouterr().err

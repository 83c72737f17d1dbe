"""ONNX export of the prompt decoder: onnxruntime against the PyTorch predictor.

A small model (image_size 256, two-block ViT, random perturbed weights) is exported; the ONNX
file must give the predictor's logits (max abs difference <= 1e-3) for 1, 3 and 5 points, with
and without a box and a mask input, for images of several sizes (the size is a graph input).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import build_seeded, small_vit_spec
from napari_sam.amg_utils import calculate_stability_score
from napari_sam.cli import main
from napari_sam.models.build import build_sam
from napari_sam.onnx_export import (
    INPUT_NAMES,
    export_decoder,
    onnx_inputs,
    output_names,
    quantize_decoder,
)
from napari_sam.predictor import SamPredictor
from napari_sam.weights import save_checkpoint

LOGIT_TOL = 1e-3


def _small_model(preprocessing: str = "sam"):
    model = build_seeded(small_vit_spec("onnx_small", preprocessing=preprocessing))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and "pixel_" not in name:
                t.add_(0.05 * torch.randn(t.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _small_model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    multi = export_decoder(model, folder / "decoder.onnx")
    single = export_decoder(model, folder / "decoder_single.onnx", return_single_mask=True)
    return {
        "multi": ort.InferenceSession(str(multi)),
        "single": ort.InferenceSession(str(single)),
        "path": multi,
    }


@pytest.fixture(scope="module")
def predictors(model):
    rng = np.random.default_rng(0)
    out = []
    for h, w in [(200, 300), (301, 97)]:
        p = SamPredictor(model)
        p.set_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out.append(p)
    return out


def test_graph_inputs_outputs(exported):
    model = onnx.load(str(exported["path"]))
    assert [i.name for i in model.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in model.graph.output] == output_names()
    dims = model.graph.input[1].type.tensor_type.shape.dim
    assert dims[1].dim_param == "num_points"  # dynamic number of points
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [
        1,
        256,
        16,
        16,
    ]
    assert [d.dim_value for d in model.graph.input[3].type.tensor_type.shape.dim] == [1, 1, 64, 64]


@pytest.mark.parametrize("n_points", [1, 3, 5])
@pytest.mark.parametrize("with_box", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_onnx_matches_predictor(exported, predictors, n_points, with_box, with_mask):
    case = n_points * 4 + 2 * with_box + with_mask
    rng = np.random.default_rng(case)
    for predictor in predictors[case % 2 :][:1]:  # image sizes alternate between cases
        h, w = predictor.original_size
        points = rng.random((n_points, 2)) * [w - 1, h - 1]
        labels = rng.integers(0, 2, n_points)
        box = np.array([0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h]) if with_box else None
        mask = rng.normal(0, 3, (1, 64, 64)).astype(np.float32) if with_mask else None
        inputs = onnx_inputs(
            predictor.transform,
            (h, w),
            predictor.get_image_embedding(),
            points,
            labels,
            box,
            mask,
        )
        masks, iou, low = exported["multi"].run(None, inputs)
        assert masks.shape == (1, 4, h, w) and iou.shape == (1, 4) and low.shape == (1, 4, 64, 64)
        multi = predictor.predict(points, labels, box, mask, return_logits=True)
        one = predictor.predict(
            points, labels, box, mask, multimask_output=False, return_logits=True
        )
        assert np.abs(masks[0, 1:] - multi[0]).max() <= LOGIT_TOL
        assert np.abs(masks[0, :1] - one[0]).max() <= LOGIT_TOL
        assert np.abs(low[0, 1:] - multi[2]).max() <= LOGIT_TOL
        assert np.abs(iou[0, 1:] - multi[1]).max() <= 1e-4
        assert np.abs(iou[0, :1] - one[1]).max() <= 1e-4

        # Single-mask export: token 0 with more than two points (incl. padding or box
        # corners), otherwise the best multimask output.
        s_masks, s_iou, _ = exported["single"].run(None, inputs)
        total_points = inputs["point_coords"].shape[1]
        best = 0 if total_points > 2 else 1 + int(np.argmax(iou[0, 1:]))
        assert s_masks.shape == (1, 1, h, w)
        assert np.abs(s_masks[0, 0] - masks[0, best]).max() <= LOGIT_TOL
        assert s_iou[0, 0] == pytest.approx(iou[0, best], abs=1e-5)


def test_quantized_decoder_runs_close(exported, predictors, tmp_path):
    quantized = quantize_decoder(exported["path"], tmp_path / "int8.onnx")
    assert quantized.stat().st_size < exported["path"].stat().st_size / 2
    p = predictors[0]
    inputs = onnx_inputs(
        p.transform, p.original_size, p.get_image_embedding(), np.array([[50.0, 60.0]]), [1]
    )
    full = exported["multi"].run(None, inputs)[0]
    q = ort.InferenceSession(str(quantized)).run(None, inputs)[0]
    assert q.shape == full.shape
    assert ((q > 0) == (full > 0)).mean() > 0.9


def test_extra_metrics_and_stability_score(model, predictors, tmp_path):
    path = export_decoder(
        model, tmp_path / "extra.onnx", return_extra_metrics=True, use_stability_score=True
    )
    session = ort.InferenceSession(str(path))
    assert [o.name for o in session.get_outputs()] == output_names(True)
    p = predictors[0]
    inputs = onnx_inputs(
        p.transform, p.original_size, p.get_image_embedding(), np.array([[50.0, 60.0]]), [1]
    )
    masks, scores, stability, areas, low = session.run(None, inputs)
    expected_scores = calculate_stability_score(torch.as_tensor(low), 0.0, 1.0).numpy()
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(areas, (masks > 0).sum((-1, -2)))
    expected = calculate_stability_score(torch.as_tensor(masks), 0.0, 1.0).numpy()
    np.testing.assert_allclose(stability, expected, atol=1e-6, equal_nan=True)


def test_medsam_export_stretches(tmp_path):
    model = _small_model("medsam")
    path = export_decoder(model, tmp_path / "medsam.onnx")
    session = ort.InferenceSession(str(path))
    p = SamPredictor(model)
    p.set_image(np.random.default_rng(3).integers(0, 256, (120, 200, 3), dtype=np.uint8))
    box = np.array([20.0, 30.0, 150.0, 100.0])
    inputs = onnx_inputs(p.transform, p.original_size, p.get_image_embedding(), box=box)
    masks = session.run(None, inputs)[0]
    expected = p.predict(box=box, multimask_output=False, return_logits=True)[0]
    assert np.abs(masks[0, :1] - expected).max() <= LOGIT_TOL


def test_export_errors_leave_nothing(model, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_decoder(model, tmp_path / "x.onnx", opset=9)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        quantize_decoder(tmp_path / "missing.onnx", tmp_path / "q.onnx")


def test_export_onnx_command(model, tmp_path, capsys):
    checkpoint = save_checkpoint(model, tmp_path / "small.pth")
    out, quant = tmp_path / "d.onnx", tmp_path / "d8.onnx"
    argv = ["export-onnx", "--model", str(checkpoint), "-o", str(out), "--quantize-out", str(quant)]
    inputs = onnx_inputs(
        SamPredictor(model).transform, (30, 40), torch.zeros(1, 256, 16, 16), [[5.0, 5.0]], [1]
    )

    def n_masks(path):
        return ort.InferenceSession(str(path)).run(None, inputs)[0].shape[1]

    assert main([*argv, "--return-single-mask"]) == 0
    assert n_masks(out) == n_masks(quant) == 1
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "d8.onnx", "small.pth"]
    assert main(argv) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    assert n_masks(out) == 4
    assert (
        main(["export-onnx", "--model", str(tmp_path / "nope.pth"), "-o", str(tmp_path / "n.onnx")])
        == 2
    )
    assert "nope.pth" in capsys.readouterr().err


def test_official_decoder_size(tmp_path):
    # Every official model has this decoder: 64 x 64 embeddings, 256 x 256 low-res masks.
    model = build_sam("vit_t")
    path = export_decoder(model, tmp_path / "vit_t_decoder.onnx", gelu_approximate=True)
    graph = onnx.load(str(path)).graph
    shape = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert shape == [1, 256, 64, 64]
    assert [d.dim_value for d in graph.input[3].type.tensor_type.shape.dim] == [1, 1, 256, 256]
    assert all(m.approximate == "none" for m in model.modules() if isinstance(m, torch.nn.GELU))
    p = SamPredictor(model)
    p.set_image_embedding(torch.randn(1, 256, 64, 64), (300, 500))
    inputs = onnx_inputs(p.transform, (300, 500), p.features, [[100.0, 200.0]], [1])
    masks = ort.InferenceSession(str(path)).run(None, inputs)[0]
    expected = p.predict(np.array([[100.0, 200.0]]), np.array([1]), return_logits=True)[0]
    assert masks.shape == (1, 4, 300, 500)
    # tanh GELU: close to the exact decoder, not equal.
    assert np.abs(masks[0, 1:] - expected).max() < 0.05

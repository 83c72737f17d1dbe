"""transformers-format SAM checkpoints: the same masks through this package as through transformers.

A small random ``SamModel`` (48-wide, 3-block ViT with 3 heads, 5 x 5 windows that do not
tile its 8 x 8 grid, 128-pixel input; SAM's real prompt encoder and mask decoder) is saved with
``save_pretrained`` and loaded by :func:`napari_sam.load_model`; transformers' own processor and
model answer the same prompts on a 301 x 217 image.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import transformers  # a test dependency ([test] extra), never imported by the package
from huggingface_hub import constants

from napari_sam import SamPredictor, build_sam, load_model, sam_model_registry
from napari_sam.registry import MODELS
from napari_sam.weights import cached_path, read_state_dict
from napari_sam.weights.hf import (
    UnsupportedHFModelError,
    convert_hf_state_dict,
    is_hf_checkpoint,
    read_hf_checkpoint,
)
from test_weights_hub import COMMIT, REPO, hub_server

# Importing transformers and building its model take ~20 s on a loaded 2-core machine.
pytestmark = pytest.mark.slow

SIZE = 128
HEIGHT, WIDTH = 217, 301
POINT = (150.0, 100.0)
BOX = (90.0, 40.0, 220.0, 170.0)


def _randomise(model: torch.nn.Module) -> None:
    # transformers initialises rel_pos and pos_embed to zero and the positional encoding with a
    # huge scale; random values everywhere make every converted tensor matter.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("positional_embedding"):
                p.copy_(noise)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.125 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.SamConfig(
        vision_config={
            "hidden_size": 48,
            "num_hidden_layers": 3,
            "num_attention_heads": 3,
            "global_attn_indexes": [1],
            "image_size": SIZE,
            "window_size": 5,
        },
        prompt_encoder_config={"image_size": SIZE},
    )
    model = transformers.SamModel(config).eval()
    _randomise(model)
    return model


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory):
    """The model saved as safetensors, as tiny shards, and as a pickled ``pytorch_model.bin``."""
    root = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(root / "single")
    hf_model.save_pretrained(root / "sharded", max_shard_size="1MB")
    # transformers 5 writes safetensors even with safe_serialization=False; the .bin layout
    # of older releases (both tied positional-encoding keys included) is written by hand.
    hf_model.save_pretrained(root / "bin", safe_serialization=False)
    for f in (root / "bin").glob("*.safetensors"):
        f.unlink()
    state = dict(hf_model.state_dict())
    state["prompt_encoder.shared_embedding.positional_embedding"] = state[
        "shared_image_embedding.positional_embedding"
    ].clone()
    torch.save(state, root / "bin" / "pytorch_model.bin")
    return root


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    img = np.zeros((HEIGHT, WIDTH, 3), np.int64)
    img[..., 0] = xx * 255 // WIDTH
    img[..., 1] = yy * 255 // HEIGHT
    img[(yy - 100) ** 2 + (xx - 150) ** 2 < 50**2] = (200, 30, 90)
    return (img + rng.integers(-20, 20, img.shape)).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def hf_answers(hf_model, image):
    """transformers' masks and IoU scores for the point and the box."""
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    processor = transformers.SamProcessor(
        image_processor=SamImageProcessorPil(
            size={"longest_edge": SIZE}, pad_size={"height": SIZE, "width": SIZE}
        )
    )
    answers = {}
    for kind, prompt in (
        ("point", {"input_points": [[[list(POINT)]]]}),
        ("box", {"input_boxes": [[list(BOX)]]}),
    ):
        inputs = processor(images=image, return_tensors="pt", **prompt)
        with torch.no_grad():
            out = hf_model(**inputs, multimask_output=True)
        masks = processor.image_processor.post_process_masks(
            out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )[0][0]
        answers[kind] = (masks.numpy(), out.iou_scores[0, 0].numpy())
    return answers


def _ours(model, image):
    predictor = SamPredictor(model)
    predictor.set_image(image)
    point_masks, point_scores, _ = predictor.predict(
        point_coords=np.array([POINT]), point_labels=np.array([1]), multimask_output=True
    )
    box_masks, box_scores, _ = predictor.predict(box=np.array(BOX), multimask_output=True)
    return {"point": (point_masks, point_scores), "box": (box_masks, box_scores)}


def _assert_same(ours, hf_answers):
    for kind, (hf_masks, hf_scores) in hf_answers.items():
        masks, scores = ours[kind]
        assert masks.shape == hf_masks.shape == (3, HEIGHT, WIDTH)
        # Random weights still give masks, not empty or full images: the comparison means something.
        assert 0.05 < hf_masks.mean() < 0.95, kind
        for i in range(3):
            agree = (masks[i] == hf_masks[i]).mean()
            assert agree >= 0.999, f"{kind} mask {i}: {agree:.5f} of pixels agree"
        # float32 through different but equivalent arithmetic (and transformers' decoder
        # LayerNorm eps 1e-6 where Meta's is 1e-5): seen 2e-5.
        np.testing.assert_allclose(scores, hf_scores, atol=1e-3, rtol=0)


@pytest.mark.parametrize("variant", ["single", "sharded", "bin"])
def test_same_masks_as_transformers(saved, variant, image, hf_answers):
    folder = saved / variant
    assert is_hf_checkpoint(folder)
    model = load_model(folder, device="cpu")
    assert model.spec.image_size == SIZE
    assert dict(model.spec.encoder_kwargs) == {
        "embed_dim": 48,
        "depth": 3,
        "num_heads": 3,
        "global_attn_indexes": (1,),
        "window_size": 5,
    }
    _assert_same(_ours(model, image), hf_answers)


def test_the_files_themselves_load_too(saved, image, hf_answers):
    # The weights file, the shard index, and config.json all stand for the folder.
    for path in (
        saved / "single" / "model.safetensors",
        saved / "sharded" / "model.safetensors.index.json",
        saved / "bin" / "config.json",
    ):
        state, spec = read_state_dict(path)
        assert spec.image_size == SIZE
        assert "image_encoder.blocks.2.attn.rel_pos_h" in state
    model = build_sam(spec, checkpoint=saved / "single" / "model.safetensors")
    _assert_same(_ours(model, image), hf_answers)


def test_a_lone_weights_file_without_config_is_read_from_its_shapes(saved, tmp_path):
    lone = tmp_path / "weights.safetensors"
    shutil.copy(saved / "single" / "model.safetensors", lone)
    assert is_hf_checkpoint(lone)
    _, spec = read_hf_checkpoint(lone)
    _, from_config = read_hf_checkpoint(saved / "single")
    assert spec.encoder_kwargs == from_config.encoder_kwargs
    assert spec.image_size == from_config.image_size


def test_meta_files_are_not_mistaken_for_transformers(saved, tmp_path):
    state, _ = read_hf_checkpoint(saved / "single")
    meta = tmp_path / "sam.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(meta))
    assert not is_hf_checkpoint(meta)
    assert not is_hf_checkpoint(tmp_path / "missing")
    back, _ = read_state_dict(meta)
    assert back.keys() == state.keys()


def test_conversion_covers_every_tensor_of_the_model(hf_model, saved):
    state, spec = read_hf_checkpoint(saved / "single")
    ours = build_sam(spec).state_dict()
    assert state.keys() == ours.keys()
    assert all(state[k].shape == ours[k].shape for k in ours)
    # Both tied keys or only one: the same positional encoding.
    pe = hf_model.state_dict()["shared_image_embedding.positional_embedding"]
    bin_state, _ = read_hf_checkpoint(saved / "bin")
    for s in (state, bin_state):
        assert torch.equal(s["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"], pe)
    # The MLP heads: proj_in, layers.0, proj_out -> layers.0, 1, 2.
    hf = hf_model.state_dict()
    assert torch.equal(
        state["mask_decoder.iou_prediction_head.layers.2.weight"],
        hf["mask_decoder.iou_prediction_head.proj_out.weight"],
    )
    assert torch.equal(
        state["mask_decoder.output_hypernetworks_mlps.3.layers.1.bias"],
        hf["mask_decoder.output_hypernetworks_mlps.3.layers.0.bias"],
    )


def test_differing_tied_encodings_and_foreign_keys_are_refused(hf_model):
    hf = dict(hf_model.state_dict())
    hf["prompt_encoder.shared_embedding.positional_embedding"] = torch.zeros(2, 128)
    with pytest.raises(ValueError, match="differ"):
        convert_hf_state_dict(hf)
    hf = dict(hf_model.state_dict())
    hf["vision_encoder.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"vision_encoder\.extra_head\.weight"):
        convert_hf_state_dict(hf)


def _with_config(saved, tmp_path, change) -> object:
    folder = tmp_path / "changed"
    shutil.copytree(saved / "single", folder)
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("model_type", "says"),
    [("sam_hq", "SAM-HQ"), ("sam2", "SAM 2"), ("sam2_video", "SAM 2"), ("owlv2", "'owlv2'")],
)
def test_other_model_types_get_a_clear_message(saved, tmp_path, model_type, says):
    folder = _with_config(saved, tmp_path, lambda c: c.update(model_type=model_type))
    with pytest.raises(UnsupportedHFModelError, match=says) as info:
        load_model(folder, device="cpu")
    assert "not supported yet" in str(info.value) or "not a SAM model" in str(info.value)
    assert "facebook/sam-vit-base" in str(info.value)  # what to use instead


def test_other_decoder_sizes_are_refused_by_name(saved, tmp_path):
    folder = _with_config(
        saved, tmp_path, lambda c: c["mask_decoder_config"].update(num_hidden_layers=3)
    )
    with pytest.raises(UnsupportedHFModelError, match=r"mask_decoder_config\.num_hidden_layers"):
        read_state_dict(folder)


def test_missing_shard_and_missing_weights_are_named(saved, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(saved / "sharded", folder)
    victim = sorted(folder.glob("model-*.safetensors"))[2]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(folder, device="cpu")
    empty = tmp_path / "config-only"
    empty.mkdir()
    shutil.copy(saved / "single" / "config.json", empty)
    with pytest.raises(FileNotFoundError, match="holds no transformers weights"):
        load_model(empty, device="cpu")


def test_model_type_and_registry_entry_points(saved, image, hf_answers):
    _, spec = read_hf_checkpoint(saved / "single")
    # A spec of the same layout gives its preprocessing (how MedSAM's registry entry works).
    medsam_like = spec.replace(name="tiny_medsam", preprocessing="medsam")
    model = load_model(saved / "single", model_type=medsam_like, device="cpu")
    assert model.spec.preprocessing == "medsam"
    # The registry's builders read the folder too, and say when the sizes do not fit.
    with pytest.raises(ValueError, match="do not fit model 'vit_b'"):
        sam_model_registry["vit_b"](checkpoint=saved / "single")
    with pytest.raises(ValueError, match="was requested"):
        load_model(saved / "single", model_type="vit_b", device="cpu")
    assert MODELS["vit_b"].preprocessing == "sam"


def test_a_hub_entry_like_medsams_downloads_the_bin_alone(saved, monkeypatch, tmp_path):
    """Registry-style: only pytorch_model.bin from the Hub, the spec (and MedSAM's
    preprocessing) from the registry, the weights exactly transformers'."""
    data = (saved / "bin" / "pytorch_model.bin").read_bytes()
    _, spec = read_hf_checkpoint(saved / "single")
    entry = spec.replace(
        name="tiny_medsam_hub",
        preprocessing="medsam",
        hub_repo=REPO,
        hub_revision=COMMIT,
        hub_files={"pytorch_model.bin": hashlib.sha256(data).hexdigest()},
    )
    monkeypatch.setitem(MODELS, entry.name, entry)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with hub_server({"pytorch_model.bin": data}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        model = load_model(entry.name, device="cpu")
    assert model.spec.preprocessing == "medsam"
    assert [p.name for p in cached_path(entry).iterdir()] == ["pytorch_model.bin"]
    expected, _ = read_state_dict(saved / "single")
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())

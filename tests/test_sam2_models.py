"""SAM 2.1 model code without the reference: layouts, detection, sizes and errors."""

from __future__ import annotations

import pytest
import torch

from napari_sam.models.build import build_sam
from napari_sam.models.sam2.build import build_sam2, build_sam2_modules
from napari_sam.models.sam2.detect import detect_sam2_spec, trunk_layout
from napari_sam.models.sam2.hiera import Hiera
from napari_sam.models.sam2.rope import RoPEAttention
from napari_sam.models.sam2.sam2 import Sam2
from napari_sam.registry import MODELS, ModelSpec, get_spec
from napari_sam.weights import sam_model_registry


@pytest.fixture(autouse=True)
def _one_thread():
    # The CI machine is shared; one thread keeps timings stable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SAM2_NAMES = sorted(name for name, spec in MODELS.items() if spec.family == "sam2")
# Parameter counts Meta publishes for SAM 2.1 (millions).
PUBLISHED_MPARAMS = {
    "sam2.1_hiera_tiny": 38.9,
    "sam2.1_hiera_small": 46.0,
    "sam2.1_hiera_base_plus": 80.8,
    "sam2.1_hiera_large": 224.4,
    "medsam2": 38.9,
}


def _meta_state_dict(spec: ModelSpec) -> dict[str, torch.Tensor]:
    # Shapes only: the meta device allocates nothing, so even hiera_large builds instantly.
    with torch.device("meta"):
        return build_sam2_modules(spec).state_dict()


@pytest.mark.parametrize("name", SAM2_NAMES)
def test_registered_models_have_the_published_size_and_are_recognised(name):
    spec = get_spec(name)
    state = _meta_state_dict(spec)
    n_params = sum(t.numel() for k, t in state.items()) / 1e6
    assert n_params == pytest.approx(PUBLISHED_MPARAMS[name], abs=0.1)
    expected = "sam2.1_hiera_tiny" if name == "medsam2" else name  # same layout
    assert detect_sam2_spec(state) is MODELS[expected]
    layout = trunk_layout(state)
    assert layout["stages"] == tuple(spec.encoder_kwargs["stages"])
    assert layout["embed_dim"] == spec.encoder_kwargs["embed_dim"]


def test_official_key_names_are_used():
    keys = set(_meta_state_dict(get_spec("sam2.1_hiera_tiny")))
    for key in (
        "image_encoder.trunk.pos_embed_window",
        "image_encoder.trunk.blocks.1.proj.weight",  # first block of stage 2
        "image_encoder.trunk.blocks.0.mlp.layers.1.weight",
        "image_encoder.neck.convs.3.conv.weight",
        "memory_attention.layers.3.cross_attn_image.k_proj.weight",
        "memory_encoder.mask_downsampler.encoder.12.weight",
        "memory_encoder.fuser.layers.1.gamma",
        "sam_mask_decoder.transformer.layers.0.mlp.layers.0.weight",
        "sam_mask_decoder.obj_score_token.weight",
        "sam_mask_decoder.pred_obj_score_head.layers.2.weight",
        "sam_mask_decoder.conv_s0.weight",
        "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "obj_ptr_proj.layers.2.weight",
        "obj_ptr_tpos_proj.weight",
        "no_obj_embed_spatial",
        "maskmem_tpos_enc",
        "mask_downsample.weight",
    ):
        assert key in keys, key
    assert not any("lin1" in k for k in keys)  # SAM 1's MLP naming must not leak in


def test_detector_refuses_what_it_cannot_build():
    sam1 = {"image_encoder.patch_embed.proj.weight": torch.empty(768, 3, 16, 16)}
    assert detect_sam2_spec(sam1) is None
    state = _meta_state_dict(get_spec("sam2.1_hiera_tiny"))
    sam2_0 = {k: v for k, v in state.items() if k != "no_obj_embed_spatial"}
    with pytest.raises(ValueError, match=r"SAM 2\.0"):
        detect_sam2_spec(sam2_0)
    custom = build_sam2_modules(_custom_spec()).state_dict()
    detected = detect_sam2_spec(custom)
    assert detected.name == "custom_hiera_e96_s1-1-2-1" and detected.family == "sam2"
    with pytest.raises(ValueError, match="lacks num_heads, global_att_blocks, window_spec"):
        build_sam2(detected)


def _custom_spec() -> ModelSpec:
    tiny = get_spec("sam2.1_hiera_tiny").encoder_kwargs
    return ModelSpec(
        name="small_hiera",
        family="sam2",
        encoder="hiera",
        image_size=128,
        preprocessing="sam2",
        encoder_kwargs={**tiny, "stages": (1, 1, 2, 1), "num_heads": 2, "global_att_blocks": (3,)},
    )


def test_unregistered_trunks_load_with_their_embedded_spec(tmp_path):
    """A model trained here with its own Hiera (a test fixture, say) round-trips through
    save_checkpoint / load_model; without the embedded spec the file is refused clearly."""
    from napari_sam.weights import load_model, save_checkpoint

    spec = _custom_spec()
    torch.manual_seed(0)
    model = build_sam2(spec)
    path = save_checkpoint(model, tmp_path / "small.pth")
    loaded = load_model(path, device="cpu")
    assert loaded.spec == spec and loaded.image_encoder.trunk.blocks[3].window_size == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    bare = tmp_path / "bare.pt"
    torch.save({"model": model.state_dict()}, bare)
    with pytest.raises(ValueError, match="attention layout is not stored"):
        load_model(bare, device="cpu")


def test_registry_and_build_sam_dispatch_to_sam2():
    model = sam_model_registry["sam2.1_hiera_tiny"]()
    assert isinstance(model, Sam2) and model.spec is MODELS["sam2.1_hiera_tiny"]
    assert not model.training and model.image_size == 1024 and model.num_maskmem == 7
    assert model.directly_add_no_mem_embed and model.use_high_res_features_in_sam
    assert model.sam_mask_decoder.dynamic_multimask_via_stability
    # SAM 2's input normalisation: ImageNet mean / std of [0, 1] RGB, here on 0..255.
    imagenet_mean, imagenet_std = (
        torch.tensor([0.485, 0.456, 0.406]),
        torch.tensor([0.229, 0.224, 0.225]),
    )
    assert torch.allclose(model.pixel_mean.flatten(), 255 * imagenet_mean)
    assert torch.allclose(model.pixel_std.flatten(), 255 * imagenet_std)
    assert "pixel_mean" not in model.state_dict()
    assert isinstance(build_sam("medsam2"), Sam2)
    with pytest.raises(ValueError, match="not a SAM 2 model"):
        build_sam2("vit_b")


@pytest.mark.parametrize("size", [160, 224])
@torch.no_grad()
def test_other_image_sizes_encode_and_track(size):
    """Nothing is tied to 1024: grids follow image_size, windows pad, RoPE resizes."""
    torch.manual_seed(0)
    model = build_sam2(get_spec("sam2.1_hiera_tiny").replace(image_size=size))
    grid = size // 16
    out = model.forward_image(torch.randn(1, 3, size, size))
    assert [tuple(f.shape[-2:]) for f in out["backbone_fpn"]] == [
        (4 * grid,) * 2,
        (2 * grid,) * 2,
        (grid,) * 2,
    ]
    _, feats, pos, sizes = model._prepare_backbone_features(out)
    bank = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    clicks = {
        "point_coords": torch.tensor([[[size / 2, size / 3]]]),
        "point_labels": torch.tensor([[1]], dtype=torch.int32),
    }
    for f in range(3):
        step = model.track_step(
            f, f == 0, feats, pos, sizes, clicks if f == 0 else None, None, bank, num_frames=3
        )
        bank["cond_frame_outputs" if f == 0 else "non_cond_frame_outputs"][f] = step
        assert step["pred_masks"].shape == (1, 1, 4 * grid, 4 * grid)
        assert step["pred_masks_high_res"].shape == (1, 1, size, size)
        assert step["maskmem_features"].shape == (1, 64, grid, grid)
        assert torch.isfinite(step["pred_masks"]).all() and torch.isfinite(step["obj_ptr"]).all()


def test_bad_inputs_say_what_to_do():
    model = build_sam2(get_spec("sam2.1_hiera_tiny").replace(image_size=128))
    with pytest.raises(ValueError, match="128 x 128 frames"):
        model.forward_image(torch.zeros(1, 3, 100, 128))
    _, feats, pos, sizes = model._prepare_backbone_features(
        model.forward_image(torch.zeros(1, 3, 128, 128))
    )
    empty = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    with pytest.raises(ValueError, match="no frame has been prompted"):
        model.track_step(1, False, feats, pos, sizes, None, None, empty, num_frames=2)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_sam2(get_spec("sam2.1_hiera_tiny").replace(image_size=144))
    with pytest.raises(NotImplementedError, match="track_step"):
        model(torch.zeros(1))
    with pytest.raises(ValueError, match="square token grid"):
        RoPEAttention(256, 1, feat_sizes=(8, 8))(
            torch.zeros(1, 12, 256), *(torch.zeros(1, 12, 256),) * 2
        )
    with pytest.raises(ValueError, match="one window per stage"):
        Hiera(stages=(1, 2), window_spec=(8, 4, 14))


def test_official_checkpoint_files_load_strictly(tmp_path):
    """A file laid out like Meta's sam2.1_hiera_tiny.pt ({"model": state_dict}) is recognised
    from its keys and loads into our model key for key."""
    from napari_sam.weights import detect_spec, load_model

    torch.manual_seed(0)
    source = build_sam2("sam2.1_hiera_tiny")
    state = {k: v.half() for k, v in source.state_dict().items()}  # half: a smaller file
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": state}, path)
    assert detect_spec(state) is MODELS["sam2.1_hiera_tiny"]

    model = load_model(path, device="cpu")
    assert isinstance(model, Sam2) and model.spec is MODELS["sam2.1_hiera_tiny"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key].float()), key
    # The same weights as MedSAM2 (same layout, 512 input) by name.
    medsam2 = load_model("medsam2", checkpoint=path, device="cpu")
    assert medsam2.spec is MODELS["medsam2"] and medsam2.image_size == 512
    via_registry = sam_model_registry["sam2.1_hiera_tiny"](checkpoint=path)
    assert torch.equal(via_registry.no_obj_ptr, state["no_obj_ptr"].float())
    # A SAM 1 name for a SAM 2 file says what the file is.
    with pytest.raises(ValueError, match=r"sam2\.1_hiera_tiny"):
        load_model(path, model_type="vit_b", device="cpu")


def test_narrow_heads_are_built_detected_and_round_trip(tmp_path):
    """head_kwargs narrow the parts after the encoder; the widths are read back from the
    tensors, so a file whose embedded spec lies about them is refused."""
    from napari_sam.models.sam2.detect import head_layout
    from napari_sam.weights import load_model, save_checkpoint

    heads = {"d_model": 64, "memory_layers": 1, "memory_mlp_dim": 96, "decoder_mlp_dim": 80}
    spec = _custom_spec().replace(head_kwargs=heads)
    torch.manual_seed(0)
    model = build_sam2(spec)
    sd = model.state_dict()
    assert model.hidden_dim == 64 and len(model.memory_attention.layers) == 1
    assert sd["memory_attention.layers.0.linear1.weight"].shape == (96, 64)
    assert head_layout(sd) == heads
    assert head_layout(_meta_state_dict(get_spec("sam2.1_hiera_tiny"))) == {}
    assert detect_sam2_spec(sd).head_kwargs == heads
    assert ModelSpec.from_json(spec.to_json()) == spec
    loaded = load_model(save_checkpoint(model, tmp_path / "narrow.pth"), device="cpu")
    assert loaded.spec == spec
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    liar = save_checkpoint(model, tmp_path / "liar.pth", spec=spec.replace(head_kwargs={}))
    with pytest.raises(ValueError, match="tensors are those of"):
        load_model(liar, device="cpu")
    with pytest.raises(ValueError, match="multiple of 64"):
        build_sam2(spec.replace(head_kwargs={"d_model": 96}))
    with pytest.raises(ValueError, match="unknown head_kwargs"):
        spec.replace(head_kwargs={"width": 3})
    with pytest.raises(ValueError, match="SAM 2 family only"):
        get_spec("vit_b").replace(head_kwargs={"d_model": 64})

"""Model specs: registry contents and serialisation."""

from __future__ import annotations

import pytest

from napari_sam.registry import MODELS, ModelSpec, get_spec


@pytest.mark.parametrize("name", sorted(MODELS))
def test_spec_json_round_trip_is_exact(name):
    spec = MODELS[name]
    assert ModelSpec.from_json(spec.to_json()) == spec


def test_official_models_are_registered_with_sizes_and_licences():
    sam1 = {name for name, spec in MODELS.items() if spec.family == "sam"}
    assert sam1 == {"vit_h", "vit_l", "vit_b", "vit_t", "medsam_vit_b"}
    for spec in MODELS.values():
        assert spec.license == "Apache-2.0"
        assert not spec.test_fixture
        if spec.family == "sam":
            assert spec.image_size == 1024 and spec.embedding_size == 64
            assert spec.low_res_size == 256
    assert MODELS["medsam_vit_b"].preprocessing == "medsam" and MODELS["medsam_vit_b"].url is None
    assert get_spec("default") is MODELS["vit_h"]


def test_bad_specs_and_names_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        ModelSpec(name="x", encoder="vit", image_size=250)
    with pytest.raises(ValueError, match="unknown encoder"):
        ModelSpec(name="x", encoder="resnet")
    with pytest.raises(ValueError, match="unknown encoder 'hiera' for family 'sam'"):
        ModelSpec(name="x", encoder="hiera")
    with pytest.raises(ValueError, match="multiple of 32"):
        ModelSpec(name="x", family="sam2", encoder="hiera", image_size=528)
    with pytest.raises(ValueError, match="registered models"):
        get_spec("vit_z")
    with pytest.raises(ValueError, match="unknown model-spec fields"):
        ModelSpec.from_dict({"name": "x", "encoder": "vit", "colour": "red"})


def test_sam2_models_are_registered_with_official_files():
    sam2 = {name: spec for name, spec in MODELS.items() if spec.family == "sam2"}
    assert set(sam2) == {
        "sam2.1_hiera_tiny",
        "sam2.1_hiera_small",
        "sam2.1_hiera_base_plus",
        "sam2.1_hiera_large",
        "medsam2",
    }
    base = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
    for name, spec in sam2.items():
        assert spec.encoder == "hiera" and spec.preprocessing == "sam2"
        if name != "medsam2":
            assert spec.image_size == 1024 and spec.embedding_size == 64
            assert spec.url == base + name + ".pt" and spec.filename == name + ".pt"
    # Meta's configs: Hiera widths 96 / 96 / 112 / 144, blocks 12 / 16 / 24 / 48.
    widths = [sam2[n].encoder_kwargs["embed_dim"] for n in sorted(sam2) if n != "medsam2"]
    assert widths == [112, 144, 96, 96]  # base_plus, large, small, tiny
    depths = {n: sum(s.encoder_kwargs["stages"]) for n, s in sam2.items()}
    assert depths == {
        "sam2.1_hiera_tiny": 12,
        "sam2.1_hiera_small": 16,
        "sam2.1_hiera_base_plus": 24,
        "sam2.1_hiera_large": 48,
        "medsam2": 12,
    }
    medsam2 = sam2["medsam2"]
    assert medsam2.image_size == 512 and medsam2.embedding_size == 32 and medsam2.url is None
    assert medsam2.filename == "MedSAM2_latest.pt" and "wanglab/MedSAM2" in medsam2.description
    assert medsam2.encoder_kwargs == sam2["sam2.1_hiera_tiny"].encoder_kwargs

"""Model specs: registry contents and serialisation."""

from __future__ import annotations

import pytest

from napari_sam.registry import MODELS, ModelSpec, get_spec


@pytest.mark.parametrize("name", sorted(MODELS))
def test_spec_json_round_trip_is_exact(name):
    spec = MODELS[name]
    assert ModelSpec.from_json(spec.to_json()) == spec


def test_official_models_are_registered_with_sizes_and_licences():
    assert set(MODELS) == {"vit_h", "vit_l", "vit_b", "vit_t", "medsam_vit_b"}
    for spec in MODELS.values():
        assert spec.license == "Apache-2.0"
        assert spec.image_size == 1024 and spec.embedding_size == 64 and spec.low_res_size == 256
        assert not spec.test_fixture
    assert MODELS["medsam_vit_b"].preprocessing == "medsam" and MODELS["medsam_vit_b"].url is None
    assert get_spec("default") is MODELS["vit_h"]


def test_bad_specs_and_names_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        ModelSpec(name="x", encoder="vit", image_size=250)
    with pytest.raises(ValueError, match="unknown encoder"):
        ModelSpec(name="x", encoder="resnet")
    with pytest.raises(ValueError, match="registered models"):
        get_spec("vit_z")
    with pytest.raises(ValueError, match="unknown model-spec fields"):
        ModelSpec.from_dict({"name": "x", "encoder": "vit", "colour": "red"})

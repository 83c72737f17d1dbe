"""Intensity windows: exact uint8 values, presets, percentiles, dispatch, RGB conversion."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam import intensity
from napari_sam.intensity import (
    CT_PRESETS,
    Window,
    contrast_limits_window,
    ct_window,
    make_window,
    medsam_ct_window,
    medsam_mr_window,
    minmax_window,
    percentile_window,
    to_rgb_uint8,
)


def test_presets_are_the_published_width_level_pairs():
    assert CT_PRESETS == {
        "soft_tissue": (400.0, 40.0),
        "lung": (1500.0, -600.0),
        "bone": (1800.0, 400.0),
        "brain": (80.0, 40.0),
        "mediastinum": (350.0, 50.0),
        "liver": (150.0, 30.0),
    }
    assert ct_window("soft_tissue") == Window(-160.0, 240.0)
    assert ct_window("lung") == Window(-1350.0, 150.0)
    assert ct_window("bone") == Window(-500.0, 1300.0)
    assert ct_window("brain") == Window(0.0, 80.0)
    assert ct_window("Soft tissue") == ct_window("soft-tissue") == ct_window(400, 40)
    assert ct_window(100, -50).low == -100.0 and ct_window(100, -50).high == 0.0


def test_window_apply_exact_values_at_edges_and_inside():
    w = ct_window("soft_tissue")  # -160 .. 240, 400 HU wide
    values = np.array([-3000, -161, -160, -159, 0, 40, 239, 240, 241, 3000], dtype=np.int16)
    # (v + 160) / 400 * 255, truncated: -159 -> 0.6375 -> 0; 0 -> 102; 40 -> 127.5 -> 127
    expected = [0, 0, 0, 0, 102, 127, 254, 255, 255, 255]
    out = w.apply(values)
    assert out.dtype == np.uint8
    assert out.tolist() == expected


def test_window_apply_nan_inf_and_shape():
    w = Window(0.0, 10.0)
    arr = np.array([[np.nan, -np.inf], [np.inf, 5.0]], dtype=np.float32)
    out = w.apply(arr)
    assert out.tolist() == [[0, 0], [255, 127]]
    vol = np.linspace(0, 10, 2 * 3 * 4).reshape(2, 3, 4)
    out3 = w.apply(vol)
    assert out3.shape == (2, 3, 4)
    np.testing.assert_array_equal(out3, (vol / 10 * 255).astype(np.uint8))


def test_uint8_identity_window_is_exact():
    values = np.arange(256, dtype=np.uint8)
    assert np.array_equal(Window(0, 255).apply(values), values)
    assert make_window(values.reshape(16, 16), "auto") == Window(0, 255)


def test_window_validation_and_key():
    with pytest.raises(ValueError, match="greater than low"):
        Window(5, 5)
    with pytest.raises(ValueError, match="finite"):
        Window(0, np.inf)
    with pytest.raises(ValueError, match="dtype"):
        Window(0, 1).apply(np.array(["a"]))
    assert Window(0, 1).key() != Window(0, 1.0000001).key()
    assert Window(0, 1).key() == Window(0.0, 1.0).key()
    assert Window(0, 1, keep_zero=True).key() != Window(0, 1).key()
    with pytest.raises(ValueError, match="unknown CT window"):
        ct_window("kidney")
    with pytest.raises(ValueError, match="level"):
        ct_window(400)


def test_percentile_window_matches_numpy_over_whole_volume():
    rng = np.random.default_rng(1)
    vol = rng.normal(500, 100, size=(10, 40, 40)).astype(np.float32)
    vol[:, :5] = 0  # background excluded by nonzero=True
    w = percentile_window(vol)
    nz = vol[vol != 0]
    assert w.low == pytest.approx(float(np.percentile(nz, 0.5)))
    assert w.high == pytest.approx(float(np.percentile(nz, 99.5)))
    w_all = percentile_window(vol, 1, 99, nonzero=False)
    assert w_all.low == pytest.approx(float(np.percentile(vol, 1)))
    assert w_all.high == pytest.approx(float(np.percentile(vol, 99)))
    # One window for the volume, not per slice: a bright slice shifts it for all slices.
    vol[0] += 1000
    assert percentile_window(vol).high > w.high + 500


def test_percentile_window_subsamples_big_volumes_deterministically(monkeypatch):
    monkeypatch.setattr(intensity, "PERCENTILE_SAMPLE_SIZE", 1000)
    vol = np.arange(100_000, dtype=np.float32)
    w = percentile_window(vol, 10, 90, nonzero=False)
    assert w == percentile_window(vol, 10, 90, nonzero=False)
    sample = vol[::100]
    assert w.low == pytest.approx(float(np.percentile(sample, 10)))
    assert abs(w.low - np.percentile(vol, 10)) < 100  # within one stride


def test_percentile_window_ignores_nan_and_handles_constant():
    vol = np.full((4, 4), 7.0)
    vol[0, 0] = np.nan
    w = percentile_window(vol)
    assert (w.low, w.high) == (7.0, 8.0)
    with pytest.raises(ValueError, match="percentiles"):
        percentile_window(vol, 60, 40)


def test_minmax_and_contrast_limits_windows():
    vol = np.array([[-5.0, np.nan], [np.inf, 20.0]])
    assert minmax_window(vol) == Window(-5.0, 20.0)
    assert minmax_window(np.array([3, 9], dtype=np.uint16)) == Window(3.0, 9.0)
    assert contrast_limits_window((10, 90)) == Window(10.0, 90.0)
    with pytest.raises(ValueError, match="two numbers"):
        contrast_limits_window((1, 2, 3))


def test_medsam_ct_window_matches_medsam_formula():
    rng = np.random.default_rng(2)
    ct = rng.integers(-1024, 2000, size=(3, 30, 30)).astype(np.int16)
    assert medsam_ct_window() == Window(-160.0, 240.0)
    # MedSAM: clip to [-160, 240], min-max of the clipped volume to 0..255, np.uint8.
    clipped = np.clip(ct, -160, 240)
    ref = np.uint8((clipped - clipped.min()) / (clipped.max() - clipped.min()) * 255.0)
    np.testing.assert_array_equal(medsam_ct_window(ct).apply(ct), ref)
    # A volume that never reaches 240: MedSAM stretches the clipped range, and so do we.
    narrow = np.clip(ct, -1024, 100)
    clipped = np.clip(narrow, -160, 240)
    ref = np.uint8((clipped - clipped.min()) / (clipped.max() - clipped.min()) * 255.0)
    np.testing.assert_array_equal(medsam_ct_window(narrow).apply(narrow), ref)


def test_medsam_mr_window_matches_medsam_formula():
    rng = np.random.default_rng(3)
    mr = rng.gamma(2.0, 200.0, size=(4, 32, 32)).astype(np.float32)
    mr[:, :8] = 0
    mr[0, 10, 10] = -50  # below the low percentile: clips to it, still not zero
    w = medsam_mr_window(mr)
    lo, hi = np.percentile(mr[mr != 0], 0.5), np.percentile(mr[mr != 0], 99.5)
    clipped = np.clip(mr, lo, hi)
    ref = (clipped - clipped.min()) / (clipped.max() - clipped.min()) * 255.0
    ref[mr == 0] = 0
    np.testing.assert_array_equal(w.apply(mr), np.uint8(ref))
    assert w.apply(mr)[:, :8].max() == 0


def test_make_window_modes():
    ct = np.array([[-1000, 0], [40, 1200]], dtype=np.int16)
    assert make_window(ct, "auto") == ct_window("soft_tissue")
    mr = np.arange(1, 1001, dtype=np.uint16).reshape(10, 100)
    assert make_window(mr, "auto") == percentile_window(mr)
    assert make_window(np.array([0.0, 1.0]), "auto") == percentile_window(np.array([0.0, 1.0]))
    assert make_window(np.array([True, False]), "auto") == Window(0, 1)
    assert make_window(None, "lung") == ct_window("lung")
    assert make_window(None, "custom", low=-5, high=5) == Window(-5, 5)
    assert make_window(None, "contrast_limits", limits=(1, 2)) == Window(1, 2)
    assert make_window(mr, "minmax") == Window(1, 1000)
    assert make_window(mr, "percentile", low=2, high=98) == percentile_window(mr, 2, 98)
    assert make_window(mr, "medsam_mr").keep_zero
    assert make_window(None, "medsam_ct") == medsam_ct_window()
    with pytest.raises(ValueError, match="unknown window mode"):
        make_window(mr, "gamma")
    with pytest.raises(ValueError, match="needs the volume"):
        make_window(None, "percentile")
    with pytest.raises(ValueError, match="low= and high="):
        make_window(None, "custom", low=1)
    # CT-looking needs both air and bone/contrast: an MR reaching 2000 is not CT.
    assert make_window(np.array([0, 2000], np.int16), "auto") != ct_window("soft_tissue")


def test_to_rgb_uint8_shapes_and_values():
    gray = np.array([[-160, 240]], dtype=np.int16)
    out = to_rgb_uint8(gray, ct_window("soft_tissue"))
    assert out.shape == (1, 2, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 255] and np.array_equal(out[..., 0], out[..., 2])
    u8 = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    np.testing.assert_array_equal(to_rgb_uint8(u8), u8)
    rgba = np.concatenate([u8, np.full((2, 2, 1), 9, np.uint8)], axis=-1)
    np.testing.assert_array_equal(to_rgb_uint8(rgba), u8)
    np.testing.assert_array_equal(to_rgb_uint8(u8[..., :1])[..., 1], u8[..., 0])
    rgb16 = np.array([[[0, 500, 1000]]], dtype=np.uint16)
    assert to_rgb_uint8(rgb16).tolist() == [[[0, 127, 255]]]
    assert to_rgb_uint8(rgb16, Window(0, 500)).tolist() == [[[0, 255, 255]]]
    assert to_rgb_uint8(np.array([[True, False]]))[0, :, 0].tolist() == [255, 0]
    assert to_rgb_uint8(np.array([[1.0, 3.0]]))[0, :, 0].tolist() == [0, 255]
    for bad in (np.zeros(5), np.zeros((2, 2, 2)), np.zeros((2, 2, 5)), np.zeros((1, 2, 2, 3))):
        with pytest.raises(ValueError, match="expected an H x W"):
            to_rgb_uint8(bad)


def test_auto_tells_ct_from_mr_with_stray_negative_values():
    from napari_sam.intensity import looks_like_ct

    rng = np.random.default_rng(4)
    mr = rng.normal(9000, 2000, size=(8, 32, 32))
    mr[0, 0, :3] = -610  # a few processing artefacts below -500, as in nibabel's anatomical.nii
    assert not looks_like_ct(mr)
    assert make_window(mr, "auto") == percentile_window(mr)
    ct = np.full((8, 32, 32), 40, dtype=np.int16)
    ct[:, :4] = -1000  # 12.5 % air
    ct[:, -2:] = 700
    assert looks_like_ct(ct)
    assert not looks_like_ct(np.clip(ct, -100, None))  # no air at all
    assert not looks_like_ct(ct.astype(np.uint16))


def test_parse_window_reads_bounds_and_checks_names():
    assert intensity.parse_window("-160,240") == Window(-160.0, 240.0)
    assert intensity.parse_window(" 0.5 , 2e3") == Window(0.5, 2000.0)
    for name in ("auto", "soft_tissue", "Soft tissue", "lung", "percentile", "minmax"):
        assert intensity.parse_window(name) == name
    for text, message in [
        ("5,1", "HIGH must be greater than LOW in '5,1'"),
        ("3,3", "HIGH must be greater than LOW"),
        ("1,2,3", "expected LOW,HIGH"),
        ("a,1", "expected LOW,HIGH"),
        ("nan,1", "HIGH must be greater"),
        ("-inf,1", "must be finite"),
        ("gamma", "unknown window mode 'gamma'"),
    ]:
        with pytest.raises(ValueError, match=message):
            intensity.parse_window(text)


def test_resolve_window_is_every_spelling_of_a_window():
    mr = np.arange(1, 1001, dtype=np.uint16).reshape(10, 100)
    given = Window(2, 9)
    assert intensity.resolve_window(mr, given) is given
    assert intensity.resolve_window(mr, None) is None
    assert intensity.resolve_window(mr, "2,9") == given
    assert intensity.resolve_window(mr, (2, 9)) == intensity.resolve_window(mr, [2.0, 9.0]) == given
    assert intensity.resolve_window(mr, "auto") == make_window(mr, "auto")
    assert intensity.resolve_window(None, "bone") == ct_window("bone")
    assert intensity.resolve_window(mr, "contrast_limits", limits=(3, 4)) == Window(3, 4)
    with pytest.raises(ValueError, match="mode name, a Window or"):
        intensity.resolve_window(mr, (1, 2, 3))
    with pytest.raises(ValueError, match="unknown window mode"):
        intensity.resolve_window(mr, "gamma")

"""Numerical parity of napari_sam.models.sam2 with Meta's sam2 1.1.0 (the reference).

The reference ``SAM2Base`` is built from its classes exactly as the SAM 2.1 configs compose
it, given random weights (every parameter drawn, so no trivial zero / one stays), and its
state dict is loaded strictly into ours: the key sets and shapes must be identical.

Tolerances (float32 throughout, same operations in a different order or with real instead
of complex rotations): features 1e-4 relative to their largest magnitude (about 20 layers of
sums over <= 3072 terms, each rounding at 6e-8 relative); mask logits 1e-3 absolute, object
pointers and scores 1e-4, IoUs 1e-5; binary masks agree on >= 99.9 % of pixels.
"""

from __future__ import annotations

import functools

import pytest
import torch

from napari_sam.models.sam2.build import build_sam2
from napari_sam.models.sam2.sam2 import NO_OBJ_SCORE, Sam2
from napari_sam.registry import get_spec
from reference_sam2 import build_reference_sam2, randomise

FEATURE_RTOL = 1e-4
LOGIT_TOL = 1e-3
PTR_TOL = 1e-4
IOU_TOL = 1e-5
MIN_PIXEL_AGREEMENT = 0.999

TINY = get_spec("sam2.1_hiera_tiny")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a > 0) == (b > 0)).float().mean().item()


@functools.cache
def _pair(image_size: int, obj_score_bias: float = 3.0, seed: int = 0):
    """Reference and our tiny model at ``image_size`` with the same random weights.

    ``obj_score_bias`` sets the last bias of the object-score head: positive keeps the
    random model's object present (real masks), negative makes it absent.
    """
    torch.manual_seed(seed)
    ref = build_reference_sam2(image_size, dict(TINY.encoder_kwargs))
    randomise(ref, seed)
    with torch.no_grad():
        ref.sam_mask_decoder.pred_obj_score_head.layers[2].bias.fill_(obj_score_bias)
    ours = build_sam2(TINY.replace(image_size=image_size))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module", params=[256, 192], ids=lambda s: f"{s}px")
def models(request):
    torch.set_num_threads(1)
    return _pair(request.param)


@pytest.fixture(scope="module")
def frames():
    """Seven slices of a smooth synthetic volume: a bright disc drifting over noise."""
    gen = torch.Generator().manual_seed(7)
    size = 256
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for z in range(7):
        cy, cx, r = 120 + 4 * z, 110 + 3 * z, 50 - 2 * abs(z - 3)
        disc = (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).float()
        img = 1.5 * disc - 0.5 + 0.3 * torch.randn(size, size, generator=gen)
        out.append(torch.stack([img, 0.8 * img, 0.6 * img]))
    return torch.stack(out)


def test_state_dicts_match_key_for_key(models):
    ref, ours = models
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert list(mine) and set(mine) == set(theirs)
    assert all(mine[k].shape == theirs[k].shape for k in mine)
    # Every parameter was loaded, none kept our initialisation.
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


@torch.no_grad()
def test_image_features_match(models):
    ref, ours = models
    size = ours.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    a, b = ref.forward_image(x), ours.forward_image(x)
    grid = size // 16
    assert [tuple(f.shape) for f in b["backbone_fpn"]] == [
        (2, 32, 4 * grid, 4 * grid),
        (2, 64, 2 * grid, 2 * grid),
        (2, 256, grid, grid),
    ]
    for key in ("backbone_fpn", "vision_pos_enc"):
        assert len(a[key]) == len(b[key]) == 3
        for fa, fb in zip(a[key], b[key], strict=True):
            assert _max_diff(fa, fb) <= FEATURE_RTOL * max(1.0, fa.abs().max().item())
    assert _max_diff(a["vision_features"], b["vision_features"]) <= FEATURE_RTOL * max(
        1.0, a["vision_features"].abs().max().item()
    )
    # The flattened views the heads read are the same too.
    pa, pb = ref._prepare_backbone_features(a), ours._prepare_backbone_features(b)
    assert pa[3] == pb[3] == [(4 * grid,) * 2, (2 * grid,) * 2, (grid,) * 2]


_FEATURE_CACHE: dict[tuple[int, int], tuple] = {}


def _middle_slice_features(model, image):
    key = (id(model), image.shape[-1])
    if key not in _FEATURE_CACHE:
        _FEATURE_CACHE[key] = model._prepare_backbone_features(model.forward_image(image))
    return _FEATURE_CACHE[key]


PROMPTS = {
    "point": ([[0.40, 0.45]], [1]),
    "box": ([[0.2, 0.25], [0.7, 0.8]], [2, 3]),
    # Two clicks: single-mask output falls back on the best multimask one when unstable.
    "two_points": ([[0.40, 0.45], [0.8, 0.2]], [1, 0]),
}


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize("multimask", [True, False], ids=["multi", "single"])
@torch.no_grad()
def test_single_image_masks_match(models, frames, prompt, multimask):
    ref, ours = models
    size = ours.image_size
    image = torch.nn.functional.interpolate(frames[3:4], size=(size, size), mode="bilinear")
    rel, labels = PROMPTS[prompt]
    point_inputs = {
        "point_coords": torch.tensor([rel]) * size,
        "point_labels": torch.tensor([labels], dtype=torch.int32),
    }

    def heads(model):
        _, feats, _, sizes = _middle_slice_features(model, image)
        high_res = [
            x.permute(1, 2, 0).reshape(1, x.shape[2], *s)
            for x, s in zip(feats[:-1], sizes[:-1], strict=True)
        ]
        # A first prompted frame: the no-memory embedding is added, as SAM2ImagePredictor does.
        pix = (feats[-1] + model.no_mem_embed).permute(1, 2, 0).reshape(1, 256, *sizes[-1])
        return model._forward_sam_heads(
            pix, point_inputs=point_inputs, high_res_features=high_res, multimask_output=multimask
        )

    a, b = heads(ref), heads(ours)
    low_multi, _, ious, _, high, obj_ptr, scores = b
    assert low_multi.shape == (1, 3 if multimask else 1, size // 4, size // 4)
    assert high.shape == (1, 1, size, size) and obj_ptr.shape == (1, 256)
    assert scores.item() > 0  # the object is present: the masks are real logits
    frac = (high > 0).float().mean().item()
    assert 0.01 < frac < 0.99, f"degenerate mask ({frac:.3f} foreground): the test would be weak"
    for i in (0, 1, 3, 4):
        assert _max_diff(a[i], b[i]) <= LOGIT_TOL
        assert _agreement(a[i], b[i]) >= MIN_PIXEL_AGREEMENT
    assert _max_diff(a[2], ious) <= IOU_TOL
    assert _max_diff(a[5], obj_ptr) <= PTR_TOL
    assert _max_diff(a[6], scores) <= PTR_TOL


def _click(x: float, y: float) -> dict[str, torch.Tensor]:
    """One foreground click for one object, as track_step takes it."""
    return {
        "point_coords": torch.tensor([[[x, y]]]),
        "point_labels": torch.tensor([[1]], dtype=torch.int32),
    }


def _track(model, feats, order, point_inputs, mask_inputs, num_frames):
    """Prompt ``order[0]``, then track the rest of ``order`` through one memory bank; a
    negative step in ``order`` marks reverse tracking."""
    bank = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    outs = {}
    prompted = order[0]
    for f in order:
        init = f == prompted
        reverse = f < prompted
        vision_feats, pos, sizes = feats[f]
        out = model.track_step(
            frame_idx=f,
            is_init_cond_frame=init,
            current_vision_feats=vision_feats,
            current_vision_pos_embeds=pos,
            feat_sizes=sizes,
            point_inputs=point_inputs if init else None,
            mask_inputs=mask_inputs if init else None,
            output_dict=bank,
            num_frames=num_frames,
            track_in_reverse=reverse,
        )
        bank["cond_frame_outputs" if init else "non_cond_frame_outputs"][f] = out
        outs[f] = out
    return outs


def _encoded(model, frames, n_objects):
    """Per-slice features, repeated for ``n_objects`` objects (the batch axis)."""
    with torch.no_grad():
        # One batched pass: the slices are independent in the encoder.
        _, vf, vp, sizes = model._prepare_backbone_features(model.forward_image(frames))
    return {
        f: (
            [x[:, f : f + 1].expand(-1, n_objects, -1) for x in vf],
            [x[:, f : f + 1].expand(-1, n_objects, -1) for x in vp],
            sizes,
        )
        for f in range(frames.shape[0])
    }


@pytest.fixture(scope="module")
def tracking_pair():
    torch.set_num_threads(1)
    return _pair(256)


@pytest.fixture(scope="module")
def volume_features(tracking_pair, frames):
    return _encoded(tracking_pair[0], frames, 1)


@pytest.mark.parametrize("prompt", ["clicks", "mask"])
@torch.no_grad()
def test_tracking_forward_and_reverse_matches(tracking_pair, volume_features, frames, prompt):
    """A click (two objects) or a mask on the middle slice, then 3 slices forward and 3 in
    reverse with memory: masks, pointers, scores and memories agree step for step."""
    ref, ours = tracking_pair
    n = frames.shape[0]
    point_inputs = mask_inputs = None
    if prompt == "clicks":
        point_inputs = {
            "point_coords": torch.tensor([[[110.0, 120.0]], [[40.0, 200.0]]]),
            "point_labels": torch.tensor([[1], [1]], dtype=torch.int32),
        }
        n_objects = 2
    else:
        yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
        mask_inputs = (((yy - 132) ** 2 + (xx - 119) ** 2) < 50**2).float()[None, None]
        n_objects = 1
    # Both models read the same features (their parity is tested above), so this isolates
    # memory attention, memory encoding and the heads.
    feats = {
        f: ([x.expand(-1, n_objects, -1) for x in vf], [x.expand(-1, n_objects, -1) for x in vp], s)
        for f, (vf, vp, s) in volume_features.items()
    }
    order = [3, 4, 5, 6, 2, 1, 0]
    a = _track(ref, feats, order, point_inputs, mask_inputs, n)
    b = _track(ours, feats, order, point_inputs, mask_inputs, n)
    for f in order:
        ra, rb = a[f], b[f]
        assert rb["pred_masks"].shape == (n_objects, 1, 64, 64)
        assert rb["pred_masks_high_res"].shape == (n_objects, 1, 256, 256)
        assert rb["maskmem_features"].shape == (n_objects, 64, 16, 16)
        assert _max_diff(ra["pred_masks"], rb["pred_masks"]) <= LOGIT_TOL
        assert _agreement(ra["pred_masks_high_res"], rb["pred_masks_high_res"]) >= (
            MIN_PIXEL_AGREEMENT
        )
        assert _max_diff(ra["obj_ptr"], rb["obj_ptr"]) <= PTR_TOL
        assert _max_diff(ra["object_score_logits"], rb["object_score_logits"]) <= PTR_TOL
        scale = max(1.0, ra["maskmem_features"].abs().max().item())
        assert _max_diff(ra["maskmem_features"], rb["maskmem_features"]) <= FEATURE_RTOL * scale
        assert _max_diff(ra["maskmem_pos_enc"][0], rb["maskmem_pos_enc"][0]) <= 1e-6
    # Tracked slices are real masks, not all-empty or all-full.
    tracked = torch.cat([b[f]["pred_masks"] for f in order[1:]])
    assert 0.01 < (tracked > 0).float().mean().item() < 0.99
    if prompt == "mask":
        # A mask prompt is the prompted slice's output as is (+-10 logits).
        assert torch.equal(b[3]["pred_masks_high_res"], mask_inputs * 20 - 10)


@torch.no_grad()
def test_absent_object_is_tracked_alike():
    """With the object scored absent, masks are NO_OBJ_SCORE and memories carry the
    no-object embedding, identically in both."""
    ref, ours = _pair(192, obj_score_bias=-3.0, seed=3)
    gen = torch.Generator().manual_seed(5)
    frames = torch.randn(3, 3, 192, 192, generator=gen)
    feats = _encoded(ref, frames, 1)
    clicks = _click(90.0, 100.0)
    a = _track(ref, feats, [0, 1, 2], clicks, None, 3)
    b = _track(ours, feats, [0, 1, 2], clicks, None, 3)
    for f in range(3):
        assert b[f]["object_score_logits"].item() < 0
        assert torch.all(b[f]["pred_masks"] == NO_OBJ_SCORE)
        assert _max_diff(a[f]["obj_ptr"], b[f]["obj_ptr"]) <= PTR_TOL
        assert _max_diff(a[f]["maskmem_features"], b[f]["maskmem_features"]) <= 1e-3


@pytest.mark.slow
@torch.no_grad()
def test_medsam2_size_features_and_tracking_match():
    """MedSAM2's 512 x 512 input: features and two tracked slices agree."""
    torch.set_num_threads(1)
    ref, ours = _pair(512, seed=11)
    assert isinstance(ours, Sam2) and ours.sam_image_embedding_size == 32
    gen = torch.Generator().manual_seed(2)
    frames = torch.randn(3, 3, 512, 512, generator=gen)
    a, b = ref.forward_image(frames[:1]), ours.forward_image(frames[:1])
    for fa, fb in zip(a["backbone_fpn"], b["backbone_fpn"], strict=True):
        assert _max_diff(fa, fb) <= FEATURE_RTOL * max(1.0, fa.abs().max().item())
    feats = _encoded(ref, frames, 1)
    clicks = _click(250.0, 260.0)
    ta = _track(ref, feats, [1, 2, 0], clicks, None, 3)
    tb = _track(ours, feats, [1, 2, 0], clicks, None, 3)
    for f in range(3):
        assert _max_diff(ta[f]["pred_masks"], tb[f]["pred_masks"]) <= LOGIT_TOL
        assert _max_diff(ta[f]["obj_ptr"], tb[f]["obj_ptr"]) <= PTR_TOL


@pytest.mark.slow
@torch.no_grad()
def test_full_size_tiny_features_and_click_match():
    """sam2.1_hiera_tiny as released (1024 x 1024): features and a click's masks agree."""
    torch.set_num_threads(1)
    ref, ours = _pair(1024, seed=13)
    image = torch.nn.functional.interpolate(
        torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4)),
        size=(1024, 1024),
        mode="bilinear",
    )
    a, b = ref.forward_image(image), ours.forward_image(image)
    for key in ("backbone_fpn", "vision_pos_enc"):
        for fa, fb in zip(a[key], b[key], strict=True):
            assert _max_diff(fa, fb) <= FEATURE_RTOL * max(1.0, fa.abs().max().item())
    feats = {0: ref._prepare_backbone_features(a)[1:]}
    ta = _track(ref, feats, [0], _click(400.0, 600.0), None, 1)
    tb = _track(ours, feats, [0], _click(400.0, 600.0), None, 1)
    assert tb[0]["pred_masks_high_res"].shape == (1, 1, 1024, 1024)
    assert _max_diff(ta[0]["pred_masks"], tb[0]["pred_masks"]) <= LOGIT_TOL
    assert _agreement(ta[0]["pred_masks_high_res"], tb[0]["pred_masks_high_res"]) >= (
        MIN_PIXEL_AGREEMENT
    )
    assert _max_diff(ta[0]["obj_ptr"], tb[0]["obj_ptr"]) <= PTR_TOL

"""The fast path (napari_sam.speed): agreement with the exact path, API, capability fallbacks.

Agreement bar (issue 7): masks of the fast path agree with the exact float32 path at IoU >= 0.99
on the predictor parity cases. Small configs run by default (they take the same code paths:
padded attention windows, global blocks, TinyViT stages); full-size vit_b / vit_t are slow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import napari_sam
from conftest import small_vit_spec
from napari_sam import SamPredictor, speed
from napari_sam.registry import get_spec
from napari_sam.speed.decoder import FastMaskDecoder
from napari_sam.speed.sam import FastSam, resampling_taps
from test_predictor import _image

# grid 16 with window 14: padded windows; block 1 global
SMALL_VIT = small_vit_spec("test_small_vit", test_fixture=True)
SMALL_TINY = get_spec("vit_t").replace(image_size=256)  # stage grids 64/32/16/16: padding too
FIXTURE = Path(__file__).parent / "data" / "sam_test_tiny.safetensors"


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
    return model.eval()


def _cases(h: int, w: int) -> list[dict]:
    p, n = np.array([[0.4 * w, 0.5 * h]]), np.array([[0.7 * w, 0.3 * h]])
    box = np.array([0.2 * w, 0.25 * h, 0.75 * w, 0.8 * h])
    return [
        {"point_coords": p, "point_labels": np.array([1])},
        {"point_coords": np.vstack([p, n]), "point_labels": np.array([1, 0])},
        {"box": box, "multimask_output": False},
        {"box": box, "point_coords": p, "point_labels": np.array([1]), "multimask_output": False},
        {"point_coords": p, "point_labels": np.array([1]), "multimask_output": False},
    ]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def _agreement(exact: SamPredictor, fast: SamPredictor, image: np.ndarray) -> dict[str, float]:
    """Set the image in both; compare every parity case and a mask-input refinement."""
    exact.set_image(image)
    fast.set_image(image)
    h, w = image.shape[:2]
    ious, logit_diff = [], 0.0
    for kwargs in _cases(h, w):
        (m1, s1, l1), (m2, _, l2) = exact.predict(**kwargs), fast.predict(**kwargs)
        refine = {
            "point_coords": np.array([[0.45 * w, 0.55 * h]]),
            "point_labels": np.array([1]),
            "mask_input": l1[int(np.argmax(s1))][None],
            "multimask_output": False,
        }
        (r1, _, _), (r2, _, _) = exact.predict(**refine), fast.predict(**refine)
        ious += [_iou(a, b) for a, b in zip(m1, m2, strict=True)] + [_iou(r1[0], r2[0])]
        logit_diff = max(logit_diff, float(np.abs(l1 - l2).max()))
    return {
        "min_iou": min(ious),
        "logit_diff": logit_diff,
        "embedding_diff": float((exact.features - fast.features).abs().max()),
    }


@pytest.fixture(scope="module")
def small_vit():
    torch.manual_seed(0)
    return _perturb(napari_sam.build_sam(SMALL_VIT), seed=1)


@pytest.fixture(scope="module")
def small_tiny():
    torch.manual_seed(0)
    return _perturb(napari_sam.build_sam(SMALL_TINY), seed=2)


# -- the fast model is a view of the exact one ---------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_fast_model_shares_the_exact_weights_under_the_same_names(small_vit, precision):
    fast = speed.optimize(small_vit, precision)
    exact_state, fast_state = small_vit.state_dict(), fast.state_dict()
    assert list(fast_state) == list(exact_state)
    assert all(fast_state[k].data_ptr() == exact_state[k].data_ptr() for k in exact_state)
    assert isinstance(fast, napari_sam.Sam) and fast.precision == precision
    assert fast.spec is small_vit.spec and fast.image_size == small_vit.image_size
    assert speed.encoder_settings(fast) == f"fast-v{speed.FAST_PATH_VERSION}-{precision}"
    assert speed.encoder_settings(small_vit) == ""
    assert speed.optimize(fast) is fast


def test_every_fast_module_is_a_twin_made_from_the_exact_module_in_its_place(small_vit, small_tiny):
    from napari_sam.models.mask_decoder import MaskDecoder
    from napari_sam.speed.twin import FastTwin

    for model in (small_vit, small_tiny):
        fast = speed.optimize(model, "fp32")
        assert speed.is_fast(fast) and not speed.is_fast(model)
        exact_modules = dict(model.named_modules())
        twins = [(n, m) for n, m in fast.named_modules() if speed.is_fast(m)]
        assert len(twins) > 10
        for name, twin in twins:
            exact = exact_modules[name]
            assert type(twin).accepts(exact) and not twin.training
            # the exact module's parameters themselves, under the same names
            mine, theirs = dict(twin.named_parameters()), dict(exact.named_parameters())
            assert list(mine) == list(theirs)
            assert all(mine[k] is theirs[k] for k in theirs)
            assert set(vars(exact)) - set(vars(twin)) == set()  # nothing left out
        assert fast.image_encoder.img_size == model.image_encoder.img_size
        assert not speed.is_fast(model.image_encoder) and speed.is_fast(fast.image_encoder)
    assert not any(speed.is_fast(x) for x in (None, object(), torch.nn.Linear(2, 2)))
    decoder = small_vit.mask_decoder
    with pytest.raises(TypeError, match="made from a MaskDecoder, got Linear"):
        FastMaskDecoder.from_exact(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="precision"):
        FastMaskDecoder.from_exact(decoder, precision="fp32")  # takes no settings
    with pytest.raises(TypeError, match="takes no settings"):
        type("Plain", (FastTwin,), {"exact_type": MaskDecoder}).from_exact(decoder, linear=None)


def test_tiny_vit_fast_model_has_the_exact_state_dict(small_tiny):
    fast = speed.optimize(small_tiny, "fp32")
    assert list(fast.state_dict()) == list(small_tiny.state_dict())


def test_default_predictor_is_untouched(small_vit):
    predictor = SamPredictor(small_vit)
    assert predictor.model is small_vit
    assert type(SamPredictor(small_vit, fast=True).model) is FastSam


# -- numerical agreement -------------------------------------------------------------------------


def test_fp32_encoders_equal_the_exact_ones(small_vit, small_tiny):
    for model in (small_vit, small_tiny):
        x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            exact = model.image_encoder(x)
            fast = speed.optimize(model, "fp32").image_encoder(x)
        assert fast.shape == exact.shape and fast.is_contiguous()
        assert (fast - exact).abs().max() < 1e-4


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("batch", [1, 4])
def test_fast_decoder_equals_the_exact_decoder(small_vit, with_mask, batch):
    fast = speed.optimize(small_vit, "fp32")
    gen = torch.Generator().manual_seed(batch)
    emb = torch.randn(1, 256, 16, 16, generator=gen)
    points = (torch.rand(batch, 3, 2, generator=gen) * 256, torch.randint(0, 2, (batch, 3)))
    boxes = torch.tensor([[30.0, 40.0, 200.0, 180.0]]).expand(batch, 4)
    masks = torch.randn(batch, 1, 64, 64, generator=gen) if with_mask else None
    for multimask in (True, False):
        with torch.no_grad():
            sparse, dense = small_vit.prompt_encoder(points, boxes, masks)
            pe = small_vit.prompt_encoder.get_dense_pe()
            want = small_vit.mask_decoder(emb, pe, sparse, dense, multimask)
            fpe = fast.prompt_encoder.get_dense_pe()
            got = fast.mask_decoder(emb, fpe, sparse, dense, multimask)
            again = fast.mask_decoder(emb, fpe, sparse, dense, multimask)  # cached image side
        for w, g, a in zip(want, got, again, strict=True):
            assert g.shape == w.shape
            assert (g - w).abs().max() < 1e-4
            assert torch.equal(g, a)


@pytest.mark.parametrize("with_mask", [False, True])
def test_fast_decoder_reads_any_embedding_layout_and_modifies_no_input(small_vit, with_mask):
    """Channels-last embeddings (the embedding cache's layout) give the channels-first result,
    and the in-place residual accumulation never writes into the caller's tensors."""
    fast = speed.optimize(small_vit, "fp32")
    gen = torch.Generator().manual_seed(7)
    emb = torch.randn(1, 256, 16, 16, generator=gen)
    boxes = torch.tensor([[30.0, 40.0, 200.0, 180.0], [10.0, 20.0, 90.0, 100.0]])
    masks = torch.randn(2, 1, 64, 64, generator=gen) if with_mask else None
    with torch.no_grad():
        sparse, dense = fast.prompt_encoder(None, boxes, masks)
        pe = fast.prompt_encoder.get_dense_pe()
        inputs = [emb, pe, sparse, dense]
        before = [t.clone() for t in inputs]
        want = fast.mask_decoder(emb, pe, sparse, dense, True)
        last = emb.contiguous(memory_format=torch.channels_last)
        got = fast.mask_decoder(last, pe, sparse, dense, True)
        again = fast.mask_decoder(emb, pe, sparse, dense, True)
    for w, g, a in zip(want, got, again, strict=True):
        assert (g - w).abs().max() < 1e-5
        assert torch.equal(a, w)
    for t, b in zip(inputs, before, strict=True):
        assert torch.equal(t, b)
    assert torch.equal(last, emb)


def _check_fast_mask_embedding(exact, masks: torch.Tensor) -> None:
    """The fast prompt encoder embeds ``masks`` (B x 1 x 64 x 64) as the exact one does."""
    fast = speed.optimize(exact, "fp32")
    with torch.no_grad():
        _, want = exact.prompt_encoder(None, None, masks)
        _, got = fast.prompt_encoder(None, None, masks)
    assert got.shape == want.shape == (len(masks), 256, 16, 16)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    # Token order (channels last): the decoder reads it without a transposing copy.
    assert got.permute(0, 2, 3, 1).is_contiguous()


def test_fast_mask_embedding_equals_the_exact_convolutions(small_vit):
    masks = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(5)) * 8
    _check_fast_mask_embedding(small_vit, masks)


def test_mask_prompt_embedding_computes_only_boundary_blocks(small_vit, monkeypatch):
    """Masks made of a few constants (what mask_to_mask_input gives) embed the same as the
    exact convolutions while only boundary blocks and one block per constant are computed."""
    from napari_sam.speed import sam as fast_sam

    yy, xx = np.mgrid[0:64, 0:64]
    masks = np.full((3, 1, 64, 64), -20.0, np.float32)
    masks[0, 0][(yy - 30) ** 2 + (xx - 25) ** 2 < 15**2] = 20.0
    masks[1, 0][10:33, 40:61] = 20.0
    masks[2, 0][:, 50:] = 3.5  # a third constant
    masks = torch.from_numpy(masks)
    computed = []
    real = fast_sam._embed_rows
    monkeypatch.setattr(
        fast_sam,
        "_embed_rows",
        lambda layers, rows: computed.append(len(rows)) or real(layers, rows),
    )
    _check_fast_mask_embedding(small_vit, masks)
    # 3 x 256 tokens, of which those on a boundary (4 x 4 blocks cut by it) plus 3 constants.
    blocks = masks.reshape(3, 16, 4, 16, 4)
    boundary = int((blocks.amin(dim=(2, 4)) != blocks.amax(dim=(2, 4))).sum())
    assert 0 < boundary < 100
    assert computed == [boundary + 3]


def test_decoder_cache_follows_new_weights_and_new_embeddings(small_vit):
    model = napari_sam.build_sam(SMALL_VIT)
    model.load_state_dict(small_vit.state_dict())
    fast = SamPredictor(model, fast="fp32")
    exact = SamPredictor(model)
    point = {"point_coords": np.array([[100.0, 120.0]]), "point_labels": np.array([1])}
    for seed in (0, 1):
        emb = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(seed))
        for p in (fast, exact):
            p.set_image_embedding(emb, (256, 256))
        assert np.abs(fast.predict(**point)[2] - exact.predict(**point)[2]).max() < 1e-4
    # weights loaded in place into the exact model: the fast twin (and its caches) follow
    model.load_state_dict(_perturb(napari_sam.build_sam(SMALL_VIT), seed=7).state_dict())
    assert np.abs(fast.predict(**point)[2] - exact.predict(**point)[2]).max() < 1e-4


def test_shared_image_cache_follows_the_no_mask_embedding(small_vit):
    """The first layer's image side, kept per embedding, is rebuilt when the dense vector
    changes in place (and only the no-mask embedding changes here)."""
    model = napari_sam.build_sam(SMALL_VIT)
    model.load_state_dict(small_vit.state_dict())
    fast = speed.optimize(model, "fp32")
    emb = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(4))
    points = (torch.tensor([[[60.0, 80.0]], [[150.0, 90.0]]]), torch.ones(2, 1, dtype=torch.int))

    def both():
        with torch.no_grad():
            sparse, dense = model.prompt_encoder(points, None, None)
            assert fast.mask_decoder.shares_image(emb, dense)
            pe = model.prompt_encoder.get_dense_pe()
            return model.mask_decoder(emb, pe, sparse, dense, True), fast.mask_decoder(
                emb, fast.prompt_encoder.get_dense_pe(), sparse, dense, True
            )

    for _ in range(2):
        (want, _), (got, _) = both()
        assert (got - want).abs().max() < 1e-4
        with torch.no_grad():
            model.prompt_encoder.no_mask_embed.weight.mul_(-3.0)
    assert (want - both()[0][0]).abs().max() > 0.1  # the change mattered


@pytest.mark.parametrize(
    ("input_size", "original_size"),
    [
        ((256, 256), (128, 128)),
        ((165, 256), (200, 310)),
        ((256, 97), (700, 265)),
        ((31, 256), (31, 256)),
    ],
)
def test_fast_mask_resizing_equals_the_exact_two_step_resizing(
    small_vit, input_size, original_size
):
    fast = speed.optimize(small_vit, "fp32")
    low = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    want = small_vit.postprocess_masks(low, input_size, original_size)
    got = fast.postprocess_masks(low, input_size, original_size)
    assert got.shape == want.shape == (2, 3, *original_size)
    assert (got - want).abs().max() < 1e-5


def test_resampling_taps_are_the_composed_operator():
    index, weight = resampling_taps(64, 256, 165, 200)
    assert index.shape == weight.shape and index.shape[1] <= 4
    x = torch.randn(64)
    two_step = F.interpolate(x.view(1, 1, 64, 1), (256, 1), mode="bilinear")[:, :, :165]
    two_step = F.interpolate(two_step, (200, 1), mode="bilinear").flatten()
    assert torch.allclose((x[index] * weight).sum(1), two_step, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_fast_predictor_masks_agree_with_the_exact_ones(small_vit, precision):
    figures = _agreement(
        SamPredictor(small_vit), SamPredictor(small_vit, fast=precision), _image(200, 310)
    )
    print(precision, figures)
    assert figures["min_iou"] >= 0.99
    if precision == "fp32":
        assert figures["embedding_diff"] < 1e-4 and figures["logit_diff"] < 1e-3


def test_fast_tiny_vit_masks_agree_with_the_exact_ones(small_tiny):
    fast = SamPredictor(small_tiny, fast=True)
    assert fast.model.precision == "fp32"
    figures = _agreement(SamPredictor(small_tiny), fast, _image(240, 180, seed=3))
    assert figures["min_iou"] >= 0.99 and figures["embedding_diff"] < 1e-4


@pytest.mark.skipif(not FIXTURE.exists(), reason="trained test fixture not in this checkout")
def test_int8_agrees_on_a_trained_model_with_real_objects():
    """The trained fixture segments synthetic shapes: int8 masks vs exact ones on real objects.

    int8 is opt-in because it does not hold the 0.99 bar everywhere (docs/performance.md). What
    it must hold: the same candidate is returned as the best one, and the returned masks and
    every mask of 200 pixels or more agree at IoU >= 0.97 (measured: 0.975 in the worst case
    under pytest, 0.9968 in a plain process; the difference is not yet explained).
    """
    from napari_sam.training.synthetic import synthetic_scene

    if not speed.capabilities().int8:
        pytest.skip("no CPU int8 kernels in this torch build")
    model = napari_sam.load_model(FIXTURE, device="cpu")
    exact, fast = SamPredictor(model), SamPredictor(model, fast="int8")
    large, best = [], []
    for seed in range(4):
        sample = synthetic_scene(np.random.default_rng(seed))
        exact.set_image(sample.image)
        fast.set_image(sample.image)
        ys, xs = np.nonzero(sample.labels == 1)
        point = {"point_coords": np.array([[xs.mean(), ys.mean()]]), "point_labels": np.array([1])}
        box = {"box": np.array([xs.min(), ys.min(), xs.max(), ys.max()])}
        for prompt in (point, box):
            (m1, s1, _), (m2, s2, _) = exact.predict(**prompt), fast.predict(**prompt)
            assert np.argmax(s1) == np.argmax(s2)
            best.append(_iou(m1[np.argmax(s1)], m2[np.argmax(s2)]))
            for a, b in zip(m1, m2, strict=True):
                if np.count_nonzero(a | b) >= 200:
                    large.append(_iou(a, b))
    print("int8 on the trained fixture: best", min(best), "large", min(large), len(large))
    assert len(large) >= 10 and min(best) >= 0.97 and min(large) >= 0.97


def test_int8_path_is_made_and_run_under_inference_mode(small_vit):
    """A script that loads and speeds up its model inside ``torch.inference_mode`` gets int8.

    Parameters made there are inference tensors, without a version counter: the int8 probe
    used to fail on them and report the kernels missing, and packing crashed.
    """
    from napari_sam.speed.int8 import int8_available

    if not speed.capabilities().int8:
        pytest.skip("no CPU int8 kernels in this torch build")
    x = torch.randn(1, 3, SMALL_VIT.image_size, SMALL_VIT.image_size)
    with torch.no_grad():
        expected = speed.optimize(small_vit, "int8").image_encoder(x)
    int8_available.cache_clear()  # the probe runs again, this time under inference mode
    with torch.inference_mode():
        assert int8_available()
        model = napari_sam.build_sam(SMALL_VIT)
        model.load_state_dict(small_vit.state_dict())
        assert next(model.parameters()).is_inference()
        fast = speed.optimize(model.eval(), "int8")
        assert torch.equal(fast.image_encoder(x), expected)
        model.image_encoder.patch_embed.proj.weight = torch.nn.Parameter(
            model.image_encoder.patch_embed.proj.weight * 0
        )
        assert not torch.equal(fast.image_encoder(x), expected)  # a new storage is seen


def test_best_mask_is_the_best_of_three(small_vit):
    for p in (SamPredictor(small_vit), SamPredictor(small_vit, fast="fp32")):
        p.set_image(_image(120, 160))
        point = {"point_coords": np.array([[50.0, 60.0]]), "point_labels": np.array([1])}
        masks, scores, logits = p.predict(**point)
        best_mask, best_score, best_logits = p.predict(multimask_output="best", **point)
        i = int(np.argmax(scores))
        assert best_mask.shape == (1, 120, 160) and best_score.shape == (1,)
        assert np.array_equal(best_mask[0], masks[i]) and best_score[0] == scores[i]
        assert np.array_equal(best_logits[0], logits[i])
        with pytest.raises(ValueError, match="'best'"):
            p.predict(multimask_output="all", **point)


def test_fast_model_works_with_the_embedding_cache(small_vit):
    from napari_sam.volume.embeddings import EmbeddingCache

    fast = speed.optimize(small_vit, "fp32")
    volume = np.stack([_image(64, 80, seed=i)[..., 0] for i in range(3)])
    cache = EmbeddingCache(fast, volume, encoder_settings=speed.encoder_settings(fast))
    exact_cache = EmbeddingCache(small_vit, volume, window=cache.window)
    got, size, _ = cache.get(1)
    want, _, _ = exact_cache.get(1)
    assert size == (64, 80) and (got - want).abs().max() < 1e-4
    assert cache.key()["encoder_settings"] != exact_cache.key()["encoder_settings"]


# -- choices, capabilities and clean fallbacks ---------------------------------------------------


def test_auto_precision_follows_the_capabilities(small_vit, small_tiny, monkeypatch):
    caps = speed.capabilities("cpu")
    assert caps.device == "cpu" and isinstance(caps.int8, bool)
    # int8 misses the agreement bar at full size (docs/performance.md): never chosen on its own
    assert speed.choose_precision(small_vit) == speed.choose_precision(small_tiny) == "fp32"
    no_int8 = speed.Capabilities("cpu", False, False, False, False, True)
    gpu = speed.Capabilities("cuda", False, False, True, True, False)
    monkeypatch.setattr(speed, "capabilities", lambda device="cpu": gpu)
    assert speed.choose_precision(small_vit, "cuda") == "bf16"  # the device-agnostic choice
    monkeypatch.setattr(speed, "capabilities", lambda device="cpu": no_int8)
    assert speed.choose_precision(small_vit) == "fp32"
    assert speed.optimize(small_vit).precision == "fp32"  # falls back, no error
    with pytest.raises(ValueError, match="int8 needs a CPU"):
        speed.optimize(small_vit, "int8")
    with pytest.raises(ValueError, match="no bfloat16 support"):
        speed.optimize(small_vit, "bf16")


def test_bad_arguments_are_refused_clearly(small_vit):
    with pytest.raises(ValueError, match="precision must be one of"):
        speed.optimize(small_vit, "float8")
    with pytest.raises(TypeError, match="Sam model"):
        speed.optimize(torch.nn.Linear(2, 2))
    fast = speed.optimize(small_vit, "fp32")
    with pytest.raises(ValueError, match="already a fast model"):
        speed.optimize(fast, "int8")
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()


def test_bf16_runs_where_the_cpu_has_it(small_vit):
    if not speed.capabilities().bf16:
        pytest.skip("this CPU has no bfloat16")
    fast = SamPredictor(small_vit, fast="bf16")
    exact = SamPredictor(small_vit)
    image = _image(200, 310)
    fast.set_image(image)
    exact.set_image(image)
    assert fast.features.dtype == torch.float32
    rel = (fast.features - exact.features).norm() / exact.features.norm()
    assert 0 < rel < 0.05  # really bf16, and close


# -- full size -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b", "vit_t"])
def test_full_size_fast_path_agrees_with_the_exact_path(name):
    torch.manual_seed(0)
    model = _perturb(napari_sam.build_sam(name), seed=0)
    exact = SamPredictor(model)
    fast = SamPredictor(model, fast=True)
    figures = _agreement(exact, fast, _image(480, 640))
    print(name, fast.model.precision, figures)
    assert fast.model.precision == "fp32"
    assert figures["min_iou"] >= 0.99 and figures["embedding_diff"] < 1e-3
    if name == "vit_b" and speed.capabilities().int8:
        # int8 is opt-in because it misses the bar here (docs/performance.md): keep its measured
        # agreement from getting worse unnoticed.
        int8 = _agreement(exact, SamPredictor(model, fast="int8"), _image(480, 640))
        print("int8", int8)
        assert 0.95 <= int8["min_iou"] < 1.0


def test_fast_and_exact_embeddings_never_share_a_cache_key(small_vit, tmp_path):
    from napari_sam.volume.embeddings import EmbeddingCache

    volume = np.zeros((2, 40, 40), np.uint8)
    exact = EmbeddingCache(small_vit, volume, cache_dir=tmp_path)
    fast = EmbeddingCache(speed.optimize(small_vit, "fp32"), volume, cache_dir=tmp_path)
    assert exact.encoder_settings == ""
    assert fast.encoder_settings.startswith("fast-")


def test_with_precision_is_the_one_switch_of_the_widget_and_the_command_line():
    from napari_sam.commands._options import PRECISION_CHOICES
    from napari_sam.speed import INFERENCE_PRECISIONS, with_precision
    from napari_sam.speed.sam import FastSam
    from testmodel import load_test_model

    assert PRECISION_CHOICES == INFERENCE_PRECISIONS  # the parser's copy stays in step
    model = load_test_model()
    assert with_precision(model, "exact") is model
    fast = with_precision(model, "auto")
    assert isinstance(fast, FastSam) and fast.precision == "fp32"
    with pytest.raises(ValueError, match="already a fast model"):
        with_precision(fast, "exact")
    with pytest.raises(ValueError, match="auto, exact, fp32, int8, bf16"):
        with_precision(model, "fastest")

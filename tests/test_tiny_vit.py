"""TinyViT (MobileSAM's vit_t image encoder): checkpoint layout and parity with MobileSAM."""

from __future__ import annotations

import time

import pytest
import torch

import reference
from napari_sam.models.tiny_vit import DropPath, TinyViT, relative_offset_index
from napari_sam.registry import TINY_VIT_5M

HEAD_PREFIXES = ("norm_head.", "head.")

# A small model through the same code path: window 8 tiles the 32 grid of stage 1 exactly,
# window 14 pads the 16 grid of stage 2, window 16 is the whole grid of stage 3. The last width
# is 320 because MobileSAM picks the stride-1 merge by that width.
SMALL = {
    "embed_dims": (32, 48, 64, 320),
    "depths": (1, 1, 2, 1),
    "num_heads": (1, 2, 2, 4),
    "window_sizes": (7, 8, 14, 16),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter and BatchNorm statistic at random, at scales that keep activations
    O(1), so that a wrong layout, index or missing term shows up in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
            elif name.endswith("attention_biases"):
                t.copy_(torch.randn(t.shape, generator=gen))
            elif t.ndim == 1 and name.endswith("weight"):  # BatchNorm / LayerNorm scales
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.ndim == 1:  # biases
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            else:  # linear and conv kernels: unit gain over the fan-in
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) / fan_in**0.5)


def _encoder_state(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ref.state_dict().items() if not k.startswith(HEAD_PREFIXES)}


def _reference_forward(ref: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # MobileSAM's own forward reshapes to a hard-coded 64 x 64 grid; run its stages and neck
    # with the grid that img_size gives instead.
    y = ref.patch_embed(x)
    for layer in ref.layers:
        y = layer(y)
    side = ref.img_size // 16
    return ref.neck(y.view(len(x), side, side, -1).permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def vit_t_pair():
    ref = reference.mobile_sam.sam_model_registry["vit_t"]().image_encoder
    _randomise(ref, seed=1)
    # MobileSAM caches the gathered attention biases when eval() is called: call it only now,
    # after the weights are final, or it would keep the biases of the initialisation.
    ref.eval()
    ours = TinyViT(img_size=1024, **TINY_VIT_5M).eval()
    ours.load_state_dict(_encoder_state(ref), strict=True)
    return ref, ours


def _small_pair(seed: int):
    ref_cls = reference.mobile_sam.modeling.TinyViT
    ref = ref_cls(img_size=256, drop_path_rate=0.0, **{k: list(v) for k, v in SMALL.items()})
    _randomise(ref, seed=seed)
    ours = TinyViT(img_size=256, **SMALL)
    ours.load_state_dict(_encoder_state(ref), strict=True)
    return ref, ours


def test_state_dict_layout_matches_mobile_sam(vit_t_pair):
    ref, ours = vit_t_pair
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    head = {k for k in ref_sd if k.startswith(HEAD_PREFIXES)}
    assert head == {"norm_head.weight", "norm_head.bias", "head.weight", "head.bias"}
    assert set(ours_sd) == set(ref_sd) - head
    assert {k: v.shape for k, v in ours_sd.items()} == {k: ref_sd[k].shape for k in ours_sd}
    assert len(ours_sd) == 298
    # The bias index is derived, not stored, in both; the values must agree pair by pair.
    assert not any("attention_bias_idxs" in k for k in ref_sd)
    ref_idx = {k: v for k, v in ref.named_buffers() if k.endswith("attention_bias_idxs")}
    ours_idx = {k: v for k, v in ours.named_buffers() if k.endswith("attention_bias_idxs")}
    assert ref_idx.keys() == ours_idx.keys() and len(ours_idx) == 10
    for k in ref_idx:
        torch.testing.assert_close(ours_idx[k], ref_idx[k], rtol=0, atol=0)


def test_relative_offset_index_shares_biases_by_absolute_offset():
    idx = relative_offset_index(3)
    assert idx.shape == (9, 9)
    assert idx.unique().tolist() == list(range(9))
    # (0, 0) -> (2, 1) and (2, 1) -> (0, 0) and (0, 1) -> (2, 0) all have offset (2, 1).
    assert idx[0, 7] == idx[7, 0] == idx[1, 6] == 2 * 3 + 1
    assert torch.equal(idx.diagonal(), torch.zeros(9, dtype=torch.long))


def test_vit_t_matches_mobile_sam_at_1024(vit_t_pair):
    ref, ours = vit_t_pair
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t0 = time.perf_counter()
        expected = ref(x)
        t1 = time.perf_counter()
        got = ours(x)
        t2 = time.perf_counter()
    assert got.shape == (1, 256, 64, 64)
    diff = (got - expected).abs().max().item()
    print(f"vit_t 1024: max abs diff {diff:.2e}, ref {t1 - t0:.2f} s, ours {t2 - t1:.2f} s")
    assert expected.abs().mean() > 0.5  # the comparison is not between near-zero tensors
    assert diff <= 1e-4


def test_small_config_matches_mobile_sam_at_256():
    ref, ours = _small_pair(seed=2)
    ref.eval()
    ours.eval()
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = _reference_forward(ref, x)
        got = ours(x)
    assert got.shape == (2, 256, 16, 16)
    assert (got - expected).abs().max().item() <= 1e-4
    # Each image is encoded on its own: the batch does not leak across samples.
    with torch.inference_mode():
        single = ours(x[1:])
    assert (single - got[1:]).abs().max().item() <= 1e-4


def test_training_mode_matches_mobile_sam():
    # Training uses batch statistics in BatchNorm and updates the running ones; the bias
    # gather must follow the parameters so gradients reach them.
    ref, ours = _small_pair(seed=4)
    ref.train()
    ours.train()
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    expected = _reference_forward(ref, x)
    got = ours(x)
    assert (got - expected).abs().max().item() <= 1e-4
    ref_sd = ref.state_dict()
    for name, value in ours.state_dict().items():
        if "running_" in name:
            torch.testing.assert_close(value, ref_sd[name], rtol=1e-5, atol=1e-5)
    assert ours.layers[0].blocks[0].conv1.bn.num_batches_tracked.item() == 1

    got.square().mean().backward()
    bias_grad = ours.layers[2].blocks[1].attn.attention_biases.grad
    assert bias_grad is not None and bias_grad.abs().sum() > 0
    assert all(p.grad is not None for p in ours.parameters())


def test_eval_follows_weights_loaded_after_eval():
    # MobileSAM caches the biases at eval(); ours must use whatever weights are loaded now.
    _, ours = _small_pair(seed=6)
    ours.eval()
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(7))
    fresh_ref, fresh = _small_pair(seed=8)
    ours.load_state_dict(fresh.state_dict())
    fresh_ref.eval()
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), _reference_forward(fresh_ref, x), rtol=0, atol=1e-4)


def test_drop_path_schedule_and_behaviour():
    model = TinyViT(img_size=256, drop_path_rate=0.3, **SMALL)
    probs = [
        getattr(block.drop_path, "drop_prob", 0.0)
        for layer in model.layers
        for block in layer.blocks
    ]
    assert probs == pytest.approx(torch.linspace(0, 0.3, sum(SMALL["depths"])).tolist())

    drop = DropPath(0.5)
    x = torch.ones(400, 3)
    torch.manual_seed(0)
    y = drop(x)
    kept = y[:, 0] != 0
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(y[kept], torch.full((int(kept.sum()), 3), 2.0))
    assert 150 < int(kept.sum()) < 250
    drop.eval()
    assert torch.equal(drop(x), x)


def test_bad_input_and_config_raise_clear_errors():
    model = TinyViT(img_size=256, **SMALL)
    with pytest.raises(ValueError, match="B x 3 x 256 x 256"):
        model(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match="B x 3 x 256 x 256"):
        model(torch.zeros(3, 256, 256))
    with pytest.raises(ValueError, match="multiple of 16"):
        TinyViT(img_size=250, **SMALL)
    with pytest.raises(ValueError, match="4 entries"):
        TinyViT(img_size=256, **{**SMALL, "depths": (1, 1, 1)})
    with pytest.raises(ValueError, match="not divisible"):
        TinyViT(img_size=256, **{**SMALL, "num_heads": (1, 2, 3, 4)})
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.0)

"""SAM 2 training on clips (training/clips.py, training/clip_trainer.py) on a very small model."""

from __future__ import annotations

import numpy as np
import torch

from napari_sam.models.sam2.build import build_sam2
from napari_sam.registry import ModelSpec, _hiera
from napari_sam.training.clip_trainer import ClipConfig, ClipTrainer
from napari_sam.training.clips import Clip, SyntheticClips
from volume_helpers import one_torch_thread  # noqa: F401 (autouse fixture)

SPEC = ModelSpec(
    name="sam2_clip_test",
    family="sam2",
    encoder="hiera",
    encoder_kwargs=_hiera(8, 1, (1, 1, 2, 1), (2, 3, 4), window_spec=(8, 4, 4, 2)),
    head_kwargs={"d_model": 64, "memory_layers": 1, "memory_mlp_dim": 32, "decoder_mlp_dim": 32},
    image_size=64,
    preprocessing="sam2",
    test_fixture=True,
)
CLIPS = SyntheticClips(frames=3, depth=(8, 12), side=(48, 64))


def test_clips_follow_one_object_from_a_prompted_slice():
    rng = np.random.default_rng(3)
    for _ in range(10):
        clip = CLIPS.draw(rng)
        t, h, w, c = clip.frames.shape
        assert t == 3 and c == 3 and 48 <= h <= 64 and 48 <= w <= 64
        assert clip.frames.dtype == np.uint8 and clip.masks.shape == (t, h, w)
        assert clip.masks[0].any()  # the prompted frame shows the object
        # consecutive slices of one ellipsoid overlap
        both = clip.masks[0] & clip.masks[1]
        assert not clip.masks[1].any() or both.sum() > 0.3 * clip.masks[1].sum()


class _Same:
    """Always the same clip: the trainer must fit it."""

    def __init__(self, clip: Clip) -> None:
        self.clip = clip

    def draw(self, rng: np.random.Generator) -> Clip:
        return self.clip


def test_clip_trainer_learns_to_track_a_clip_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = build_sam2(SPEC)
    source = _Same(CLIPS.draw(np.random.default_rng(5)))
    config = ClipConfig(
        steps=60,
        batch_size=2,
        lr=2e-3,
        warmup_steps=5,
        trainable="all",
        seed=1,
        checkpoint_every=30,
    )
    trainer = ClipTrainer(model, source, config)
    assert all(p.requires_grad for p in model.parameters())  # "all" is everything
    results = []
    for result in trainer.run(checkpoint=tmp_path / "clip.safetensors"):
        results.append(result)
        if result.step == 30:
            break
    resumed = ClipTrainer(build_sam2(SPEC), source, config)
    resumed.load_state(tmp_path / "clip.safetensors")
    assert resumed.step == 30
    results += list(resumed.run())
    first = np.mean([r.mask_loss for r in results[:5]])
    last = np.mean([r.mask_loss for r in results[-5:]])
    tracked = [r.extra["tracked_iou"] for r in results]
    print(
        f"mask loss {first:.3f} -> {last:.3f}; tracked IoU {np.mean(tracked[:5]):.3f} -> "
        f"{np.mean(tracked[-5:]):.3f}"
    )
    assert last < 0.6 * first
    assert np.mean(tracked[-5:]) > np.mean(tracked[:5]) + 0.2


def test_decoder_setting_freezes_the_image_encoder():
    trainer = ClipTrainer(
        build_sam2(SPEC),
        _Same(CLIPS.draw(np.random.default_rng(1))),
        ClipConfig(steps=1, trainable="decoder"),
    )
    model = trainer.model
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert all(p.requires_grad for p in model.memory_attention.parameters())
    assert all(p.requires_grad for p in model.sam_mask_decoder.parameters())
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    trainer.train_step()
    assert all(torch.equal(v, model.image_encoder.state_dict()[k]) for k, v in before.items())


def test_volume_dice_measures_both_engines_on_the_same_cases():
    from napari_sam.training.evaluate import dice, tracking_cases, tracking_dice

    a = np.zeros((2, 4, 4), bool)
    a[0, :2] = True
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0 and dice(a & False, a & False) == 1.0
    cases = tracking_cases(11, 2, shape=(10, 48, 56))
    assert [c[2] for c in cases] == [int(np.argmax(c[1].sum(axis=(1, 2)))) for c in cases]
    torch.manual_seed(0)
    scores = tracking_dice(build_sam2(SPEC), cases)
    # Untrained: whatever it tracks, the prompted slice is the true mask itself.
    floor = [2 * c[1][c[2]].sum() / (c[1].sum() + c[1][c[2]].sum() + c[1].size) for c in cases]
    assert all(f < d <= 1 for f, d in zip(floor, scores, strict=True))

"""SAM 2 training on clips (training/clips.py, training/clip_trainer.py) on a very small model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.models.sam2.build import build_sam2
from napari_sam.registry import ModelSpec, _hiera
from napari_sam.training.clip_trainer import ClipConfig, ClipTrainer
from napari_sam.training.clips import Clip, SyntheticClips
from napari_sam.training.synthetic import ellipsoid_volume
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


def test_tracked_frames_supervise_every_candidate_unless_told_best():
    """``tracked_masks="all"``: a tracked frame's loss is the mean of its three candidates'.

    Same model, same clip, same prompt: the mean is at least the minimum, and larger for an
    untrained decoder whose candidates differ; the prompted frame keeps the best-of-three loss
    either way (a box or a click is ambiguous; the memory is not).
    """
    clip = CLIPS.draw(np.random.default_rng(5))
    losses = {}
    for tracked in ("all", "best"):
        torch.manual_seed(0)
        config = ClipConfig(steps=1, batch_size=1, p_mask=0.0, seed=3, tracked_masks=tracked)
        model = build_sam2(SPEC)
        with torch.no_grad():  # the object seen: else every candidate is SAM 2's "no object"
            model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 5.0
        trainer = ClipTrainer(model, _Same(clip), config)
        trainer._set_modes()
        trainer.model.eval()  # no dropout: the two walks differ only by the loss
        images, truth = trainer._frames([clip])
        with torch.no_grad():
            losses[tracked] = trainer._walk(images, truth)[1]["mask"]
    print(losses)
    assert losses["all"] > losses["best"] + 1e-4
    with pytest.raises(ValueError, match="tracked_masks"):
        ClipConfig(tracked_masks="selected")


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


def test_tracking_cases_follow_both_objects_of_the_same_volumes():
    from napari_sam.training.evaluate import tracking_cases

    shape = (10, 48, 56)
    alternate = tracking_cases(11, 4, shape=shape)
    first = tracking_cases(11, 4, shape=shape, follow="first")
    _, labels = ellipsoid_volume(np.random.default_rng(11), shape, n_objects=2)
    for i, ((vol_a, truth_a, start_a), (vol_f, truth_f, _)) in enumerate(
        zip(alternate, first, strict=True)
    ):
        assert np.array_equal(vol_a, vol_f)  # same volumes whatever is followed
        if i % 2 == 0:
            assert np.array_equal(truth_a, truth_f)
        else:  # the other ellipsoid: no voxel shared with object 1's mask
            assert truth_a.any() and not (truth_a & truth_f).any()
        assert start_a == int(np.argmax(truth_a.sum(axis=(1, 2))))
    assert np.array_equal(alternate[0][1], labels == 1)
    with pytest.raises(ValueError, match="follow"):
        tracking_cases(11, 1, shape=shape, follow="second")


def test_same_level_volumes_leave_only_the_prompt_to_tell_the_objects_apart():
    shape = (10, 48, 56)
    gaps = {}
    for same in (False, True):
        volume, labels = ellipsoid_volume(
            np.random.default_rng(7), shape, n_objects=2, same_level=same
        )
        if same is False:  # the default draws the same volume as before the option existed
            default = ellipsoid_volume(np.random.default_rng(7), shape, n_objects=2)
            assert np.array_equal(default[0], volume) and np.array_equal(default[1], labels)
        one, two = (np.median(volume[labels == k]) for k in (1, 2))
        background = np.median(volume[labels == 0])
        gaps[same] = (one - two, one - background)
    assert gaps[False][0] > 0.5 * gaps[False][1]  # bright vs dark
    assert abs(gaps[True][0]) < 0.25 * gaps[True][1]  # as bright as each other


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

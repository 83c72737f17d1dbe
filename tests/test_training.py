"""The training loop, its data sources and ``napari-sam train`` on a tiny model configuration.

A ViT with embed_dim 32, depth 1 at image size 64 goes through the same code path (prompt
encoder, full mask decoder, preprocessing, checkpoints) as the real models, in a fraction of
the time.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_sam.models.build import build_sam
from napari_sam.predictor import SamPredictor
from napari_sam.registry import ModelSpec
from napari_sam.training import prompt_sim
from napari_sam.training.datasets import ImageFolder, NiftiFolder, SyntheticSource, open_source
from napari_sam.training.synthetic import (
    SceneConfig,
    TrainingSample,
    ellipsoid_volume,
    synthetic_ellipsoid_slice,
    synthetic_scene,
)
from napari_sam.training.trainer import TrainConfig, Trainer, state_path

TINY = ModelSpec(
    name="sam_test_training_tiny",
    encoder="vit",
    encoder_kwargs={
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "window_size": 4,
        "global_attn_indexes": (0,),
    },
    image_size=64,
    test_fixture=True,
    description="test fixture for the training loop",
)
SMALL_SCENES = SceneConfig(size=(48, 80))


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these small ops run faster without threading overhead (and a
    shared CI machine is not oversubscribed); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_sam(TINY)


def config(**kw) -> TrainConfig:
    base = dict(steps=4, batch_size=2, prompts_per_image=2, lr=1e-3, warmup_steps=1, seed=3)
    return TrainConfig(**{**base, **kw})


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- synthetic data and prompt simulation ---------------------------------------------------


def test_synthetic_scene_is_seeded_and_well_formed():
    a = synthetic_scene(np.random.default_rng(5))
    b = synthetic_scene(np.random.default_rng(5))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    h, w = a.labels.shape
    assert 128 <= h <= 320 and 128 <= w <= 320
    assert a.image.shape == (h, w, 3) and a.image.dtype == np.uint8
    ids = np.unique(a.labels)
    assert ids[0] == 0 and list(ids[1:]) == list(range(1, len(ids)))  # consecutive ids
    assert (a.labels == 1).any()


def test_object_sizes_follow_the_config():
    rng = np.random.default_rng(0)
    cfg = SceneConfig(n_objects=(1, 1), p_touching=0.0, p_blob=0.0, object_scale=(0.3, 0.3))
    for _ in range(5):
        sample = synthetic_scene(rng, cfg)
        mask = sample.labels == 1
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        # An ellipse of major diameter 0.3 * short side (minus what falls off the image).
        extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
        assert extent <= 0.3 * min(mask.shape) + 2


def test_ellipsoid_slice_neighbour_is_the_adjacent_cross_section():
    rng = np.random.default_rng(1)
    for _ in range(5):
        s = synthetic_ellipsoid_slice(rng)
        assert s.neighbour is not None and s.neighbour.shape == s.labels.shape
        a, b = s.labels == 1, s.neighbour == 1
        if a.sum() > 200 and b.any():
            overlap = (a & b).sum() / (a | b).sum()
            assert overlap > 0.6  # one slice apart: nearly the same outline


def test_ellipsoid_volume_labels_match_the_picture():
    volume, labels = ellipsoid_volume(np.random.default_rng(2), (12, 64, 72), n_objects=2)
    assert volume.shape == labels.shape == (12, 64, 72) and volume.dtype == np.uint8
    inside = volume[labels == 1].astype(float).mean()
    outside = volume[labels == 0].astype(float).mean()
    assert abs(inside - outside) > 20  # the object is visible


def test_correction_click_lands_in_the_error_with_the_right_sign():
    rng = np.random.default_rng(0)
    truth = np.zeros((40, 40), bool)
    truth[10:30, 10:30] = True
    missed = truth.copy()
    missed[10:30, 20:30] = False  # right half missed -> positive click there
    (x, y), label = prompt_sim.correction_click(rng, missed, truth)
    assert label == 1 and 20 <= x < 30 and 10 <= y < 30
    too_much = truth.copy()
    too_much[30:40, :] = True  # extra rows taken -> negative click there
    (x, y), label = prompt_sim.correction_click(rng, too_much, truth)
    assert label == 0 and y >= 30
    assert prompt_sim.correction_click(rng, truth, truth) is None


def test_jittered_box_stays_near_the_object_and_inside_the_frame():
    rng = np.random.default_rng(0)
    mask = np.zeros((50, 60), bool)
    mask[5:25, 40:60] = True
    for _ in range(20):
        x0, y0, x1, y1 = prompt_sim.jittered_box(rng, mask, noise=0.1, max_shift=4)
        assert 0 <= x0 <= x1 <= 59 and 0 <= y0 <= y1 <= 49
        assert abs(x0 - 40) <= 4 and abs(y1 - 24) <= 4
    with pytest.raises(ValueError, match="empty"):
        prompt_sim.jittered_box(rng, np.zeros((5, 5), bool))


# -- the training loop ----------------------------------------------------------------------


class FixedSource:
    """Always the same sample: the loss on it must go down."""

    def __init__(self, sample: TrainingSample) -> None:
        self.sample = sample

    def draw(self, rng):
        return self.sample


def test_loss_decreases_on_a_fixed_batch():
    sample = synthetic_scene(
        np.random.default_rng(11), dataclasses.replace(SMALL_SCENES, n_objects=(1, 1))
    )
    trainer = Trainer(
        tiny_model(),
        FixedSource(sample),
        config(steps=16, lr=3e-3, p_box=1.0, max_corrections=0, trainable="all"),
    )
    losses = [r.loss for r in trainer.run()]
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4])


def test_seeded_runs_are_identical():
    runs = []
    for _ in range(2):
        model = tiny_model(seed=7)
        trainer = Trainer(model, SyntheticSource(SMALL_SCENES), config(steps=3, trainable="all"))
        losses = [r.loss for r in trainer.run()]
        runs.append((losses, weights(model)))
    assert runs[0][0] == runs[1][0]
    assert same(runs[0][1], runs[1][1])
    # and another seed gives another run
    other = Trainer(tiny_model(7), SyntheticSource(SMALL_SCENES), config(steps=3, seed=4))
    assert [r.loss for r in other.run()] != runs[0][0]


def test_resume_continues_from_the_saved_step(tmp_path):
    source = SyntheticSource(SMALL_SCENES)
    straight = tiny_model(seed=1)
    straight_losses = [r.loss for r in Trainer(straight, source, config(steps=4)).run()]

    ckpt = tmp_path / "run.safetensors"
    first = Trainer(tiny_model(seed=1), source, config(steps=4, checkpoint_every=2))
    run = first.run(checkpoint=ckpt)
    part = [next(run).loss, next(run).loss]  # stop after step 2 (checkpoint written)
    run.close()
    assert state_path(ckpt).exists()

    resumed_model = tiny_model(seed=99)  # different weights: must be replaced by the checkpoint
    resumed = Trainer(resumed_model, source, config(steps=4, checkpoint_every=2))
    resumed.load_state(ckpt)
    assert resumed.step == 2
    rest = [r.loss for r in resumed.run()]
    assert len(rest) == 2
    assert part + rest == pytest.approx(straight_losses, rel=1e-5)
    assert all(
        torch.allclose(a, b, atol=1e-6)
        for a, b in zip(weights(straight).values(), weights(resumed_model).values())
    )


@pytest.mark.parametrize(("every", "due"), [(2, [2, 4, 5]), (0, [5])])
def test_checkpoint_due_every_n_steps_and_after_the_last(tmp_path, every, due):
    trainer = Trainer(
        tiny_model(seed=1), SyntheticSource(SMALL_SCENES), config(steps=5, checkpoint_every=every)
    )
    ckpt = tmp_path / "run.safetensors"
    seen = []
    for result in trainer.run(checkpoint=ckpt):
        if trainer.checkpoint_due():
            seen.append(result.step)
            assert state_path(ckpt).exists()  # run() wrote it before yielding the step
            assert torch.load(state_path(ckpt), weights_only=True)["step"] == result.step
    assert seen == due


def test_resume_without_state_is_a_clear_error(tmp_path):
    from napari_sam.weights import save_checkpoint

    path = save_checkpoint(tiny_model(), tmp_path / "plain.safetensors")
    trainer = Trainer(tiny_model(), SyntheticSource(SMALL_SCENES), config())
    with pytest.raises(FileNotFoundError, match="no training state"):
        trainer.load_state(path)


def test_decoder_only_leaves_the_encoders_unchanged():
    model = tiny_model()
    before = weights(model)
    trainer = Trainer(model, SyntheticSource(SMALL_SCENES), config(steps=2, trainable="decoder"))
    for _ in trainer.run():
        pass
    after = weights(model)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if name.startswith("mask_decoder."):
            continue
        assert not changed, f"{name} changed although only the decoder trains"
    decoder = [n for n in before if n.startswith("mask_decoder.")]
    assert any(not torch.equal(before[n], after[n]) for n in decoder)


def test_iou_head_training_changes_only_the_scores():
    """``trainable="iou_head"`` recalibrates the predicted IoUs: every other weight, and so
    every mask, stays exactly as it was."""
    model = tiny_model()
    before = weights(model)
    image = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    point = dict(point_coords=np.array([[30.0, 30.0]]), point_labels=np.array([1]))

    def outputs():
        model.eval()
        predictor = SamPredictor(model)
        predictor.set_image(image)
        _, scores, low = predictor.predict(**point, multimask_output=True)
        return scores, low

    scores_before, low_before = outputs()
    trainer = Trainer(
        model, SyntheticSource(SMALL_SCENES), config(steps=3, lr=1e-2, trainable="iou_head")
    )
    for _ in trainer.run():
        pass
    after = weights(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("mask_decoder.iou_prediction_head.") for n in changed)
    scores_after, low_after = outputs()
    np.testing.assert_array_equal(low_after, low_before)
    assert not np.allclose(scores_after, scores_before)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="trainable"):
        TrainConfig(trainable="encoder")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


# -- folder sources and the command line --------------------------------------------------


def write_png_pairs(root, n=3, seed=0):
    from skimage import io

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        sample = synthetic_scene(rng, SMALL_SCENES)
        io.imsave(root / "images" / f"case{i}.png", sample.image[..., 0], check_contrast=False)
        io.imsave(
            root / "masks" / f"case{i}.png",
            (sample.labels * 40).astype(np.uint8),
            check_contrast=False,
        )
    return root


def test_image_folder_pairs_by_name(tmp_path):
    root = write_png_pairs(tmp_path / "data")
    source = open_source(root)
    assert isinstance(source, ImageFolder) and len(source) == 3
    sample = source.draw(np.random.default_rng(0))
    assert sample.image.shape[-1] == 3 and sample.image.shape[:2] == sample.labels.shape
    assert sample.labels.max() >= 1
    (root / "images" / "lonely.png").write_bytes((root / "images" / "case0.png").read_bytes())
    with pytest.raises(ValueError, match="lonely"):
        ImageFolder(root)
    with pytest.raises(ValueError, match="masks/"):
        ImageFolder(tmp_path / "nowhere")


def test_nifti_folder_gives_slices_with_neighbours(tmp_path):
    import nibabel as nib

    volume, labels = ellipsoid_volume(np.random.default_rng(3), (10, 48, 56), n_objects=1)
    for sub, data in (("images", volume.astype(np.int16)), ("labels", labels.astype(np.uint8))):
        (tmp_path / sub).mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / sub / "vol.nii.gz")
    from napari_sam.io.nifti import read_nifti

    source = open_source(tmp_path)
    assert isinstance(source, NiftiFolder)
    shown = read_nifti(tmp_path / "labels" / "vol.nii.gz").data  # display orientation
    assert len(source) == int(shown.reshape(shown.shape[0], -1).any(axis=1).sum()) > 0
    sample = source.draw(np.random.default_rng(0))
    assert sample.neighbour is not None and sample.neighbour.shape == sample.labels.shape
    assert sample.image.dtype == np.uint8 and sample.labels.any()


def test_cli_train_help(capsys):
    from napari_sam.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--trainable" in out and "images/" in out


def test_cli_train_two_steps_on_png_pairs(tmp_path):
    from napari_sam.cli import main
    from napari_sam.weights import load_model

    root = write_png_pairs(tmp_path / "data")
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(TINY.to_json())
    out = tmp_path / "tuned.safetensors"
    argv = ["train", str(root), "-o", str(out), "--config", str(spec_file), "--steps", "2"]
    assert main([*argv, "--batch-size", "2", "--trainable", "all", "--half"]) == 0
    model = load_model(out, device="cpu")
    assert model.spec.name == TINY.name and model.image_size == 64
    assert not state_path(out).exists()  # finished: no resume state left behind


def test_cli_train_reports_bad_data(tmp_path, capsys):
    from napari_sam.cli import main

    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(TINY.to_json())
    (tmp_path / "empty").mkdir()
    code = main(
        [
            "train",
            str(tmp_path / "empty"),
            "-o",
            str(tmp_path / "o.pth"),
            "--config",
            str(spec_file),
        ]
    )
    assert code == 2
    assert "images/" in capsys.readouterr().err

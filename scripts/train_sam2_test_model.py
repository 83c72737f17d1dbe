"""Train the small SAM 2 test fixture on synthetic ellipsoid clips and write it to tests/data/.

``sam2_test_tiny`` is SAM 2.1's architecture narrowed to stay under 10 MB in float16: a Hiera
trunk of widths 32-256 (stages 1-1-2-1), heads 128 wide, two memory-attention layers, input size
256 (3.1 M parameters, 6.2 MB). It learns to follow ellipsoids through synthetic volumes
(:class:`~napari_sam.training.clips.SyntheticClips`, 8-frame clips) with
:class:`~napari_sam.training.clip_trainer.ClipTrainer`: a test fixture, never a model for real
images. Every checkpoint is validated (tracking Dice on seed-6000 volumes) and the best one is kept
(early stopping: a run can collapse late). At the end it writes the kept weights in float16 and
reports their volume Dice of tracking and, on the same held-out volumes, of the SAM 1 fixture's
propagation (``tests/data/sam_test_tiny.safetensors``), on two held-out sets.

Run from the repository root; resumable (``--resume`` continues from ``--work-dir``)::

    nice -n 10 .venv/bin/python scripts/train_sam2_test_model.py > train2.log 2>&1 &

Then, from the base run's kept weights (``<work-dir>/sam2_test_tiny.best.safetensors``; see
``IDENTITY_CONFIG`` below), ``--phase identity --init <those weights>``.

Measured: 2.6-3.2 s per step with 2 threads on the 2-core machine (batch of 2 clips of 8
frames), so the default 1600 steps take about 80 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_sam.models.sam2.build import build_sam2
from napari_sam.registry import ModelSpec, _hiera
from napari_sam.training.clip_trainer import ClipConfig, ClipTrainer
from napari_sam.training.clips import SyntheticClips
from napari_sam.training.evaluate import propagation_dice, tracking_cases, tracking_dice
from napari_sam.weights import load_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NAME = "sam2_test_tiny"

SPEC = ModelSpec(
    name=NAME,
    family="sam2",
    encoder="hiera",
    encoder_kwargs=_hiera(32, 1, (1, 1, 2, 1), (2, 3), window_spec=(8, 4, 16, 8)),
    head_kwargs={"d_model": 128, "memory_layers": 2, "memory_mlp_dim": 512, "decoder_mlp_dim": 512},
    image_size=256,
    preprocessing="sam2",
    license="Apache-2.0",
    description=(
        "test fixture: a narrow SAM 2.1 trained by scripts/train_sam2_test_model.py on "
        "synthetic ellipsoid volumes only; useless on real images"
    ),
    test_fixture=True,
)

CONFIG = ClipConfig(
    steps=1600,
    batch_size=2,
    lr=5e-4,
    weight_decay=0.01,
    warmup_steps=150,
    min_lr_ratio=0.02,
    trainable="all",
    p_box=0.5,
    p_mask=0.35,
    iou_weight=2.0,
    grad_clip=1.0,
    seed=20261202,
    checkpoint_every=100,
    tracked_masks="best",  # what the base run used; it let the decoder hedge (phase 2)
)

# Phase 2, "identity": the base run's model keeps the salient ellipsoid (the bright one on top)
# whatever its prompt says, right on object 1 and wrong on object 2 (measured on the step kept,
# 2026-12-03: tracking Dice 0.97 following object 1, 0.09 following object 2). Its decoder
# hedges: on tracked frames it offers a candidate on each ellipsoid, which the best-of-three
# mask loss ("best") rewards, and its IoU head keeps the salient one. This phase starts from
# the base run's kept weights (--init) and supervises all three candidates of tracked frames
# ("all"), on clips of two or three objects, the first frame prompted with the true mask more
# often, so that the memory holds the right object.
# Measured (2026-12-03, validation Dice following both objects in turn; the base step 800 scores
# 0.52 there): with "best" and lr 2e-4, 0.52 / 0.47 at steps 100 / 200 (stopped); with "all",
# lr 2e-4, 800 steps, best 0.686 (step 500); as below (lr 5e-4, decoder and memory only, 80 %
# mask prompts, half the volumes with equally bright objects, 600 steps), best 0.702 (step
# 300), held-out 0.549 / 0.575. None tracks the prompted object: the committed fixture is still
# the base step 800, and this phase is where the next attempt starts.
IDENTITY_CONFIG = ClipConfig(
    **{
        **CONFIG.to_dict(),
        "steps": 600,
        "lr": 5e-4,
        "warmup_steps": 50,
        "min_lr_ratio": 0.05,
        "trainable": "decoder",
        "p_mask": 0.8,
        "seed": 20261203,
        "tracked_masks": "all",
    }
)
PHASES = {
    "base": (CONFIG, SyntheticClips()),
    "identity": (IDENTITY_CONFIG, SyntheticClips(objects=(2, 3), p_same_level=0.5)),
}

EVAL_SEED = 4246  # held out: neither training seed nor the SAM 1 quality test's 4242-4244
SECOND_EVAL_SEED = 5000  # a second held-out set, so that the fixture is not judged on one set
# Validation, for keeping the best checkpoint: a third seed, never a test's, following both
# objects in turn (tracking_cases' default). The 2026-12-03 base run, validated on object 1
# alone, scored 0.968 at step 800 and 0.20 by step 1200 (those steps kept object 2 whatever the
# prompt; step 800 keeps object 1 whatever the prompt), so the last step is not the one to keep.
VALIDATION_SEED = 6000
VALIDATION_VOLUMES = 8


def validation_dice(model: torch.nn.Module) -> float:
    """Mean tracking volume Dice on the validation volumes (the model is left in eval mode)."""
    model.eval()
    return float(np.mean(tracking_dice(model, tracking_cases(VALIDATION_SEED, VALIDATION_VOLUMES))))


def held_out_metrics(
    model: torch.nn.Module, sam1: torch.nn.Module, seed: int, n_volumes: int
) -> dict:
    """Volume Dice of ``model``'s tracking and of ``sam1``'s propagation on one held-out set."""
    cases = tracking_cases(seed, n_volumes)
    sam2_dice = tracking_dice(model, cases)
    sam1_dice = propagation_dice(sam1, cases)
    return {
        "seed": seed,
        "volumes": n_volumes,
        "tracking_dice": [round(d, 4) for d in sam2_dice],
        "sam1_propagation_dice": [round(d, 4) for d in sam1_dice],
        "tracking_dice_mean": round(float(np.mean(sam2_dice)), 4),
        "sam1_propagation_dice_mean": round(float(np.mean(sam1_dice)), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data")
    parser.add_argument(
        "--work-dir", type=Path, help="default: napari-sam-train-sam2[-PHASE] in the temp dir"
    )
    parser.add_argument("--phase", choices=sorted(PHASES), default="base")
    parser.add_argument(
        "--init", type=Path, help="start from these weights (the identity phase needs them)"
    )
    parser.add_argument("--steps", type=int, help="default: the phase's")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-volumes", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    phase_config, clips = PHASES[args.phase]
    if args.phase != "base" and args.init is None and not args.resume:
        parser.error(f"--phase {args.phase} starts from trained weights: pass --init")
    config = ClipConfig(**{**phase_config.to_dict(), "steps": args.steps or phase_config.steps})
    torch.manual_seed(config.seed)
    model = build_sam2(SPEC)
    if args.init is not None:
        model.load_state_dict(load_model(args.init, device="cpu").state_dict())
    trainer = ClipTrainer(model, clips, config)
    suffix = "" if args.phase == "base" else f"-{args.phase}"
    work_dir = args.work_dir or Path(tempfile.gettempdir()) / f"napari-sam-train-sam2{suffix}"
    work = work_dir / f"{NAME}.safetensors"
    if args.resume and work.exists():
        trainer.load_state(work)
        print(f"resumed at step {trainer.step}", flush=True)
    best = work.with_name(f"{NAME}.best.safetensors")
    best_record = work.with_name(f"{NAME}.best.json")
    kept = json.loads(best_record.read_text()) if args.resume and best_record.exists() else None
    start = time.perf_counter()
    window: list[float] = []
    ious: list[float] = []
    for result in trainer.run(checkpoint=work):
        window.append(result.loss)
        ious.append(result.extra["tracked_iou"])
        if trainer.checkpoint_due():  # right after run() wrote this step's checkpoint
            score = validation_dice(model)
            if kept is None or score > kept["validation_dice"]:
                save_checkpoint(model, best, spec=SPEC)
                kept = {"step": result.step, "validation_dice": round(score, 4)}
                best_record.write_text(json.dumps(kept) + "\n")
            print(f"step {result.step:5d}  validation Dice {score:.3f}  kept {kept}", flush=True)
        if result.step % 10 == 0:
            print(
                f"step {result.step:5d}  loss {np.mean(window):.4f}  mask {result.mask_loss:.4f}"
                f"  iou {result.iou_loss:.4f}  object {result.extra['object_loss']:.4f}"
                f"  tracked IoU {np.mean(ious):.3f}  lr {result.lr:.2e}"
                f"  {result.seconds:.2f} s/step  {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            window, ious = [], []
    if kept is None:
        raise SystemExit("no step was validated; nothing to write")

    args.out.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(load_model(best), args.out / f"{NAME}.safetensors", half=True)
    # Measured on the float16 file as committed, not on the float32 weights in memory.
    saved = load_model(path, device="cpu")
    sam1 = load_model(ROOT / "tests" / "data" / "sam_test_tiny.safetensors", device="cpu")
    metrics = [
        held_out_metrics(saved, sam1, seed, args.eval_volumes)
        for seed in (EVAL_SEED, SECOND_EVAL_SEED)
    ]
    print("held-out metrics:", json.dumps(metrics), flush=True)
    record = {
        "name": NAME,
        "spec": SPEC.to_dict(),
        "phase": args.phase,
        "init": None if args.init is None else args.init.name,
        "train": config.to_dict(),
        "clips": dataclasses.asdict(clips),
        "kept_step": kept["step"],
        "validation": {
            "seed": VALIDATION_SEED,
            "volumes": VALIDATION_VOLUMES,
            "tracking_dice_mean": kept["validation_dice"],
        },
        "eval_seed": EVAL_SEED,
        "metrics": metrics,
        "metrics_note": "volume Dice, true mask on the largest cross-section as the one prompt",
        "wall_time_s": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    tmp = args.out / f"{NAME}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(args.out / f"{NAME}.json")
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

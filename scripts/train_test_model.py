"""Train the small SAM test fixture on synthetic shapes and write it to tests/data/.

The model (``sam_test_tiny``) has the real prompt encoder and mask decoder and a small ViT image
encoder at image size 256. It knows only synthetic ellipses, blobs and ellipsoid slices: it is a
test fixture that lets the suite check segmentation quality end to end, never a model for real
images.

Stage 1 trains everything for 4000 steps; stage 2 calibrates the decoder (IoU-head loss weighted
up) for 800 steps; stage 3 trains the IoU head alone for 2000 steps, mostly on single clicks.
Run from the repository root (about 50 minutes on an idle 2-core CPU)::

    nice -n 10 .venv/bin/python scripts/train_test_model.py > train.log 2>&1 &

Writes ``tests/data/sam_test_tiny.safetensors`` (float16, < 10 MB) and
``tests/data/sam_test_tiny.json`` (every setting, versions, wall time and final metrics).
Intermediate resumable checkpoints go to ``--work-dir``; ``--resume`` continues from there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_sam.models.build import build_sam
from napari_sam.registry import ModelSpec
from napari_sam.training.datasets import SyntheticSource
from napari_sam.training.evaluate import evaluate
from napari_sam.training.synthetic import SceneConfig
from napari_sam.training.trainer import TrainConfig, Trainer
from napari_sam.weights import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NAME = "sam_test_tiny"

SPEC = ModelSpec(
    name=NAME,
    encoder="vit",
    encoder_kwargs={
        "embed_dim": 64,
        "depth": 4,
        "num_heads": 4,
        "window_size": 8,
        "global_attn_indexes": (1, 3),
    },
    image_size=256,
    url=None,
    license="Apache-2.0",
    description=(
        "test fixture: a tiny SAM trained by scripts/train_test_model.py on synthetic shapes "
        "only (ellipses, blobs, ellipsoid slices); useless on real images"
    ),
    test_fixture=True,
)

CONFIG = TrainConfig(
    steps=4000,
    batch_size=4,
    prompts_per_image=4,
    lr=5e-4,
    weight_decay=0.01,
    warmup_steps=150,
    min_lr_ratio=0.02,
    trainable="all",
    max_corrections=1,
    p_box=0.5,
    p_dense=0.7,
    p_prev_logits=0.5,
    iou_weight=2.0,
    grad_clip=1.0,
    seed=20261122,
    checkpoint_every=250,
)

# Stage 2: the decoder alone, with the IoU head's loss weighted up, from the stage-1 weights as
# stored (float16). One click picks the best of three masks by predicted IoU; after stage 1 that
# choice lost about 0.05 IoU against the best of the three, and calibrating the IoU head
# recovers part of it without touching the image encoder.
CALIBRATION = TrainConfig(
    **{
        **CONFIG.to_dict(),
        "steps": 800,
        "lr": 2e-4,
        "warmup_steps": 20,
        "iou_weight": 20.0,
        "trainable": "decoder",
        "seed": CONFIG.seed + 1,
        "checkpoint_every": 0,
    }
)

# Stage 3: only the IoU head (every mask stays as stage 2 made it), from the stage-2 weights as
# stored, on more single clicks than stage 1 saw. After stage 2 one click's chosen mask was still
# 0.05 IoU below the best of the three; recalibrated scores pick better (held-out one-click mean
# IoU 0.845 -> 0.860 on the quality test's 100 cases, 0.856 -> 0.873 on the script's 60).
SCORES = TrainConfig(
    **{
        **CONFIG.to_dict(),
        "steps": 2000,
        "lr": 1e-3,
        "warmup_steps": 20,
        "trainable": "iou_head",
        "p_box": 0.25,
        "p_dense": 0.35,
        "seed": CONFIG.seed + 2,
        "checkpoint_every": 0,
    }
)

EVAL_SEED = 777  # held-out cases: a different seed from training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "napari-sam-train-test-model",
        help="where resumable checkpoints go (default: a folder in the temp directory)",
    )
    parser.add_argument("--steps", type=int, default=CONFIG.steps)
    parser.add_argument("--resume", action="store_true", help="continue from --work-dir")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: reproducible, and fastest on a shared machine)",
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="only measure the held-out metrics of the model in --out and update its JSON",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.eval_only:
        return reevaluate(args.out)
    config = TrainConfig(**{**CONFIG.to_dict(), "steps": args.steps})
    scene = SceneConfig()
    torch.manual_seed(config.seed)  # the random initialisation is part of the recipe
    model = build_sam(SPEC)
    trainer = Trainer(model, SyntheticSource(scene), config)
    work = args.work_dir / f"{NAME}.safetensors"
    resumed_at = 0
    if args.resume and work.exists():
        trainer.load_state(work)
        resumed_at = trainer.step
        print(f"resumed at step {trainer.step}", flush=True)

    start = time.perf_counter()
    cpu_start = time.process_time()
    window: list[float] = []
    step_seconds: list[float] = []
    for result in trainer.run(checkpoint=work):
        window.append(result.loss)
        step_seconds.append(result.seconds)
        if result.step % 10 == 0 or result.step == config.steps:
            print(
                f"step {result.step:5d}  loss {np.mean(window):.4f}  mask {result.mask_loss:.4f}"
                f"  iou {result.iou_loss:.4f}  first-prompt IoU "
                f"{result.extra['first_prompt_iou']:.3f}  lr {result.lr:.2e}"
                f"  {result.seconds:.2f} s/step  {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            window = []
    # Stages 2 and 3 start from the weights as stored (float16), as a reload gives them.
    for label, stage in (("calibration", CALIBRATION), ("scores", SCORES)):
        _round_to_stored(model)
        for result in Trainer(model, SyntheticSource(scene), stage).run():
            step_seconds.append(result.seconds)
            if result.step % 100 == 0:
                print(
                    f"{label} step {result.step:4d}  loss {result.loss:.4f}  iou "
                    f"{result.iou_loss:.4f}  {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start

    model.eval()
    metrics = evaluate(model, seed=EVAL_SEED, n_cases=60)
    print("held-out metrics:", json.dumps(metrics), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(model, args.out / f"{NAME}.safetensors", spec=SPEC, half=True)
    record = {
        "name": NAME,
        "file": path.name,
        "bytes": path.stat().st_size,
        "spec": SPEC.to_dict(),
        "train": config.to_dict(),
        "calibration": CALIBRATION.to_dict(),
        "scores": SCORES.to_dict(),
        "resumed_at_step": resumed_at,
        "data": scene.to_dict(),
        "eval_seed": EVAL_SEED,
        "metrics": metrics,
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1),
        # On a shared machine the fastest steps show what an idle one does.
        "step_seconds_median": round(float(np.median(step_seconds)), 3) if step_seconds else None,
        "step_seconds_p10": round(float(np.percentile(step_seconds, 10)), 3)
        if step_seconds
        else None,
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "command": " ".join(["scripts/train_test_model.py", *sys.argv[1:]]),
    }
    _write_record(args.out / f"{NAME}.json", record)
    print(f"wrote {path} ({record['bytes']} bytes) in {wall / 60:.1f} min", flush=True)
    return 0


def _round_to_stored(model: torch.nn.Module) -> None:
    """Weights and buffers as a reload of the float16 file gives them."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())


def reevaluate(out: Path) -> int:
    from napari_sam.weights import load_model

    model = load_model(out / f"{NAME}.safetensors", device="cpu")
    metrics = evaluate(model, seed=EVAL_SEED, n_cases=60)
    print("held-out metrics:", json.dumps(metrics), flush=True)
    info_path = out / f"{NAME}.json"
    record = json.loads(info_path.read_text())
    record["metrics"] = metrics
    _write_record(info_path, record)
    return 0


def _write_record(path: Path, record: dict) -> None:
    """The JSON beside the weights, replaced atomically (never left half-written)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())

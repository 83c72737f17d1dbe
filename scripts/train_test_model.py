"""Train the small SAM test fixture on synthetic shapes and write it to tests/data/.

The model (``sam_test_tiny``) has the real prompt encoder and mask decoder and a small ViT image
encoder at image size 256. It knows only synthetic ellipses, blobs and ellipsoid slices: it is a
test fixture that lets the suite check segmentation quality end to end, never a model for real
images.

Run from the repository root (about 30 minutes on a 2-core CPU)::

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
    steps=1100,
    batch_size=4,
    prompts_per_image=2,
    lr=5e-4,
    weight_decay=0.01,
    warmup_steps=100,
    min_lr_ratio=0.05,
    trainable="all",
    max_corrections=2,
    p_box=0.5,
    p_dense=0.7,
    p_prev_logits=0.5,
    iou_weight=1.0,
    grad_clip=1.0,
    seed=20261122,
    checkpoint_every=100,
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
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    config = TrainConfig(**{**CONFIG.to_dict(), "steps": args.steps})
    scene = SceneConfig()
    torch.manual_seed(config.seed)  # the random initialisation is part of the recipe
    model = build_sam(SPEC)
    trainer = Trainer(model, SyntheticSource(scene), config)
    work = args.work_dir / f"{NAME}.safetensors"
    if args.resume and work.exists():
        trainer.load_state(work)
        print(f"resumed at step {trainer.step}", flush=True)

    start = time.perf_counter()
    cpu_start = time.process_time()
    window: list[float] = []
    for result in trainer.run(checkpoint=work):
        window.append(result.loss)
        if result.step % 10 == 0 or result.step == config.steps:
            print(
                f"step {result.step:5d}  loss {np.mean(window):.4f}  mask {result.mask_loss:.4f}"
                f"  iou {result.iou_loss:.4f}  first-prompt IoU "
                f"{result.extra['first_prompt_iou']:.3f}  lr {result.lr:.2e}"
                f"  {result.seconds:.2f} s/step  {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            window = []
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
        "data": scene.to_dict(),
        "eval_seed": EVAL_SEED,
        "metrics": metrics,
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "command": " ".join(["scripts/train_test_model.py", *sys.argv[1:]]),
    }
    tmp = args.out / f"{NAME}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, args.out / f"{NAME}.json")
    print(f"wrote {path} ({record['bytes']} bytes) in {wall / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

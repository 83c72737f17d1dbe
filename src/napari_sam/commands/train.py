"""``napari-sam train``: fine-tune a SAM model on image/mask pairs with simulated prompts."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_sam.commands._options import (
    add_axis_option,
    add_device_option,
    add_model_options,
    add_window_option,
    window_from_args,
)

DESCRIPTION = """\
Fine-tune a SAM model on your own (image, mask) pairs. Prompts are simulated as SAM's training
did: a click inside an object or a noisy box, correction clicks on the error, and - for volumes -
the neighbouring slice's mask as a dense prompt.

DATA is a folder with images/ and masks/ (2D files paired by name: PNG, TIFF, JPEG; masks are
label images, 0 = background, each other value one object) or with images/ and labels/ holding
NIfTI volumes of the same names (slices along --axis). See docs/training.md.

The model is a registered name (its cached weights; downloaded if needed), a checkpoint file, or
a new small model from a spec JSON (--config). The result is a checkpoint with its spec inside:
load it with napari_sam.load_model(OUT) or pick the file in the widget. Training is resumable:
every --checkpoint-every steps OUT and OUT.train-state.pt are written; --resume continues.
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model on image/mask pairs (2D files or NIfTI volumes)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", type=Path, help="folder with images/ and masks/ (or labels/)")
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="checkpoint to write (.safetensors/.pth)"
    )
    which = p.add_mutually_exclusive_group(required=True)
    add_model_options(which, default=None, checkpoint_parser=p)
    which.add_argument(
        "--config",
        type=Path,
        help="JSON model spec (napari_sam.registry.ModelSpec fields) for a new, randomly "
        "initialised model",
    )
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (default 4)")
    p.add_argument("--prompts-per-image", type=int, default=2, help="objects per image (2)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument(
        "--trainable",
        choices=["iou_head", "decoder", "decoder+prompt", "all"],
        default="decoder",
        help="what trains: the mask decoder (default), plus the prompt encoder, or everything; "
        "iou_head recalibrates only the scores that pick one of the three masks",
    )
    p.add_argument("--max-corrections", type=int, default=2, help="correction clicks (<=)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between saves")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT's saved state")
    p.add_argument("--half", action="store_true", help="store the final weights as float16")
    add_axis_option(p, what="slicing axis of NIfTI volumes")
    add_window_option(p)
    add_device_option(p, default="cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on new HW)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run)


def _model(args):
    from napari_sam.cli import CommandError
    from napari_sam.weights import load_model

    if args.config is not None:
        import torch

        from napari_sam.models.build import build_sam
        from napari_sam.registry import ModelSpec

        try:
            spec = ModelSpec.from_json(args.config.read_text())
        except FileNotFoundError:
            raise CommandError(f"model spec file {args.config} does not exist") from None
        except (ValueError, TypeError) as exc:
            raise CommandError(f"{args.config} is not a valid model spec: {exc}") from None
        torch.manual_seed(args.seed)
        return build_sam(spec)
    model = args.model
    if Path(model).suffix.lower() in (".pth", ".pt", ".safetensors") and not Path(model).exists():
        raise CommandError(f"checkpoint {model} does not exist")
    try:
        return load_model(model, checkpoint=args.checkpoint, device="cpu")
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise CommandError(str(exc)) from None


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from napari_sam.cli import CommandError
    from napari_sam.training.datasets import open_source
    from napari_sam.training.trainer import TrainConfig, Trainer, state_path
    from napari_sam.weights import resolve_device, save_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        raise CommandError(f"training data folder {args.data} does not exist")
    if args.output.suffix.lower() not in (".safetensors", ".pth", ".pt"):
        raise CommandError(f"output {args.output} must end in .safetensors, .pth or .pt")
    window_from_args(args)  # a malformed --window fails now, not after reading every volume
    try:
        source = open_source(args.data, axis=args.axis, window=args.window)
        config = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            prompts_per_image=args.prompts_per_image,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            trainable=args.trainable,
            max_corrections=args.max_corrections,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            bf16=args.bf16,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    model = _model(args).to(resolve_device(args.device))
    trainer = Trainer(model, source, config)
    if args.resume:
        try:
            trainer.load_state(args.output)
        except (FileNotFoundError, ValueError) as exc:
            raise CommandError(f"cannot resume: {exc}") from None

    bar = tqdm(total=config.steps, initial=trainer.step, desc="training", unit="step")
    try:
        for result in trainer.run(checkpoint=args.output):
            bar.update(1)
            bar.set_postfix(
                loss=f"{result.loss:.4f}", iou=f"{result.extra['first_prompt_iou']:.3f}"
            )
    except KeyboardInterrupt:
        # Keep what was learnt so far: --resume continues from here.
        trainer.save(args.output)
        bar.close()
        print(f"saved step {trainer.step} to {args.output}; continue with --resume")
        raise
    bar.close()
    if args.half:
        save_checkpoint(model, args.output, spec=getattr(model, "spec", None), half=True)
        state_path(args.output).unlink(missing_ok=True)
    print(f"wrote {args.output} after {trainer.step} steps")
    return 0

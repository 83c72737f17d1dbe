"""``napari-sam segment --text``: objects found by name with a text detector, then SAM.

On a NIfTI volume the detector reads one slice (``--slice``); each box it finds becomes one
object seeded on that slice and propagated like a ``--box`` prompt. On a 2-D image (PNG, TIFF,
.npy, 2-D NIfTI) each box's mask is written into one labels image (.png, .tif or .npy).
Objects get labels ``--label``, ``--label + 1``, ... in the detector's order (best first).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_sam.io.atomic import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from napari_sam.commands.segment import ObjectPrompts
    from napari_sam.text.detectors import Detector, TransformersDetector
    from napari_sam.volume.session import VolumeSession

__all__ = [
    "IMAGE_OUTPUTS",
    "add_text_arguments",
    "check_text_args",
    "detect_objects",
    "is_image_input",
    "load_detector_or_fail",
    "run_image",
    "write_labels_image",
]

IMAGE_OUTPUTS = (".png", ".tif", ".tiff", ".npy")


def add_text_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "text prompts (pip install 'napari-sam-volumes[text]'; see docs/text-prompts.md)"
    )
    group.add_argument(
        "--text",
        metavar="PHRASES",
        help='find objects by name, e.g. "liver. left kidney.": a detector\'s boxes on the '
        "--slice (or the 2-D image) become the objects; natural-image detectors are weak on "
        "CT/MRI, check the result",
    )
    group.add_argument(
        "--detector",
        default="grounding-dino-tiny",
        help="grounding-dino-tiny (default), grounding-dino-base, owlv2, a Hugging Face Hub "
        "repository or a folder written by save_pretrained",
    )
    group.add_argument(
        "--box-threshold",
        type=float,
        help="keep boxes scored above this, 0..1 (default: the detector's, 0.35 for Grounding "
        "DINO, 0.1 for OWLv2)",
    )
    group.add_argument(
        "--text-threshold",
        type=float,
        help="keep boxes whose phrase scores above this, 0..1 (default: the detector's)",
    )


def load_detector_or_fail(args: argparse.Namespace) -> TransformersDetector:
    """Load ``--detector`` with the thresholds given; user errors become CommandErrors."""
    from napari_sam.cli import CommandError
    from napari_sam.text import load_detector
    from napari_sam.weights import WeightsUnavailableError

    for name in ("box_threshold", "text_threshold"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise CommandError(f"--{name.replace('_', '-')} must be in 0..1, got {value}")
    options = {
        k: getattr(args, k)
        for k in ("box_threshold", "text_threshold")
        if getattr(args, k) is not None
    }
    try:
        return load_detector(args.detector, device=args.device, **options)
    except (ImportError, ValueError, WeightsUnavailableError) as exc:
        raise CommandError(str(exc)) from None


def check_text_args(args: argparse.Namespace) -> list[str]:
    """Return the phrases of ``--text``; other prompts and bad labels are errors."""
    from napari_sam.cli import CommandError
    from napari_sam.text import parse_prompt

    if args.box is not None or args.point or args.negative or args.prompts is not None:
        raise CommandError("--text replaces --box, --point and --prompts: give one kind")
    if not 1 <= args.label <= 65535:
        raise CommandError(f"--label must be 1..65535, got {args.label}")
    try:
        return parse_prompt(args.text)
    except ValueError as exc:
        raise CommandError(f"--text: {exc}") from None


def _nothing_found(phrases: list[str], where: str, detector: Detector) -> Exception:
    from napari_sam.cli import CommandError

    return CommandError(
        f"the detector found nothing for {' '.join(phrases)!r} {where} above box threshold "
        f"{detector.box_threshold} / text threshold {detector.text_threshold}; lower "
        "--box-threshold/--text-threshold, try other words, or give a --box (detectors "
        "trained on natural images are weak on CT and MRI)"
    )


def detect_objects(
    args: argparse.Namespace, session: VolumeSession, detector: Detector, phrases: list[str]
) -> list[ObjectPrompts]:
    """Detect on ``args.slice_index``; return each box as a one-box object."""
    from napari_sam.cli import CommandError
    from napari_sam.commands.segment import ObjectPrompts, SlicePrompt
    from napari_sam.prompts import Prompts

    if not 0 <= args.slice_index < session.num_slices:
        raise CommandError(
            f"--slice {args.slice_index} is outside the volume: axis {args.axis} has "
            f"{session.num_slices} slices (0..{session.num_slices - 1})"
        )
    found = detector.detect(session.slice_image(args.slice_index), phrases)
    if len(found) == 0:
        raise _nothing_found(phrases, f"on slice {args.slice_index}", detector)
    labels = range(args.label, args.label + len(found))
    if labels[-1] > 65535:
        raise CommandError(f"{len(found)} objects from --label {args.label} pass 65535")
    objects = []
    for label, box, phrase, score in zip(labels, found.boxes, found.phrases, found.scores):
        print(f"object {label}: {phrase} score {score:.3f} box {_box_text(box)}")
        prompt = SlicePrompt(args.slice_index, Prompts.from_clicks(box=box))
        objects.append(ObjectPrompts(label, [prompt], phrase))
    return objects


def _box_text(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in box) + "]"


def is_image_input(path: Path) -> bool:
    """Not a NIfTI volume: a 2-D image for ``--text`` (a one-slice NIfTI stays a volume)."""
    from napari_sam.io.nifti import is_nifti_path

    if not is_nifti_path(path):
        return True
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception:  # a missing or broken file: the volume path reports it
        return False
    return isinstance(img, nib.Nifti1Image | nib.Nifti2Image) and len(img.shape) == 2


def run_image(args: argparse.Namespace, phrases: list[str]) -> int:
    """``--text`` on a 2-D image: detect, SAM per box, write one labels image."""
    from napari_sam.cli import CommandError
    from napari_sam.commands._options import load_model_or_fail, window_from_args
    from napari_sam.commands.amg import read_image
    from napari_sam.predictor import SamPredictor
    from napari_sam.text import segment_text
    from napari_sam.volume.propagation import merge_masks

    out = args.output
    if not out.name.lower().endswith(IMAGE_OUTPUTS):
        raise CommandError(f"output {out}: for a 2-D image write {', '.join(IMAGE_OUTPUTS)}")
    if not out.parent.is_dir():
        raise CommandError(f"output folder {out.parent} does not exist")
    if out.exists() and not args.force:
        raise CommandError(f"output {out} exists; pass --force to replace it")
    if not args.volume.exists():
        raise CommandError(f"image {args.volume} does not exist")
    # A 2-D image keeps its own min-max scaling unless a window is asked for.
    window = None if args.window == "auto" else window_from_args(args)
    try:
        image, to_uint8, _ = read_image(args.volume, None, 0, window)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    detector = load_detector_or_fail(args)
    predictor = SamPredictor(load_model_or_fail(args, args.device), to_uint8=to_uint8)
    result = segment_text(image, phrases, predictor=predictor, detector=detector)
    if len(result) == 0:
        raise _nothing_found(phrases, f"in {args.volume}", detector)
    labels = range(args.label, args.label + len(result))
    if labels[-1] > 65535:
        raise CommandError(f"{len(result)} objects from --label {args.label} pass 65535")
    empty = np.zeros(image.shape[:2], dtype=np.uint16)
    merged = merge_masks(empty, dict(zip(labels, result.masks)), mode=args.mode)
    for label, box, phrase, score in zip(labels, result.boxes, result.phrases, result.scores):
        area = int(np.count_nonzero(merged == label))
        print(f"object {label}: {phrase} score {score:.3f} box {_box_text(box)}, {area} pixels")
    write_labels_image(merged, out)
    print(f"wrote {out}")
    return 0


def write_labels_image(labels: np.ndarray, path: Path) -> None:
    """Write a 2-D labels image (uint8 when it fits) beside, then over, ``path``."""
    data = labels.astype(np.uint8) if labels.max() <= 255 else labels.astype(np.uint16)
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if suffix == ".npy":
            np.save(f, data, allow_pickle=False)
        elif suffix == ".png":
            from PIL import Image

            Image.fromarray(data).save(f, format="PNG")
        else:
            import tifffile

            tifffile.imwrite(f, data)

"""``napari-sam amg``: segment everything in images (or NIfTI slices) into mask files.

The outputs are those of segment_anything's ``scripts/amg.py``::

    napari-sam amg photo.png -o masks/ --model vit_b
        masks/photo/0.png, 1.png, ... (0/255 masks) and masks/photo/metadata.csv
    napari-sam amg images/ -o masks/ --convert-to-rle
        masks/<name>.json per image: the mask records with COCO RLE segmentations
    napari-sam amg ct.nii.gz --slice 40 -o masks/ --window soft_tissue
        masks/ct_slice40/...: one slice of a volume (display orientation, as napari shows it)

Images may have any dtype and channel count (PNG, JPEG, TIFF, NumPy .npy, NIfTI): 8-bit RGB is
used as is; other images are mapped to 0..255 by their min and max, or by ``--window``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_sam.commands._options import (
    add_axis_option,
    add_device_option,
    add_model_options,
    add_precision_option,
    add_window_option,
    load_model_or_fail,
    window_from_args,
)

__all__ = ["add_parser", "image_stem", "read_image", "run", "write_masks_to_folder"]

# The AMG settings, as (option, type, help); each maps to the generator's keyword of that name.
AMG_SETTINGS = [
    ("--points-per-side", int, "prompt grid: this many points along each side (default 32)"),
    ("--points-per-batch", int, "prompts decoded together (default 64)"),
    ("--pred-iou-thresh", float, "drop masks whose predicted IoU is at most this (default 0.88)"),
    ("--stability-score-thresh", float, "drop masks less stable than this (default 0.95)"),
    ("--stability-score-offset", float, "logit offset of the stability score (default 1.0)"),
    ("--box-nms-thresh", float, "box IoU above which duplicates are dropped (default 0.7)"),
    ("--crop-n-layers", int, "also run on 4, 16, ... crops for this many layers (default 0)"),
    ("--crop-nms-thresh", float, "box IoU for duplicates across crops (default 0.7)"),
    ("--crop-overlap-ratio", float, "overlap of first-layer crops (default 512/1500)"),
    ("--crop-n-points-downscale-factor", int, "fewer points per side in deeper crop layers"),
    ("--min-mask-region-area", int, "fill holes and drop islands smaller than this (pixels)"),
]

METADATA_HEADER = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "amg",
        help="segment everything in images or NIfTI slices (automatic mask generation)",
        description=(
            "Run automatic mask generation on an image or on every image of a folder and write "
            "a folder of PNG masks with metadata.csv per image, or COCO RLE JSON "
            "(--convert-to-rle), as segment_anything's amg script does."
        ),
    )
    p.add_argument("input", type=Path, help="an image, a NIfTI volume or a folder of them")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    add_model_options(p)
    add_device_option(p)
    add_precision_option(p)
    p.add_argument(
        "--convert-to-rle",
        action="store_true",
        help="write one JSON of COCO RLE masks per image instead of a folder of PNGs",
    )
    p.add_argument("--slice", type=int, dest="slice_index", metavar="Z", help="NIfTI: slice index")
    add_axis_option(p, what="NIfTI: slicing axis")
    add_window_option(
        p, default=None, default_text="auto for NIfTI, min-max for other non-8-bit images"
    )
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    group = p.add_argument_group("AMG settings (default: segment_anything's)")
    for option, kind, text in AMG_SETTINGS:
        group.add_argument(option, type=kind, default=None, help=text)
    p.set_defaults(func=run)


def amg_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The AMG settings given on the command line, as generator keywords."""
    names = [option[2:].replace("-", "_") for option, _, _ in AMG_SETTINGS]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


# -- reading ----------------------------------------------------------------------------------


def image_stem(path: Path) -> str:
    """The name outputs of an input are called by: ``ct.nii.gz`` -> ``ct``, ``a.png`` -> ``a``."""
    from napari_sam.io.nifti import is_nifti_path, nifti_stem

    return nifti_stem(path) if is_nifti_path(path) else path.stem


def _channels_last(image: np.ndarray) -> np.ndarray:
    # TIFF and NumPy files often store channels first.
    if image.ndim == 3 and image.shape[-1] not in (1, 3, 4) and image.shape[0] in (1, 3, 4):
        return np.moveaxis(image, 0, -1)
    return image


def read_image(
    path: Path, slice_index: int | None = None, axis: int = 0, window: Any = None
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray], str]:
    """Read one input into ``(image, to_uint8, name)``.

    ``window`` is anything :func:`~napari_sam.intensity.resolve_window` reads (a Window, a mode
    name, ``"LOW,HIGH"``) or None: NIfTI then uses ``"auto"`` over the
    whole volume, other images their own min and max (8-bit RGB unchanged).

    Raises
    ------
    ValueError
        When the file is not a readable image, or a volume is given without a slice.
    """
    from napari_sam.intensity import Window, resolve_window, to_rgb_uint8

    def window_for(data: np.ndarray) -> Window:
        return resolve_window(data, window or "auto")

    from napari_sam.io.nifti import is_nifti_path

    if is_nifti_path(path):
        from napari_sam.io.nifti import read_nifti

        volume = read_nifti(path)
        data = volume.data
        spatial = data.ndim - (1 if volume.rgb else 0)
        name = image_stem(path)
        if spatial == 3:
            if slice_index is None:
                raise ValueError(f"{path} is a volume: choose a slice with --slice Z")
            n = data.shape[axis]
            if not 0 <= slice_index < n:
                raise ValueError(
                    f"--slice {slice_index} is outside {path}: axis {axis} has {n} slices "
                    f"(0..{n - 1})"
                )
            win = window_for(data)
            image = np.take(data, slice_index, axis=axis)
            name = f"{name}_slice{slice_index}"
        elif spatial == 2:
            image = data
            win = window_for(data)
        else:
            raise ValueError(f"{path} holds a {spatial}D image; amg needs a 2D image or 3D volume")
        return image, lambda img: to_rgb_uint8(img, win), name

    suffix = path.suffix.lower()
    if suffix == ".npy":
        image = np.load(path, allow_pickle=False)
    elif suffix in (".tif", ".tiff"):
        import tifffile

        image = tifffile.imread(path)
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as pil:
                if pil.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                    pil = pil.convert("RGBA" if "A" in pil.mode else "RGB")
                elif pil.mode == "LA":
                    pil = pil.convert("L")
                elif pil.mode == "1":
                    pil = pil.convert("L")
                image = np.asarray(pil)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read {path} as an image: {exc}") from None
    image = _channels_last(np.asarray(image))
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"{path} has shape {image.shape}: expected a 2-D image with 1, 3 or 4 channels"
        )
    if window is None:
        return image, to_rgb_uint8, image_stem(path)
    win = window_for(image)
    return image, lambda img: to_rgb_uint8(img, win), image_stem(path)


def _targets(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not path.exists():
        from napari_sam.cli import CommandError

        raise CommandError(f"input {path} does not exist")
    return [path]


# -- writing ----------------------------------------------------------------------------------


def write_masks_to_folder(records: list[dict[str, Any]], folder: Path) -> None:
    """Write ``{i}.png`` (0/255) per mask and ``metadata.csv`` as the reference script does."""
    from PIL import Image

    rows = [METADATA_HEADER]
    for i, record in enumerate(records):
        mask = np.asarray(record["segmentation"], dtype=np.uint8) * np.uint8(255)
        Image.fromarray(mask).save(folder / f"{i}.png")
        values = [
            i,
            record["area"],
            *record["bbox"],
            *record["point_coords"][0],
            record["predicted_iou"],
            record["stability_score"],
            *record["crop_box"],
        ]
        rows.append(",".join(str(v) for v in values))
    (folder / "metadata.csv").write_text("\n".join(rows))


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished output into place; an old one is removed only after the move."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    os.replace(tmp, final)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def _write_outputs(records: list[dict[str, Any]], out_dir: Path, name: str, rle: bool) -> Path:
    """Write into a temporary name beside the final one, then move it into place."""
    final = out_dir / (f"{name}.json" if rle else name)
    tmp = out_dir / f".{final.name}.tmp-{secrets.token_hex(4)}"
    try:
        if rle:
            # O_EXCL: never clobber another file; the mode follows the user's umask.
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as f:
                json.dump(records, f)
        else:
            tmp.mkdir(mode=0o777)
            write_masks_to_folder(records, tmp)
        _publish(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return final


# -- command ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from napari_sam.automatic import SamAutomaticMaskGenerator
    from napari_sam.cli import CommandError

    targets = _targets(args.input)
    kwargs = amg_kwargs(args)
    output_mode = "coco_rle" if args.convert_to_rle else "binary_mask"
    window = window_from_args(args)

    if args.output.exists() and not args.output.is_dir():
        raise CommandError(f"output {args.output} exists and is not a folder")
    args.output.mkdir(parents=True, exist_ok=True)

    model = load_model_or_fail(args, args.device)
    try:
        SamAutomaticMaskGenerator(model, output_mode=output_mode, **kwargs)
    except ValueError as exc:
        raise CommandError(str(exc)) from None

    written = 0
    for path in targets:
        try:
            image, to_uint8, name = read_image(path, args.slice_index, args.axis, window)
        except ValueError as exc:
            if len(targets) == 1:
                raise CommandError(str(exc)) from None
            print(f"skipping {path}: {exc}")
            continue
        final = args.output / (f"{name}.json" if args.convert_to_rle else name)
        if final.exists() and not args.force:
            raise CommandError(f"output {final} exists; pass --force to replace it")
        generator = SamAutomaticMaskGenerator(
            model, output_mode=output_mode, to_uint8=to_uint8, **kwargs
        )
        try:
            records = _generate(generator, image, path.name, args.quiet)
        except ValueError as exc:
            raise CommandError(f"{path}: {exc}") from None
        out = _write_outputs(records, args.output, name, args.convert_to_rle)
        print(f"{path}: {len(records)} masks -> {out}")
        written += 1
    if written == 0:
        raise CommandError(f"no image could be read from {args.input}")
    return 0


def _generate(generator, image: np.ndarray, label: str, quiet: bool) -> list[dict[str, Any]]:
    steps = generator.iter_generate(image)
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(desc=label, unit="step")
    try:
        while True:
            try:
                progress = next(steps)
            except StopIteration as done:
                return done.value
            if bar is not None:
                bar.total = progress.total
                bar.update(progress.done - bar.n)
    finally:
        if bar is not None:
            bar.close()

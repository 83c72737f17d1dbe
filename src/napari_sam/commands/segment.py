"""``napari-sam segment``: segment objects in a NIfTI volume from prompts, propagate, save labels.

Prompts on the command line describe one object on one slice::

    napari-sam segment ct.nii.gz --slice 40 --box 120 80 220 190 --model vit_b -o liver.nii.gz
    napari-sam segment mr.nii.gz --slice 90 --point 100 120 --negative 60 60 -o roi.nii.gz

Several objects or several slices per object come from a JSON file (``--prompts``)::

    {
      "objects": [
        {"label": 1, "name": "liver",
         "prompts": [{"slice": 40, "box": [120, 80, 220, 190]},
                     {"slice": 70, "points": [[150, 130]], "negative": [[90, 60]]},
                     {"slice": 95, "absent": true}]},
        {"label": 2, "prompts": [{"slice": 52, "points": [[60, 140], [66, 150]]}]}
      ]
    }

``label`` is the object's value in the output (1..65535, unique), ``name`` is free text. Each
prompt has a ``slice`` and at least one of ``box`` ``[x0, y0, x1, y1]``, ``points`` and
``negative`` (lists of ``[x, y]``), or ``"absent": true`` (the object is not on that slice:
propagation stops there). A top-level list is read as the ``objects`` list.

Coordinates are voxel indices in the display orientation of napari-sam's NIfTI reader
(``docs/nifti.md``: array axes towards inferior, posterior, left). For ``--axis 0`` the slice is
``volume[z]`` (axial), ``x`` its column and ``y`` its row: the last two numbers of a voxel
position in napari's status bar. For another ``--axis`` the slice is the volume with that axis
removed; ``x`` runs along the later remaining axis, ``y`` along the earlier.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_sam.commands import _text
from napari_sam.commands._options import (
    add_axis_option,
    add_device_option,
    add_embedding_store_options,
    add_model_options,
    add_precision_option,
    add_window_option,
    parse_slices,
    window_from_args,
)
from napari_sam.prompts import Prompts

__all__ = [
    "ObjectPrompts",
    "SlicePrompt",
    "add_parser",
    "add_session_options",
    "load_prompts",
    "run",
]


@dataclass
class SlicePrompt:
    """One object's prompts on one slice of the volume, or the mark that it is absent there."""

    slice: int
    prompts: Prompts = field(default_factory=Prompts)
    absent: bool = False


@dataclass
class ObjectPrompts:
    label: int
    prompts: list[SlicePrompt]
    name: str = ""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment objects in a NIfTI volume from a box or points, propagate, save labels",
        description=(
            "Segment one object from a box or points on one slice (or several objects from a "
            "prompts JSON file), follow it through the volume slice by slice, and save the "
            "labels as NIfTI in the volume's exact geometry. Coordinates are (x, y) voxel "
            "indices of the slice in napari-sam's display orientation; see the format and "
            "conventions in docs/scripting.md."
        ),
    )
    p.add_argument(
        "volume", type=Path, help="the volume, .nii or .nii.gz (with --text also a 2-D image)"
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="labels file to write")
    p.add_argument("--slice", type=int, dest="slice_index", metavar="Z", help="slice of the prompt")
    p.add_argument(
        "--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="box prompt"
    )
    for flag, kind in (("--point", "foreground"), ("--negative", "background")):
        p.add_argument(
            flag,
            type=float,
            nargs=2,
            action="append",
            metavar=("X", "Y"),
            help=f"{kind} point (repeat for more)",
        )
    p.add_argument("--prompts", type=Path, help="JSON file with objects and prompts")
    p.add_argument("--label", type=int, default=1, help="label value of the object (default: 1)")
    add_session_options(p)
    p.add_argument("--no-propagate", action="store_true", help="segment the prompted slices only")
    p.add_argument(
        "--slices",
        metavar="A:B",
        help="propagate only within slices A <= i < B (default: the whole axis)",
    )
    p.add_argument(
        "--mode",
        choices=("keep", "overwrite"),
        default="keep",
        help="where objects overlap: keep the earlier object (default) or overwrite it",
    )
    p.add_argument(
        "--min-iou-prev",
        type=float,
        default=0.5,
        help="stop an object when its IoU with the previous slice falls below this (default: 0.5)",
    )
    p.add_argument(
        "--min-pred-iou",
        type=float,
        default=0.5,
        help="stop an object when the model's predicted IoU falls below this (default: 0.5)",
    )
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _text.add_text_arguments(p)
    p.set_defaults(func=run)


def add_session_options(p: argparse.ArgumentParser) -> None:
    """Add the options of a :class:`~napari_sam.volume.session.VolumeSession`.

    Model, window, axis, embedding store, device and precision (``segment``, ``embed``).
    """
    add_model_options(p)
    add_window_option(p)
    add_axis_option(p)
    add_embedding_store_options(p)
    add_device_option(p)
    add_precision_option(p)


def load_prompts(path: Path) -> list[ObjectPrompts]:
    """Read and check a prompts JSON file (format in the module docstring)."""
    from napari_sam.cli import CommandError

    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CommandError(f"prompts file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read prompts file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CommandError(f"prompts file {path} is not valid JSON: {exc}") from None
    return parse_prompts(doc, source=str(path))


def parse_prompts(doc: Any, source: str = "prompts") -> list[ObjectPrompts]:
    """Check a prompts document (already parsed JSON) and return its objects."""
    from napari_sam.cli import CommandError

    def fail(where: str, what: str) -> CommandError:
        return CommandError(f"{source}: {where}: {what}")

    objects = doc.get("objects") if isinstance(doc, dict) else doc
    if not isinstance(objects, list) or not objects:
        raise fail("top level", 'expected {"objects": [...]} with at least one object')
    result: list[ObjectPrompts] = []
    for i, obj in enumerate(objects):
        where = f"objects[{i}]"
        if not isinstance(obj, dict):
            raise fail(where, "expected an object with 'label' and 'prompts'")
        unknown = set(obj) - {"label", "name", "prompts"}
        if unknown:
            raise fail(where, f"unknown keys {sorted(unknown)}")
        label = obj.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 1 <= label <= 65535:
            raise fail(where, f"'label' must be an integer 1..65535, got {label!r}")
        if any(o.label == label for o in result):
            raise fail(where, f"label {label} is used by two objects")
        prompts = obj.get("prompts")
        if not isinstance(prompts, list) or not prompts:
            raise fail(where, "'prompts' must be a non-empty list")
        parsed = [
            _parse_slice_prompt(p, f"{where}.prompts[{j}]", fail) for j, p in enumerate(prompts)
        ]
        if all(p.absent for p in parsed):
            raise fail(where, "every prompt is 'absent': give at least one box or point")
        result.append(ObjectPrompts(label, parsed, str(obj.get("name", ""))))
    return result


def _parse_slice_prompt(p: Any, where: str, fail) -> SlicePrompt:
    if not isinstance(p, dict):
        raise fail(where, "expected an object with 'slice' and prompts")
    unknown = set(p) - {"slice", "box", "points", "negative", "absent"}
    if unknown:
        raise fail(where, f"unknown keys {sorted(unknown)}")
    index = p.get("slice")
    if isinstance(index, bool) or not isinstance(index, int):
        raise fail(where, f"'slice' must be an integer, got {index!r}")
    absent = bool(p.get("absent", False))
    box = _numbers(p["box"], 4, f"{where}.box", fail) if "box" in p else None
    clicks = {}
    for key in ("points", "negative"):
        value = p.get(key, [])
        if not isinstance(value, list):
            raise fail(f"{where}.{key}", "expected a list of [x, y]")
        clicks[key] = [_numbers(v, 2, f"{where}.{key}", fail) for v in value]
    prompts = Prompts.from_clicks(clicks["points"], clicks["negative"], box)
    if absent and not prompts.empty:
        raise fail(where, "'absent' cannot be combined with a box or points")
    if not absent and prompts.empty:
        raise fail(where, "give a 'box', 'points' or 'negative' (or 'absent': true)")
    return SlicePrompt(index, prompts, absent)


def _numbers(value: Any, n: int, where: str, fail) -> list[float]:
    if (
        not isinstance(value, list)
        or len(value) != n
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        or not np.isfinite(value).all()
    ):
        raise fail(where, f"expected {n} numbers, got {value!r}")
    return [float(v) for v in value]


def check_prompt(prompt: SlicePrompt, num_slices: int, slice_shape: tuple[int, int], what: str):
    """Raise CommandError when a prompt lies outside the volume or is malformed."""
    from napari_sam.cli import CommandError

    h, w = slice_shape
    prompts = prompt.prompts
    if not 0 <= prompt.slice < num_slices:
        raise CommandError(
            f"{what}: slice {prompt.slice} is outside the volume: the axis has {num_slices} "
            f"slices (0..{num_slices - 1})"
        )
    for x, y in prompts.points:
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            raise CommandError(
                f"{what}: point ({x:g}, {y:g}) is outside slice {prompt.slice} "
                f"(x 0..{w - 1}, y 0..{h - 1})"
            )
    if prompts.box is not None:
        box = prompts.box.tolist()
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            raise CommandError(f"{what}: box {box} needs X0 < X1 and Y0 < Y1")
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise CommandError(
                f"{what}: box {box} reaches outside slice {prompt.slice} (x 0..{w}, y 0..{h})"
            )


def _inline_prompts(args: argparse.Namespace) -> list[ObjectPrompts]:
    from napari_sam.cli import CommandError

    inline = args.box is not None or args.point or args.negative
    if args.prompts is not None:
        if inline or args.slice_index is not None:
            raise CommandError("give either --prompts FILE or --slice with --box/--point, not both")
        return load_prompts(args.prompts)
    if not inline:
        raise CommandError(
            "no prompt: give --slice Z with --box X0 Y0 X1 Y1 and/or --point X Y "
            "(--negative X Y), or --prompts FILE"
        )
    if args.slice_index is None:
        raise CommandError("--box/--point need --slice Z (the slice they are on)")
    if not 1 <= args.label <= 65535:
        raise CommandError(f"--label must be 1..65535, got {args.label}")
    prompts = Prompts.from_clicks(args.point or [], args.negative or [], args.box)
    if not (prompts.labels == 1).any() and prompts.box is None:
        raise CommandError("--negative alone cannot select an object: add --point or --box")
    return [ObjectPrompts(args.label, [SlicePrompt(args.slice_index, prompts)])]


def open_session(args: argparse.Namespace, volume: Any):
    """A VolumeSession from the shared model/window/cache options; user errors -> CommandError."""
    from napari_sam.cli import CommandError
    from napari_sam.volume.embeddings import default_cache_dir
    from napari_sam.volume.session import VolumeSession

    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    try:
        return VolumeSession(
            volume,
            args.model,
            checkpoint=args.checkpoint,
            window=window_from_args(args),
            axis=args.axis,
            cache_dir=cache_dir,
            device=args.device,
            precision=args.precision,
        )
    except CommandError:
        raise
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise CommandError(str(exc)) from None


def read_volume(path: Path):
    from napari_sam.cli import CommandError
    from napari_sam.io.nifti import is_nifti_path, read_nifti

    if not path.exists():
        raise CommandError(f"volume {path} does not exist")
    if not is_nifti_path(path):
        raise CommandError(f"volume {path} is not a NIfTI file (.nii or .nii.gz)")
    try:
        volume = read_nifti(path)
    except ValueError as exc:
        raise CommandError(f"cannot read {path}: {exc}") from None
    spatial = volume.data.ndim - (1 if volume.rgb else 0)
    if spatial != 3:
        raise CommandError(
            f"{path} holds a {spatial}D image; segment needs a 3D volume "
            "(for one volume of a 4D series, extract it first)"
        )
    return volume


def _check_output(path: Path, force: bool) -> None:
    from napari_sam.cli import CommandError
    from napari_sam.io.nifti import is_nifti_path

    if not is_nifti_path(path):
        raise CommandError(f"output {path} must end in .nii or .nii.gz")
    if not path.parent.is_dir():
        raise CommandError(f"output folder {path.parent} does not exist")
    if path.exists() and not force:
        raise CommandError(f"output {path} exists; pass --force to replace it")


def run(args: argparse.Namespace) -> int:
    from napari_sam.cli import CommandError

    text = args.text is not None
    if text:
        phrases = _text.check_text_args(args)
        if _text.is_image_input(args.volume):
            return _text.run_image(args, phrases)
        if args.slice_index is None:
            raise CommandError("--text on a volume needs --slice Z (the slice the detector reads)")
    objects = [] if text else _inline_prompts(args)
    _check_output(args.output, args.force)
    volume = read_volume(args.volume)
    num_slices = volume.data.shape[args.axis]
    slice_shape = tuple(s for i, s in enumerate(volume.data.shape[:3]) if i != args.axis)
    for obj in objects:
        for prompt in obj.prompts:
            check_prompt(prompt, num_slices, slice_shape, f"object {obj.label}")
    slice_range = parse_slices(args.slices, num_slices)
    say = _printer(args.quiet)

    detector = _text.load_detector_or_fail(args) if text else None
    start = time.perf_counter()
    with open_session(args, volume) as session:
        if text:
            objects = _text.detect_objects(args, session, detector, phrases)
        for obj in list(objects):
            for prompt in obj.prompts:
                if prompt.absent:
                    session.mark_absent(obj.label, prompt.slice)
                    continue
                say(f"object {obj.label}: segmenting slice {prompt.slice}")
                mask = session.segment_slice(
                    prompt.slice, label_id=obj.label, mode=args.mode, **_sam_prompt(prompt.prompts)
                )
                if not mask.any() and text:
                    print(f"object {obj.label}: SAM found nothing in its box; skipped")
                    session.remove_object(obj.label)
                    objects.remove(obj)
                elif not mask.any():
                    raise CommandError(
                        f"object {obj.label}: the model found nothing on slice {prompt.slice} "
                        "for these prompts; check the coordinates (x = column, y = row) "
                        "and the slice"
                    )
        if not args.no_propagate:
            summary = session.propagate(
                mode=args.mode,
                progress=not args.quiet,
                slice_range=slice_range,
                min_iou_prev=args.min_iou_prev,
                min_pred_iou=args.min_pred_iou,
            )
            for label, (lo, hi) in sorted(summary.extent.items()):
                say(f"object {label}: propagated over slices {lo}..{hi}")
        labels = session.labels
        for obj in objects:
            say(f"object {obj.label}: {int(np.count_nonzero(labels == obj.label))} voxels")
        path = session.save(args.output)
    print(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return 0


def _sam_prompt(prompts: Prompts) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"box": prompts.box, "multimask": prompts.ambiguous}
    if len(prompts.points):
        kwargs["points"] = prompts.points
        kwargs["point_labels"] = prompts.labels
    return kwargs


def _printer(quiet: bool):
    import sys

    def say(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr)

    return say

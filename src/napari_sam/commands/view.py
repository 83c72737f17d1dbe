"""``napari-sam view``: open napari with the Segment Anything widget (and a file or sample)."""

from __future__ import annotations

import argparse
from pathlib import Path

SAMPLES = ("mni152_t1", "ct_phantom")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "view",
        help="open napari with the Segment Anything widget",
        description=(
            "Open napari with the Segment Anything dock widget. Give a NIfTI file or image to "
            "open it with its geometry, or --sample for a bundled volume."
        ),
    )
    p.add_argument("path", nargs="?", type=Path, help="a .nii/.nii.gz volume or an image file")
    p.add_argument("--sample", choices=SAMPLES, help="open a bundled sample volume instead")
    p.add_argument(
        "--no-run",
        action="store_true",
        help="set everything up but do not start the event loop (for scripted checks)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_sam.cli import CommandError

    if args.path is not None and not args.path.exists():
        raise CommandError(f"{args.path} does not exist")
    import napari

    from napari_sam.io.nifti import is_nifti_path

    viewer = napari.Viewer(title="napari-sam-volumes")
    if args.sample:
        viewer.open_sample("napari-sam-volumes", args.sample)
    elif args.path is not None:
        plugin = "napari-sam-volumes" if is_nifti_path(args.path) else None
        viewer.open(args.path, plugin=plugin)
    viewer.window.add_plugin_dock_widget("napari-sam-volumes", "Segment Anything")
    if not args.no_run:
        napari.run()
    else:
        viewer.close()
    return 0

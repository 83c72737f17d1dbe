"""The ``napari-sam`` command: one subcommand per module in :mod:`napari_sam.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module defines ``add_parser(subparsers)`` which registers one subcommand and sets
# ``func(args) -> int`` as its default. Imported lazily so ``--help`` stays fast.
COMMANDS = [
    "napari_sam.commands.models",
    "napari_sam.commands.view",
    "napari_sam.commands.segment",
    "napari_sam.commands.embed",
    "napari_sam.commands.train",
    "napari_sam.commands.amg",
    "napari_sam.commands.export_onnx",
    "napari_sam.commands.batch",
]


class CommandError(Exception):
    """A user error: printed as one clear line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The ``napari-sam`` argument parser with every command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="napari-sam",
        description=(
            "Segment Anything for CT/MRI volumes and images: segment with prompts, propagate "
            "through volumes, precompute embeddings, segment everything, fine-tune, export."
        ),
    )
    from napari_sam import __version__

    parser.add_argument("--version", action="version", version=f"napari-sam {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``napari-sam`` with ``argv`` (default: the process's arguments); the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"napari-sam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-sam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

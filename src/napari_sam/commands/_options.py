"""The options several commands share, declared once so they read and behave the same everywhere.

Each ``add_*`` function adds one option group to a subcommand's parser; the matching
``*_from_args`` helpers turn the parsed values into engine objects, with user errors as
one-line :class:`~napari_sam.cli.CommandError` messages. Building a parser imports neither torch
nor the engine, so ``napari-sam --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = [
    "PRECISION_CHOICES",
    "add_axis_option",
    "add_device_option",
    "add_embedding_store_options",
    "add_model_options",
    "add_precision_option",
    "add_window_option",
    "load_model_or_fail",
    "parse_slices",
    "window_from_args",
]

# napari_sam.speed.INFERENCE_PRECISIONS, spelled out so that building the parser (and --help)
# does not import torch; a test keeps the two equal.
PRECISION_CHOICES = ("auto", "exact", "fp32", "int8", "bf16")

WINDOW_HELP = (
    "intensity window: auto, a CT preset (soft_tissue, lung, bone, brain, mediastinum, liver), "
    "percentile, minmax, or LOW,HIGH"
)


def add_model_options(
    p: argparse.ArgumentParser | argparse._ActionsContainer,
    *,
    default: str | None = "vit_b",
    checkpoint_parser: argparse.ArgumentParser | None = None,
) -> None:
    """``--model`` (alias ``--model-type``, as segment_anything's scripts) and ``--checkpoint``.

    ``p`` may be a mutually exclusive group (``train``: ``--model`` or ``--config``); then
    ``checkpoint_parser`` is the parser that takes ``--checkpoint``.
    """
    default_text = f" (default: {default})" if default else ""
    p.add_argument(
        "--model",
        "--model-type",
        dest="model",
        default=default,
        help=f"registered model name or a checkpoint file{default_text}",
    )
    (checkpoint_parser or p).add_argument(
        "--checkpoint", type=Path, help="weights file for the named model (instead of the cache)"
    )


def add_device_option(p: argparse.ArgumentParser, *, default: str = "auto") -> None:
    """``--device``: where the model runs."""
    choices = ["auto", "cpu", "cuda", "cuda:1", "mps"]
    choices.remove(default)
    p.add_argument("--device", default=default, help=f"{default} (default), {', '.join(choices)}")


def add_precision_option(p: argparse.ArgumentParser) -> None:
    """``--precision``: the fast path by default, ``exact`` for Meta's numbers."""
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISION_CHOICES,
        help="auto (default): the fastest path that keeps the exact masks; exact: the model as "
        "Meta's code runs it; int8: quantised encoder, faster on CPUs, approximate; fp32, bf16",
    )


def add_window_option(
    p: argparse.ArgumentParser, *, default: str | None = "auto", default_text: str = "auto"
) -> None:
    """``--window``, read by :func:`napari_sam.intensity.parse_window`.

    See :func:`window_from_args` for what the value becomes.
    """
    p.add_argument("--window", default=default, help=f"{WINDOW_HELP} (default: {default_text})")


def add_axis_option(p: argparse.ArgumentParser, *, what: str = "slicing axis") -> None:
    """``--axis``: the array axis slices are taken along (0: axial in display orientation)."""
    p.add_argument("--axis", type=int, default=0, choices=(0, 1, 2), help=f"{what} (default: 0)")


def add_embedding_store_options(p: argparse.ArgumentParser) -> None:
    """``--cache-dir`` and ``--no-cache``: where slice embeddings are kept on disk."""
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="embedding store folder (default: $NAPARI_SAM_EMBEDDINGS or the cache folder)",
    )
    p.add_argument("--no-cache", action="store_true", help="keep embeddings in memory only")


def window_from_args(args: argparse.Namespace) -> Any:
    """Read ``args.window`` with :func:`napari_sam.intensity.parse_window`.

    Returns
    -------
    Window, str or None
        A Window for ``LOW,HIGH``, the checked mode name otherwise, None when not given.
    """
    from napari_sam.cli import CommandError
    from napari_sam.intensity import parse_window

    if args.window is None:
        return None
    try:
        return parse_window(args.window)
    except ValueError as exc:
        raise CommandError(f"--window: {exc}") from None


def load_model_or_fail(args: argparse.Namespace, device: str) -> Any:
    """Load ``args.model`` (and ``args.checkpoint``) on ``device``, or fail as a CommandError.

    :func:`~napari_sam.weights.load_model`, at ``args.precision`` when the command has that
    option; user errors become one-line :class:`~napari_sam.cli.CommandError` messages.
    """
    from napari_sam.cli import CommandError
    from napari_sam.speed import with_precision
    from napari_sam.weights import WeightsUnavailableError, load_model

    try:
        model = load_model(args.model, checkpoint=args.checkpoint, device=device)
        return with_precision(model, getattr(args, "precision", "exact"))
    except (ValueError, FileNotFoundError, WeightsUnavailableError) as exc:
        raise CommandError(str(exc)) from None


def parse_slices(text: str | None, num_slices: int) -> tuple[int, int] | None:
    """``--slices``: ``"A:B"``, ``"A:"``, ``":B"`` or ``"A"`` -> half-open ``(start, stop)``.

    Slice ranges are half-open everywhere in this package, as Python's ``range(start,
    stop)``: ``"4:9"`` is slices 4..8, ``"4"`` is slice 4 alone. Checked against the axis.
    """
    from napari_sam.cli import CommandError

    if text is None:
        return None
    parts = text.split(":")
    try:
        if len(parts) == 1:
            start = int(parts[0])
            stop = start + 1
        elif len(parts) == 2:
            start = int(parts[0]) if parts[0] else 0
            stop = int(parts[1]) if parts[1] else num_slices
        else:
            raise ValueError
    except ValueError:
        raise CommandError(f"--slices {text!r}: expected A:B, A:, :B or A (integers)") from None
    if not 0 <= start < stop <= num_slices:
        raise CommandError(
            f"--slices {text!r} selects no valid slice: the axis has {num_slices} slices "
            f"(0..{num_slices - 1})"
        )
    return start, stop

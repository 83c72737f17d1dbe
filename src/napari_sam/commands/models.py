"""``napari-sam models``: list the registered models, download their weights, show paths."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from napari_sam.registry import ModelSpec


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``napari-sam models`` on the CLI's ``subparsers``."""
    p = subparsers.add_parser(
        "models",
        help="list models, download weights, show where weights go",
        description=(
            "Without an action: list the registered models with their size, licence and whether "
            "their weights are in the cache folder (set NAPARI_SAM_CACHE to move it)."
        ),
    )
    p.set_defaults(func=run_list)
    actions = p.add_subparsers(dest="action", metavar="ACTION")

    listing = actions.add_parser("list", help="list the registered models (the default)")
    listing.set_defaults(func=run_list)

    dl = actions.add_parser(
        "download",
        help="download a model's weights into the cache folder (checksum verified)",
        description=(
            "Download a model's weights into the cache folder with a progress bar. The file is "
            "verified (size, SHA-256) before it appears under its final name."
        ),
    )
    dl.add_argument("name", help="registered model name, e.g. vit_b")
    dl.add_argument(
        "--base-url",
        help="mirror folder that holds the file under its registry name "
        "(default: $NAPARI_SAM_BASE_URL, else the official URL)",
    )
    dl.add_argument("--force", action="store_true", help="download again even if cached")
    dl.set_defaults(func=run_download)

    path = actions.add_parser(
        "path", help="print the path where a model's weights file goes in the cache"
    )
    path.add_argument("name", help="registered model name, e.g. medsam_vit_b")
    path.set_defaults(func=run_path)

    inspect = actions.add_parser(
        "inspect", help="tell which model a checkpoint file holds (read safely, no code runs)"
    )
    inspect.add_argument("file", type=Path, help="a .pth / .pt / .safetensors checkpoint")
    inspect.set_defaults(func=run_inspect)


def _spec(name: str) -> ModelSpec:
    from napari_sam.cli import CommandError
    from napari_sam.registry import get_spec

    try:
        return get_spec(name)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def format_size(size_bytes: int | None) -> str:
    """Decimal units, as download pages quote them: ``375_042_383`` -> ``"375 MB"``."""
    if size_bytes is None:
        return "?"
    size = float(size_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if size >= 10 or unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def run_list(args: argparse.Namespace) -> int:
    """Run ``napari-sam models list`` with the parsed ``args``; return the exit status."""
    from napari_sam.registry import DEFAULT_MODEL, MODELS
    from napari_sam.weights import cache_dir, cached_path

    print(f"Model cache folder: {cache_dir()}  (set NAPARI_SAM_CACHE to move it)\n")
    rows = [("NAME", "SIZE", "LICENCE", "STATUS")]
    descriptions = []
    for spec in MODELS.values():
        found = cached_path(spec)
        status = f"cached: {found}" if found else "not cached"
        name = spec.name + (" (default)" if spec.name == DEFAULT_MODEL else "")
        rows.append((name, format_size(spec.size_bytes), spec.license, status))
        text = spec.description
        if spec.hub_repo:
            text += (
                f" From the Hugging Face Hub: {spec.hub_repo} @ {(spec.hub_revision or '')[:12]}."
            )
            if spec.homepage:
                text += f" Project page: {spec.homepage}."
        elif spec.url is None and spec.homepage:
            text += f" No stable URL: get the file from {spec.homepage}."
        descriptions.append(text)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
        if i:
            for line in textwrap.wrap(descriptions[i - 1], width=92, break_on_hyphens=False):
                print("    " + line)
    print(
        "\nDownload: napari-sam models download NAME.  A file you obtained yourself: put it at "
        "the path from `napari-sam models path NAME`, or pass its path to load_model(path)."
    )
    return 0


def run_download(args: argparse.Namespace) -> int:
    """Run ``napari-sam models download`` with the parsed ``args``; return the exit status."""
    from napari_sam.cli import CommandError
    from napari_sam.weights import (
        ChecksumError,
        WeightsUnavailableError,
        cached_path,
        download,
        sha256_file,
    )

    spec = _spec(args.name)
    found = cached_path(spec)
    if found and not args.force:
        print(f"{spec.name} is already cached: {found}")
        return 0
    try:
        path = download(spec, progress=True, base_url=args.base_url)
    except (WeightsUnavailableError, ChecksumError) as exc:
        raise CommandError(str(exc)) from None
    digest = spec.sha256 or sha256_file(path)
    print(f"{spec.name}: {path}\nsha256 {digest}")
    return 0


def run_path(args: argparse.Namespace) -> int:
    """Run ``napari-sam models path`` with the parsed ``args``; return the exit status."""
    from napari_sam.cli import CommandError
    from napari_sam.weights import destination

    try:
        print(destination(_spec(args.name)))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Run ``napari-sam models inspect`` with the parsed ``args``; return the exit status."""
    from napari_sam.cli import CommandError
    from napari_sam.weights import detect_spec, read_state_dict

    try:
        state, embedded = read_state_dict(args.file)
        spec = embedded if embedded is not None else detect_spec(state)
    except (OSError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    source = "embedded spec" if embedded is not None else "tensor shapes"
    n_params = sum(t.numel() for t in state.values())
    print(
        f"{args.file}: {spec.name} (from the {source}), {n_params:,} values in {len(state)} tensors"
    )
    print(f"encoder {spec.encoder} {dict(spec.encoder_kwargs)}, image_size {spec.image_size}")
    if embedded is None and spec.name == "vit_b":
        print("(MedSAM files have the same layout: load them with model_type='medsam_vit_b')")
    return 0

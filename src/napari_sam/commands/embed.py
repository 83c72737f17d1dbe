"""``napari-sam embed``: compute a volume's slice embeddings ahead of time, into the disk store.

Encoding is the slow step of SAM (seconds per slice on a CPU). Run this once, e.g. overnight or
on a machine with a GPU sharing the cache folder, and segmenting in napari, from scripts or with
``napari-sam segment`` then only reads the stored embeddings. The store is keyed by the volume's
content, the axis, the model's weights and the intensity window, so use the same ``--model``,
``--window`` and ``--axis`` as when segmenting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from napari_sam.commands._options import parse_slices
from napari_sam.commands.segment import add_session_options, open_session, read_volume


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="precompute slice embeddings of a NIfTI volume into the embedding store",
        description=__doc__.split("\n\n", 1)[1].replace("``", "'"),
    )
    p.add_argument("volume", type=Path, help="the volume, .nii or .nii.gz")
    p.add_argument("--slices", metavar="A:B", help="only slices A <= i < B (default: every slice)")
    add_session_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, no_cache=False)


def run(args: argparse.Namespace) -> int:
    from napari_sam.cli import CommandError

    if args.no_cache:
        raise CommandError("embed writes the embedding store: --no-cache makes no sense here")
    volume = read_volume(args.volume)
    num_slices = volume.data.shape[args.axis]
    start, stop = parse_slices(args.slices, num_slices) or (0, num_slices)
    indices = range(start, stop)
    began = time.perf_counter()
    with open_session(args, volume) as session:
        cache = session.cache
        before = set(cache.cached_indices())
        bar = None
        if not args.quiet:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(indices), desc="encoding", unit="slice")
        try:
            for _ in cache.precompute(indices):
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        reused = len(before.intersection(indices))
        store = cache.store_path
    elapsed = time.perf_counter() - began
    print(
        f"{len(indices)} slices ({len(indices) - reused} encoded, {reused} already stored) "
        f"in {elapsed:.1f} s -> {store}",
        file=sys.stdout,
    )
    return 0

"""``napari-sam batch``: one command over a cohort (a folder or a CSV list), on a dask cluster.

Examples::

    napari-sam batch embed cohort/ --model vit_b --cache-dir /shared/sam-cache
    napari-sam batch embed cohort.csv --scheduler local --workers 4 --chunk 16
    napari-sam batch segment cohort/ --prompts prompts/ -o labels/ --scheduler tcp://head:8786
    napari-sam batch segment cohort/ --seeds sparse_labels/ -o labels/
    napari-sam batch amg micrographs/ -o masks/ --scheduler tcp://head:8786

``embed`` fills the embedding store (one task per volume, or per ``--chunk`` slices); ``segment``
reads per-volume prompts (``<stem>.json`` or ``<stem>.csv`` in ``--prompts``, the format of
``napari-sam segment --prompts``; CSV columns label,slice,kind,x0,y0,x1,y1) or propagates the
labelled slices of ``<stem>.nii.gz`` in ``--seeds``, and writes ``<stem>.nii.gz`` into the
output folder; ``amg`` writes one COCO RLE JSON (or with ``--png`` a folder of masks) per image.
A CSV list has an ``image`` column and optional ``prompts``, ``seeds`` and ``output`` columns.

Without ``--scheduler`` the jobs run one by one in this process. ``--scheduler local`` starts a
local dask cluster of ``--workers`` processes; an address connects to a running scheduler (see
docs/cluster.md). A re-run skips finished outputs; every output is written atomically. The
command ends with a table of what was done, skipped or failed, and exits with status 1 if
anything failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``batch`` and its modes ``embed``, ``segment``, ``amg``."""
    p = subparsers.add_parser(
        "batch",
        help="embed, segment or run automatic masks over a cohort, optionally on dask",
        description=__doc__.split("\n", 1)[1].replace("``", "'").replace("::", ":"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    modes = p.add_subparsers(dest="mode", metavar="MODE", required=True)
    embed = modes.add_parser("embed", help="precompute the embedding store of every volume")
    _common(embed)
    embed.add_argument(
        "--chunk", type=int, metavar="N", help="one task per N slices (default: per volume)"
    )
    segment = modes.add_parser("segment", help="segment every volume from prompts or seeds")
    _common(segment)
    segment.add_argument("-o", "--output", type=Path, required=True, help="labels folder")
    given = segment.add_mutually_exclusive_group()
    given.add_argument("--prompts", type=Path, help="folder of <stem>.json / <stem>.csv prompts")
    given.add_argument("--seeds", type=Path, help="folder of <stem>.nii(.gz) sparse labels")
    segment.add_argument("--mode", dest="overlap", choices=("keep", "overwrite"), default="keep")
    segment.add_argument("--no-propagate", action="store_true", help="prompted slices only")
    segment.add_argument("--min-iou-prev", type=float, default=0.5)
    segment.add_argument("--min-pred-iou", type=float, default=0.5)
    amg = modes.add_parser("amg", help="automatic masks of every image")
    _common(amg, volumes=False)
    amg.add_argument("-o", "--output", type=Path, required=True, help="masks folder")
    amg.add_argument("--png", action="store_true", help="a folder of PNG masks per image")
    amg.add_argument("--slice", type=int, dest="slice_index", help="NIfTI inputs: this slice")
    from napari_sam.commands.amg import AMG_SETTINGS

    for option, kind, text in AMG_SETTINGS:
        amg.add_argument(option, type=kind, default=None, help=text)
    p.set_defaults(func=run)


def _common(p: argparse.ArgumentParser, volumes: bool = True) -> None:
    from napari_sam.commands._options import (
        add_axis_option,
        add_device_option,
        add_model_options,
        add_precision_option,
        add_window_option,
    )

    what = "volumes (.nii/.nii.gz)" if volumes else "images"
    p.add_argument("input", type=Path, help=f"a folder of {what} or a CSV list")
    add_model_options(p)
    add_device_option(p)  # on each worker
    add_precision_option(p)
    add_axis_option(p)
    if volumes:
        add_window_option(p)
    else:
        add_window_option(p, default=None, default_text="auto for NIfTI, else min-max")
    if volumes:
        p.add_argument(
            "--cache-dir",
            type=Path,
            help="embedding store every worker sees (default: $NAPARI_SAM_EMBEDDINGS or the "
            "cache folder)",
        )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="'local' (a local dask cluster) or a scheduler address (default: no dask)",
    )
    p.add_argument("--workers", type=int, default=2, help="workers of --scheduler local")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: dask's 1)")
    p.add_argument("--retries", type=int, default=2, help="further attempts per failed task")
    p.add_argument("--gpu", action="store_true", help="tasks need a worker with resource GPU")
    p.add_argument("--force", action="store_true", help="redo finished outputs too")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _window(text: str | None) -> Any:
    if text is None or "," not in text:
        return text
    from napari_sam.commands._options import window_from_args

    # Bounds stay a plain pair: jobs are digested as JSON for their done markers.
    window = window_from_args(argparse.Namespace(window=text))
    return window.low, window.high


def make_jobs(args: argparse.Namespace) -> list:
    """The cohort's jobs from the parsed options; user errors -> CommandError."""
    from napari_sam.cli import CommandError
    from napari_sam.cluster import tasks
    from napari_sam.cluster.batch import chunk_slices, read_cohort

    source = tasks.ModelSource(
        str(args.model),
        str(args.checkpoint) if args.checkpoint else None,
        args.device,
        args.precision,
    )
    try:
        rows = read_cohort(args.input, volumes_only=args.mode != "amg")
    except tasks.JobError as exc:
        raise CommandError(str(exc)) from None
    window = _window(args.window)
    jobs: list = []
    if args.mode == "amg":
        args.output.mkdir(parents=True, exist_ok=True)
        from napari_sam.commands.amg import amg_kwargs

        settings = tuple(sorted(amg_kwargs(args).items()))
        for row in rows:
            jobs.append(
                tasks.AmgJob(
                    str(row["image"]),
                    str(row.get("output", args.output)),
                    source,
                    rle=not args.png,
                    slice_index=args.slice_index,
                    axis=args.axis,
                    window=args.window,
                    settings=settings,
                )
            )
        return jobs
    from napari_sam.volume.embeddings import default_cache_dir

    cache_dir = str(args.cache_dir or default_cache_dir())
    if args.mode == "embed":
        if args.chunk is not None and args.chunk < 1:
            raise CommandError(f"--chunk must be at least 1, got {args.chunk}")
        for row in rows:
            ranges: list = [None]
            if args.chunk:
                try:
                    n = tasks.display_shape(row["image"])[args.axis]
                except tasks.JobError as exc:
                    raise CommandError(str(exc)) from None
                ranges = chunk_slices(n, args.chunk)
            for r in ranges:
                jobs.append(
                    tasks.EmbedJob(str(row["image"]), cache_dir, source, args.axis, window, r)
                )
        return jobs
    args.output.mkdir(parents=True, exist_ok=True)
    for row in rows:
        image = Path(row["image"])
        stem = _stem(image)
        prompts, seeds = row.get("prompts"), row.get("seeds")
        if prompts is None and seeds is None:
            if args.prompts is not None:
                prompts = _find(args.prompts, stem, (".json", ".csv"))
            elif args.seeds is not None:
                seeds = _find(args.seeds, stem, (".nii.gz", ".nii"))
            else:
                raise CommandError(
                    "segment needs --prompts DIR, --seeds DIR or a CSV list with "
                    "a 'prompts' or 'seeds' column"
                )
        output = row.get("output", args.output / f"{stem}.nii.gz")
        jobs.append(
            tasks.SegmentJob(
                str(image),
                str(output),
                source,
                prompts=str(prompts) if prompts else None,
                seeds=str(seeds) if seeds else None,
                cache_dir=cache_dir,
                axis=args.axis,
                window=window,
                mode=args.overlap,
                propagate=not args.no_propagate,
                min_iou_prev=args.min_iou_prev,
                min_pred_iou=args.min_pred_iou,
            )
        )
    return jobs


def _stem(path: Path) -> str:
    from napari_sam.commands.amg import image_stem

    return image_stem(path)


def _find(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path:
    for suffix in suffixes:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    # A missing file fails that volume's job (with the reason), not the whole cohort.
    return folder / f"{stem}{suffixes[0]}"


def open_client(args: argparse.Namespace) -> tuple[Any, list]:
    """A dask client for ``--scheduler`` (None without it) and what to close afterwards."""
    from napari_sam.cli import CommandError

    if args.scheduler is None:
        return None, []
    try:
        from napari_sam.cluster import require_distributed

        distributed = require_distributed()
    except ImportError as exc:
        raise CommandError(str(exc)) from None
    if args.scheduler == "local":
        if args.workers < 1:
            raise CommandError(f"--workers must be at least 1, got {args.workers}")
        cluster = distributed.LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            resources={"GPU": 1} if args.gpu else None,
        )
        client = distributed.Client(cluster)
        closers = [client, cluster]
    else:
        try:
            client = distributed.Client(args.scheduler, timeout=30)
        except (OSError, TimeoutError) as exc:
            raise CommandError(f"cannot reach the dask scheduler {args.scheduler}: {exc}") from None
        closers = [client]
    from napari_sam.cluster.remote import register_model_loader

    if args.threads:
        register_model_loader(client, torch_threads=args.threads)
    else:
        register_model_loader(client)
    return client, closers


def run(args: argparse.Namespace) -> int:
    """Run the cohort; prints the summary table; 1 if any job failed, else 0."""
    from napari_sam.cluster.batch import run_cohort, summary_table
    from napari_sam.cluster.tasks import ModelLoader

    jobs = make_jobs(args)
    client, closers = open_client(args)
    if client is None and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=f"batch {args.mode}", unit="task")
    results = []
    try:
        for result in run_cohort(
            jobs,
            client=client,
            retries=args.retries,
            loader=ModelLoader(),
            resources={"GPU": 1} if args.gpu else None,
            force=args.force,
        ):
            results.append(result)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{result.name}: {result.status}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        for closer in closers:
            closer.close()
    print(summary_table(results), file=sys.stdout)
    return 1 if any(r.status == "failed" for r in results) else 0

"""Run a cohort of jobs: serially in this process, or as dask futures on a cluster.

:func:`run_cohort` takes the jobs of :mod:`napari_sam.cluster.tasks` and yields one
:class:`~napari_sam.cluster.tasks.TaskResult` per job as it finishes (a progress bar counts
them). Jobs whose outputs are already done (:func:`~napari_sam.cluster.tasks.is_done`) are
skipped without running; embedding jobs find out on the worker, from the store.

On a cluster each job is one dask task (``client.submit`` with ``retries``): a task that raises
is retried on any worker, and a task whose worker died (killed, out of memory) is rescheduled
by the scheduler itself, up to its ``distributed.scheduler.allowed-failures`` (3 by default).
Results arrive through ``distributed.as_completed``. Serially the same retry count applies.
"""

from __future__ import annotations

import csv
import secrets
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from napari_sam.cluster.tasks import (
    EmbedJob,
    Job,
    JobError,
    ModelLoader,
    TaskResult,
    is_done,
    run_job,
)

__all__ = ["chunk_slices", "read_cohort", "run_cohort", "summary_table"]

NIFTI = (".nii", ".nii.gz")


def chunk_slices(num_slices: int, chunk: int | None) -> list[tuple[int, int] | None]:
    """Slice ranges of ``chunk`` slices covering an axis; ``[None]`` (all) without a chunk."""
    if not chunk or chunk >= num_slices:
        return [None]
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 slice, got {chunk}")
    return [(a, min(a + chunk, num_slices)) for a in range(0, num_slices, chunk)]


def read_cohort(source: str | Path, *, volumes_only: bool = True) -> list[dict[str, Path]]:
    """The inputs of a cohort: every file of a folder, or the rows of a CSV list.

    A folder gives its NIfTI files (``volumes_only``) or every non-hidden file, sorted. A CSV
    file needs a header with an ``image`` column (paths relative to the CSV's folder) and may
    have ``prompts``, ``seeds`` and ``output`` columns for per-file settings.

    Returns
    -------
    list of dict
        ``{"image": Path, ...}`` per input, other keys only where given.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
        if volumes_only:
            files = [p for p in files if p.name.lower().endswith(NIFTI)]
        if not files:
            kind = "NIfTI volume (.nii, .nii.gz)" if volumes_only else "file"
            raise JobError(f"{source} holds no {kind}")
        return [{"image": p} for p in files]
    if not source.is_file():
        raise JobError(f"input {source} does not exist")
    if source.suffix.lower() != ".csv":
        return [{"image": source}]
    rows: list[dict[str, Path]] = []
    with open(source, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "image" not in reader.fieldnames:
            raise JobError(f"{source}: the first line must be a header with an 'image' column")
        for line, row in enumerate(reader, start=2):
            if not (row.get("image") or "").strip():
                raise JobError(f"{source}, line {line}: empty 'image'")
            entry = {}
            for key in ("image", "prompts", "seeds", "output"):
                value = (row.get(key) or "").strip()
                if value:
                    path = Path(value).expanduser()
                    entry[key] = path if path.is_absolute() else source.parent / path
            rows.append(entry)
    if not rows:
        raise JobError(f"{source} lists no input")
    return rows


def run_cohort(
    jobs: Sequence[Job],
    *,
    client: Any = None,
    retries: int = 2,
    loader: ModelLoader | None = None,
    resources: dict[str, float] | None = None,
    force: bool = False,
) -> Iterator[TaskResult]:
    """Run jobs and yield their results in the order they finish.

    Parameters
    ----------
    jobs : sequence of Job
    client : distributed.Client, optional
        Run on this client's cluster; None runs serially in this process (no dask needed).
    retries : int
        Further attempts of a job that raised (a bad input, :class:`JobError`, is not retried).
    loader : ModelLoader, optional
        Models for the serial run (default a new one: each model is loaded once).
    resources : dict, optional
        Dask resources each task needs, e.g. ``{"GPU": 1}``.
    force : bool
        Run jobs whose outputs are done too.
    """
    todo: list[Job] = []
    for job in jobs:
        # An embed job is never done before it runs (is_done says so too; mypy needs it here).
        if not force and not isinstance(job, EmbedJob) and is_done(job):
            yield TaskResult(job.name, "skipped", "output done", outputs=[str(job.output)])
        else:
            todo.append(job)
    if client is None:
        yield from _serial(todo, loader or ModelLoader(), retries)
    else:
        yield from _distributed(todo, client, retries, resources)


def _serial(jobs: Iterable[Job], loader: ModelLoader, retries: int) -> Iterator[TaskResult]:
    for job in jobs:
        for attempt in range(1, retries + 2):
            try:
                result = run_job(job, loader)
            except Exception as exc:
                if attempt <= retries:
                    continue
                result = TaskResult(job.name, "failed", _reason(exc))
            result.attempts = attempt
            yield result
            break


def _distributed(
    jobs: Sequence[Job], client: Any, retries: int, resources: dict | None
) -> Iterator[TaskResult]:
    from distributed import as_completed

    from napari_sam.cluster.remote import register_model_loader, run_job_on_worker

    if not jobs:
        return
    register_model_loader(client)
    token = secrets.token_hex(4)
    futures = {}
    for i, job in enumerate(jobs):
        future = client.submit(
            run_job_on_worker,
            job,
            key=f"napari-sam-{token}-{i}",
            pure=False,
            retries=retries,
            resources=resources,
        )
        futures[future.key] = (future, job)
    pending = [f for f, _ in futures.values()]
    try:
        for future, value in as_completed(pending, with_results=True, raise_errors=False):
            job = futures[future.key][1]
            if isinstance(value, BaseException):
                yield TaskResult(job.name, "failed", _reason(value))
            else:
                yield value
    finally:
        # Closing early (Ctrl-C, an error) cancels what has not run.
        client.cancel([f for f, _ in futures.values() if not f.done()])


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def summary_table(results: Sequence[TaskResult]) -> str:
    """A plain-text table: one row per job (status, seconds, detail), then the counts."""
    rows = [("input", "status", "seconds", "detail")]
    rows += [(r.name, r.status, f"{r.seconds:.1f}", r.detail) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    lines.append(
        f"{len(results)} jobs: {counts['done']} done, {counts['skipped']} skipped, "
        f"{counts['failed']} failed"
    )
    return "\n".join(lines)

"""Task functions of a cohort run: one input (a volume, a chunk of its slices, an image) in,
files on disk out.

Each job is a small frozen dataclass naming its inputs, outputs and model; :func:`run_job`
executes one and returns a :class:`TaskResult`. Nothing here needs dask: the batch runner sends
the same jobs to a cluster's workers or runs them in this process, one after the other.

Outputs are written atomically (a temporary name beside the final one, then a rename) and a
*done marker* ``.<output name>.done.json`` beside each output records the job's digest (what the
output depends on: the job's settings and the inputs' bytes) and the SHA-256 of the finished
output. A job is done when its output exists and both hashes still match
(:func:`is_done`); a re-run skips it. Embedding jobs need no marker: the embedding store
itself says which slices are stored intact.

Errors in the input (a missing file, bad prompts) raise :class:`JobError`: retrying cannot fix
them. Anything else (a worker killed, out of memory) is worth a retry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "AmgJob",
    "EmbedJob",
    "Job",
    "JobError",
    "ModelLoader",
    "ModelSource",
    "SegmentJob",
    "TaskResult",
    "content_sha256",
    "display_shape",
    "is_done",
    "job_digest",
    "run_job",
]

Status = Literal["done", "skipped", "failed"]


class JobError(ValueError):
    """A job whose inputs are wrong: reported as failed, never retried."""


@dataclass(frozen=True)
class ModelSource:
    """How a worker gets the model: what :func:`napari_sam.weights.load_model` is given.

    ``model`` is a registered name or a checkpoint path that every worker can read (a shared
    folder); ``precision`` is passed to :func:`napari_sam.speed.with_precision` (None: exact).
    """

    model: str = "vit_b"
    checkpoint: str | None = None
    device: str = "auto"
    precision: str | None = "auto"

    def files(self) -> list[Path]:
        """The weights file(s) this source reads, where known without loading."""
        found = [Path(p).expanduser() for p in (self.model, self.checkpoint) if p]
        return [p for p in found if p.is_file()]

    def identity(self) -> tuple:
        """The source plus its weights files' size and modification time (cheap to get):
        a file replaced on disk makes a new identity, so a worker reloads it."""
        stats = []
        for path in self.files():
            st = path.stat()
            stats.append((str(path.resolve()), st.st_size, st.st_mtime_ns))
        return (self.model, self.checkpoint, self.device, self.precision, tuple(stats))

    def load(self) -> Any:
        """Load the model (a ``Sam``, or its fast twin for a precision other than exact)."""
        from napari_sam.speed import with_precision
        from napari_sam.weights import load_model

        model = load_model(self.model, checkpoint=self.checkpoint, device=self.device)
        model.requires_grad_(False)
        return with_precision(model, self.precision or "exact")


@dataclass
class LoadedModel:
    model: Any
    weights_sha256: str


class ModelLoader:
    """Models of one process, loaded once and reused by every task that asks for them.

    Keyed by :meth:`ModelSource.identity`; keeps the ``max_models`` most recent (a ViT-H takes
    2.5 GB of memory).
    """

    def __init__(self, max_models: int = 1) -> None:
        self.max_models = max(1, int(max_models))
        self.loads = 0
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: ModelSource) -> LoadedModel:
        """The model of ``source`` with its weights' SHA-256, loaded on first request.

        Raises
        ------
        JobError
            When the weights are missing or not a model (no retry can help).
        """
        key = source.identity()
        with self._lock:
            found = self._models.get(key)
            if found is not None:
                self._models.move_to_end(key)
                return found
            from napari_sam.volume.embeddings import weights_fingerprint
            from napari_sam.weights import WeightsUnavailableError

            try:
                model = source.load()
            except (FileNotFoundError, ValueError, WeightsUnavailableError) as exc:
                # A missing or wrong weights file: the same on the next attempt.
                raise JobError(f"model {source.model!r}: {exc}") from None
            found = LoadedModel(model, weights_fingerprint(model))
            self.loads += 1
            self._models[key] = found
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
            return found


@dataclass(frozen=True)
class EmbedJob:
    """Store the embeddings of slices ``start <= i < stop`` of a volume (all when None)."""

    volume: str
    cache_dir: str
    source: ModelSource
    axis: int = 0
    window: Any = "auto"
    slices: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """The volume's file name, with the slice range of a chunk."""
        where = f"[{self.slices[0]}:{self.slices[1]}]" if self.slices else ""
        return f"{Path(self.volume).name}{where}"


@dataclass(frozen=True)
class SegmentJob:
    """Segment a volume from a prompts file, or propagate the seeds of a labels file."""

    volume: str
    output: str
    source: ModelSource
    prompts: str | None = None
    seeds: str | None = None
    cache_dir: str | None = None
    axis: int = 0
    window: Any = "auto"
    mode: str = "keep"
    propagate: bool = True
    min_iou_prev: float = 0.5
    min_pred_iou: float = 0.5

    @property
    def name(self) -> str:
        """The volume's file name."""
        return Path(self.volume).name


@dataclass(frozen=True)
class AmgJob:
    """Automatic masks of one image (or one slice of a NIfTI volume) into ``output_dir``."""

    image: str
    output_dir: str
    source: ModelSource
    rle: bool = True
    slice_index: int | None = None
    axis: int = 0
    window: str | None = None
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        """The image's file name."""
        return Path(self.image).name

    @property
    def output(self) -> str:
        """The JSON file (or PNG folder) this job writes."""
        from napari_sam.commands.amg import image_stem

        stem = image_stem(Path(self.image))
        if self.slice_index is not None:
            stem = f"{stem}_slice{self.slice_index}"
        return str(Path(self.output_dir) / (f"{stem}.json" if self.rle else stem))


Job = EmbedJob | SegmentJob | AmgJob


@dataclass
class TaskResult:
    """What one job did: ``status`` is done, skipped or failed; ``detail`` says why/what."""

    name: str
    status: Status
    detail: str = ""
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    attempts: int = 1


# -- hashing and markers ----------------------------------------------------------------------


def _file_sha256(path: Path, digest: Any = None) -> Any:
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def content_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (names and bytes, sorted)."""
    path = Path(path)
    if path.is_file():
        return _file_sha256(path).hexdigest()
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(path).as_posix()}|".encode())
        _file_sha256(item, digest)
    return digest.hexdigest()


def job_digest(job: Job) -> str:
    """SHA-256 of what a job's output depends on: its settings and its inputs' bytes."""
    inputs = [job.volume if not isinstance(job, AmgJob) else job.image]
    inputs += [p for p in (getattr(job, "prompts", None), getattr(job, "seeds", None)) if p]
    digest = hashlib.sha256(json.dumps(_plain(job), sort_keys=True, default=str).encode())
    for path in inputs:
        digest.update(f"|{Path(path).name}|".encode())
        _file_sha256(Path(path), digest)
    for path in job.source.files():
        st = path.stat()  # weights files are large: identified by size and time, not hashed
        digest.update(f"|{path.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def _plain(job: Job) -> dict:
    data = asdict(job)
    data["kind"] = type(job).__name__
    data.pop("cache_dir", None)  # where embeddings live changes no output
    return data


def marker_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.done.json")


def is_done(job: Job) -> bool:
    """Whether a segment or AMG job's output exists, finished, for these very inputs."""
    if isinstance(job, EmbedJob):
        return False  # only a worker with the model can tell (EmbeddingCache.stored)
    output = Path(job.output)
    marker = marker_path(output)
    try:
        record = json.loads(marker.read_text())
        return (
            output.exists()
            and record.get("job") == job_digest(job)
            and record.get("sha256") == content_sha256(output)
        )
    except (OSError, ValueError):
        return False


def _write_marker(job: Job, output: Path) -> None:
    from napari_sam.volume.embeddings import _atomic_write

    record = {"job": job_digest(job), "sha256": content_sha256(output), "finished": time.time()}
    _atomic_write(marker_path(output), lambda f: f.write(json.dumps(record, indent=1).encode()))


def _sweep_partial_outputs(output: Path) -> None:
    """Remove what an earlier, killed attempt at this output left: the temporary names of the
    NIfTI writer (``.<stem>.tmp-*``), the AMG writer (``.<name>.tmp-*``) and of the marker.

    One job owns one output name, so a temporary file of that name is a dead attempt's.
    """
    from napari_sam.commands.amg import image_stem
    from napari_sam.volume.embeddings import sweep_temporaries

    prefixes = (f".{image_stem(output)}.tmp-", f".{output.name}.tmp-")
    for item in output.parent.iterdir():
        if item.name.startswith(prefixes):
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
    sweep_temporaries(output.parent)


# -- volumes ----------------------------------------------------------------------------------


def display_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Spatial shape of a NIfTI volume in napari-sam's display orientation, from its header
    (what ``read_nifti(path).data.shape[:3]`` gives, without reading the voxels)."""
    from napari_sam.io.nifti import NiftiError, _to_display_transform, open_nifti

    try:
        img = open_nifti(path)
    except NiftiError as exc:
        raise JobError(str(exc)) from None
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise JobError(f"{path} has shape {shape}: a cohort job needs a 3D volume")
    transform = _to_display_transform(img.affine)
    out = [0, 0, 0]
    for file_axis in range(3):
        out[int(transform[file_axis, 0])] = shape[file_axis]
    return tuple(out)


def _read_volume(path: str) -> Any:
    from napari_sam.io.nifti import NiftiError, read_nifti

    if not Path(path).is_file():
        raise JobError(f"volume {path} does not exist")
    try:
        volume = read_nifti(path)
    except (NiftiError, ValueError) as exc:
        raise JobError(f"cannot read {path}: {exc}") from None
    if volume.data.ndim - (1 if volume.rgb else 0) != 3:
        raise JobError(f"{path} is not a 3D volume (shape {volume.data.shape})")
    return volume


def _session(job: EmbedJob | SegmentJob, loaded: LoadedModel, **kwargs: Any) -> Any:
    from napari_sam.volume.session import VolumeSession

    try:
        return VolumeSession(
            _read_volume(job.volume),
            loaded.model,
            window=job.window,
            axis=job.axis,
            cache_dir=job.cache_dir,
            **kwargs,
        )
    except (ValueError, TypeError) as exc:
        raise JobError(f"{job.volume}: {exc}") from None


# -- the tasks --------------------------------------------------------------------------------


def run_embed(job: EmbedJob, loader: ModelLoader) -> TaskResult:
    """Encode the job's slices that the store lacks (or holds damaged) into the store."""
    loaded = loader.get(job.source)
    with _session(job, loaded, max_memory_slices=0) as session:
        cache = session.cache
        start, stop = job.slices or (0, session.num_slices)
        if not 0 <= start < stop <= session.num_slices:
            raise JobError(
                f"{job.volume}: slices {start}:{stop} outside axis {job.axis} "
                f"({session.num_slices} slices)"
            )
        todo = [i for i in range(start, stop) if not cache.stored(i)]
        for index in todo:
            cache.get(index)
        store = str(cache.store_path)
    total = stop - start
    if not todo:
        return TaskResult(job.name, "skipped", f"{total} slices already stored", outputs=[store])
    return TaskResult(
        job.name, "done", f"{len(todo)} encoded, {total - len(todo)} stored", outputs=[store]
    )


def run_segment(job: SegmentJob, loader: ModelLoader) -> TaskResult:
    """Prompts (or seeds) -> segmented, propagated labels saved as NIfTI beside the marker."""
    from napari_sam.cli import CommandError
    from napari_sam.commands.segment import _sam_prompt, check_prompt

    output = Path(job.output)
    if not output.parent.is_dir():
        raise JobError(f"output folder {output.parent} does not exist")
    if (job.prompts is None) == (job.seeds is None):
        raise JobError(f"{job.volume}: give either a prompts file or a seeds labels file")
    objects = _prompts(job.prompts) if job.prompts is not None else []
    seeds = _seeds(job, display_shape(job.volume)) if job.seeds is not None else None
    _sweep_partial_outputs(output)
    loaded = loader.get(job.source)
    with _session(job, loaded, labels=seeds) as session:
        try:
            for obj in objects:
                for prompt in obj.prompts:
                    what = f"object {obj.label}"
                    check_prompt(prompt, session.num_slices, session.slice_shape, what)
                    if prompt.absent:
                        session.mark_absent(obj.label, prompt.slice)
                        continue
                    mask = session.segment_slice(
                        prompt.slice,
                        label_id=obj.label,
                        mode=job.mode,
                        **_sam_prompt(prompt.prompts),
                    )
                    if not mask.any():
                        raise JobError(f"object {obj.label}: nothing found on slice {prompt.slice}")
        except (CommandError, ValueError) as exc:
            raise JobError(f"{job.volume}: {exc}") from None
        if seeds is not None:
            labels = session.labels
            for label in np.unique(labels[labels > 0]):
                moved = np.moveaxis(labels == label, session.axis, 0)
                for index in np.flatnonzero(moved.any(axis=(1, 2))):
                    session.annotate(int(label), int(index))
        summary = None
        if job.propagate and session.objects:
            summary = session.propagate(
                mode=job.mode, min_iou_prev=job.min_iou_prev, min_pred_iou=job.min_pred_iou
            )
        path = session.save(output)
        voxels = int(np.count_nonzero(session.labels))
        count = len(session.objects)
    _write_marker(job, path)
    slices = summary.slices if summary is not None else 0
    detail = f"{count} objects, {slices} slices propagated, {voxels} voxels"
    return TaskResult(job.name, "done", detail, outputs=[str(path)])


def _prompts(path: str) -> list:
    from napari_sam.cli import CommandError
    from napari_sam.commands.segment import load_prompts, parse_prompts

    try:
        if path.lower().endswith(".csv"):
            return parse_prompts(prompts_from_csv(path), source=path)
        return load_prompts(Path(path))
    except (CommandError, ValueError, OSError) as exc:
        raise JobError(str(exc)) from None


def prompts_from_csv(path: str | os.PathLike) -> dict:
    """A prompts document from a CSV file with a header ``label,slice,kind,x0,y0,x1,y1``.

    ``kind`` is ``box`` (uses x0..y1), ``point`` or ``negative`` (x0, y0) or ``absent``. Rows of
    one label and slice form one prompt; an optional ``name`` column names objects.
    """
    import csv

    objects: dict[int, dict] = {}
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                label, index = int(row["label"]), int(row["slice"])
                kind = row["kind"].strip().lower()
                obj = objects.setdefault(label, {"label": label, "prompts": []})
                if row.get("name"):
                    obj["name"] = row["name"]
                prompt = next((p for p in obj["prompts"] if p["slice"] == index), None)
                if prompt is None:
                    prompt = {"slice": index}
                    obj["prompts"].append(prompt)
                if kind == "box":
                    prompt["box"] = [float(row[k]) for k in ("x0", "y0", "x1", "y1")]
                elif kind in ("point", "negative"):
                    key = "points" if kind == "point" else "negative"
                    prompt.setdefault(key, []).append([float(row["x0"]), float(row["y0"])])
                elif kind == "absent":
                    prompt["absent"] = True
                else:
                    raise ValueError(f"kind {kind!r} is not box, point, negative or absent")
            except (KeyError, ValueError, TypeError) as exc:
                raise JobError(
                    f"{path}, line {line}: expected columns label,slice,kind,x0,y0,x1,y1 ({exc})"
                ) from None
    return {"objects": list(objects.values())}


def _seeds(job: SegmentJob, shape: tuple[int, ...]) -> np.ndarray:
    from napari_sam.io.nifti import NiftiError, read_nifti

    try:
        seeds = read_nifti(job.seeds)
    except (NiftiError, ValueError, FileNotFoundError) as exc:
        raise JobError(f"seeds {job.seeds}: {exc}") from None
    data = np.asarray(seeds.data)
    if data.shape != tuple(shape):
        raise JobError(f"seeds {job.seeds} have shape {data.shape}, the volume {tuple(shape)}")
    if data.min(initial=0) < 0 or not np.array_equal(data, np.round(data)):
        raise JobError(f"seeds {job.seeds} must hold non-negative integer labels")
    return data.astype(np.uint16 if data.max(initial=0) <= 65535 else np.int32)


def run_amg(job: AmgJob, loader: ModelLoader) -> TaskResult:
    """Automatic masks of one image, written as the ``amg`` command writes them."""
    from napari_sam.automatic import SamAutomaticMaskGenerator
    from napari_sam.cli import CommandError
    from napari_sam.commands.amg import _write_outputs, read_image
    from napari_sam.intensity import parse_window

    output = Path(job.output)
    if not output.parent.is_dir():
        raise JobError(f"output folder {output.parent} does not exist")
    try:
        window = None if job.window is None else parse_window(job.window)
        image, to_uint8, name = read_image(Path(job.image), job.slice_index, job.axis, window)
    except (CommandError, ValueError, OSError) as exc:
        raise JobError(str(exc)) from None
    _sweep_partial_outputs(output)
    loaded = loader.get(job.source)
    try:
        generator = SamAutomaticMaskGenerator(
            loaded.model,
            output_mode="coco_rle" if job.rle else "binary_mask",
            to_uint8=to_uint8,
            **dict(job.settings),
        )
        records = generator.generate(image)
    except ValueError as exc:
        raise JobError(f"{job.image}: {exc}") from None
    path = _write_outputs(records, output.parent, name, job.rle)
    _write_marker(job, path)
    return TaskResult(job.name, "done", f"{len(records)} masks", outputs=[str(path)])


def run_job(job: Job, loader: ModelLoader) -> TaskResult:
    """Run one job with models from ``loader``; the result's ``seconds`` is its wall time.

    A :class:`JobError` (bad input) comes back as a failed result; any other exception is
    raised, for the caller to retry.
    """
    began = time.perf_counter()
    try:
        if isinstance(job, EmbedJob):
            result = run_embed(job, loader)
        elif isinstance(job, SegmentJob):
            result = run_segment(job, loader)
        elif isinstance(job, AmgJob):
            result = run_amg(job, loader)
        else:
            raise TypeError(f"not a job: {job!r}")
    except JobError as exc:
        result = TaskResult(job.name, "failed", str(exc))
    result.seconds = time.perf_counter() - began
    return result

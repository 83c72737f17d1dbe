"""Throughput of ``napari-sam batch embed``: serial, and on a LocalCluster of 1 and 2 workers;
the overhead per dask task.

Usage::

    python bench/bench_batch.py                        # the test model, 6 volumes of 16 slices
    python bench/bench_batch.py --model vit_b --volumes 4 --shape 8,512,512 --workers 1 2 4

Every run encodes a synthetic cohort (NIfTI volumes of ellipsoids) into a fresh embedding store,
one task per volume, each worker one process with one torch thread (the serial run uses one
thread too). Worker start-up and the first model load are timed apart from the cohort (a
warm-up task per worker). The overhead figures:

- *dask round trip*: wall time per task of 200 tasks that do nothing, through
  ``client.submit`` and ``as_completed`` (scheduling, transfer, result);
- *fixed cost per embed task*: the cohort re-run on the filled store, where every task only
  reads its volume, hashes it and checks the stored slices.

The machine's load average is printed with the figures: on a shared machine they vary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_sam.cluster import tasks  # noqa: E402
from napari_sam.cluster.batch import run_cohort  # noqa: E402
from napari_sam.training.synthetic import ellipsoid_volume  # noqa: E402

TEST_MODEL = ROOT / "tests" / "data" / "sam_test_tiny.safetensors"


def make_cohort(folder: Path, count: int, shape: tuple[int, int, int]) -> list[Path]:
    """Write ``count`` NIfTI volumes of two ellipsoids each into ``folder``."""
    paths = []
    for k in range(count):
        volume, _ = ellipsoid_volume(np.random.default_rng(k), shape, n_objects=2)
        path = folder / f"case{k:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.transpose(volume, (2, 1, 0)), np.eye(4)), path)
        paths.append(path)
    return paths


def run(
    jobs: list, client: object = None, loader: tasks.ModelLoader | None = None
) -> tuple[float, list]:
    """Run a cohort to the end; its wall time in seconds and the results."""
    began = time.perf_counter()
    results = list(run_cohort(jobs, client=client, loader=loader, retries=0))
    elapsed = time.perf_counter() - began
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise SystemExit(f"failed: {failed[0].name}: {failed[0].detail}")
    return elapsed, results


def _nothing(i: int) -> int:
    return i


def main(argv: list[str] | None = None) -> int:
    """Build the cohort, time the runs, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--model", default=str(TEST_MODEL), help="name or checkpoint file")
    parser.add_argument("--volumes", type=int, default=6)
    parser.add_argument("--shape", default="16,128,128", help="Z,Y,X of each volume")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.set_num_threads(1)

    import distributed

    from napari_sam.cluster.remote import register_model_loader, run_job_on_worker

    source = tasks.ModelSource(args.model, device=args.device, precision="exact")
    slices = args.volumes * shape[0]
    print(
        f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}, "
        f"{os.cpu_count()} cores; cohort {args.volumes} x {shape}, model {Path(args.model).name}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_cohort(root, args.volumes, shape)

        def jobs(store: str) -> list:
            return [tasks.EmbedJob(str(p), str(root / store), source) for p in paths]

        loader = tasks.ModelLoader()
        run([jobs("warm")[0]], loader=loader)  # model load and first-call costs
        serial, _ = run(jobs("serial"), loader=loader)
        again, _ = run(jobs("serial"), loader=loader)
        print(
            f"serial (in-process, 1 thread): {serial:.2f} s, {slices / serial:.1f} slices/s; "
            f"re-run on the filled store {again / args.volumes * 1e3:.0f} ms per task"
        )
        for n in args.workers:
            began = time.perf_counter()
            with (
                distributed.LocalCluster(
                    n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
                ) as cluster,
                distributed.Client(cluster) as client,
            ):
                register_model_loader(client)
                warm = [
                    client.submit(run_job_on_worker, jobs(f"warm{n}")[0], workers=[w], pure=False)
                    for w in client.scheduler_info()["workers"]
                ]
                client.gather(warm)
                startup = time.perf_counter() - began
                wall, results = run(jobs(f"workers{n}"), client=client)
                rerun, _ = run(jobs(f"workers{n}"), client=client)
                busy = sum(r.seconds for r in results)
                line = (
                    f"{n} worker(s): {wall:.2f} s, {slices / wall:.1f} slices/s "
                    f"({serial / wall:.2f}x serial); start-up + model load {startup:.1f} s; "
                    f"task time {busy:.2f} s in all; re-run on the filled store "
                    f"{rerun / args.volumes * 1e3:.0f} ms per task"
                )
                if n == max(args.workers):
                    times = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        futures = client.map(_nothing, range(200), pure=False)
                        for _f in distributed.as_completed(futures):
                            pass
                        times.append((time.perf_counter() - t0) / 200)
                    line += f"; dask round trip {statistics.median(times) * 1e3:.1f} ms per task"
                print(line)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

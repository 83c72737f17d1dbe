"""Where our SAM 2.1 tracking spends its time: parts (forward hooks) and operators (profiler).

Tracks the synthetic ellipsoid volume of ``bench_tracking.py`` (one click on the middle slice,
up and down) with the project's float32 ``Sam2`` at the model's real size and random weights,
under ``torch.profiler``, and prints seconds per slice by part (image encoder, memory attention,
prompt encoder + mask decoder, memory encoder) and the operators that took most of the time.

    PYTHONPATH=src python bench/profile_tracking.py [--model sam2.1_hiera_tiny] [--slices 12]
        [--threads 2] [--rows 15]

No reference run: this says what ours is made of, ``bench_tracking.py`` how it compares.
"""

from __future__ import annotations

import argparse
import time

import bench_tracking
import torch
from torch.profiler import profile


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sam2.1_hiera_tiny")
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=15, help="operators to list")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from napari_sam.models.sam2.build import build_sam2
    from napari_sam.registry import get_spec

    spec = get_spec(args.model)
    torch.manual_seed(0)
    model = build_sam2(spec).eval()
    with torch.no_grad():  # as bench_tracking: the object is seen on every slice
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 0.5
    timer = bench_tracking.PartTimer(model)
    vol = bench_tracking.volume(args.slices)
    with torch.inference_mode():
        model.forward_image(torch.randn(1, 3, spec.image_size, spec.image_size))
        timer.reset()
        steps = bench_tracking._ours(model, vol, args.slices // 2, bench_tracking.click())
        start = time.perf_counter()
        with profile() as prof:
            for _ in range(args.slices):
                next(steps)
        wall = time.perf_counter() - start
    per_slice = {k: round(v / args.slices, 3) for k, v in timer.totals.items()}
    print(f"{args.model}, {args.slices} slices: {wall / args.slices:.3f} s per slice; {per_slice}")
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    for event in sorted(averages, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
        share = 100 * event.self_cpu_time_total / total
        print(f"{share:5.1f} %  {event.self_cpu_time_total / 1e6:8.2f} s  {event.key}")


if __name__ == "__main__":
    main()

"""Run the encoder, click and propagation benchmarks and print one summary table.

Usage::

    python bench/run_all.py [--repeats N] [--threads T] [--json results.json]

Each line of the table comes from one benchmark script (see their docstrings); times are
medians over interleaved repetitions, ratios are reference / ours (medians of per-repetition
ratios), agreement is the smallest mask IoU of the fast path against the exact path.
(Automatic masks: ``python bench/bench_amg.py``.)
"""

from __future__ import annotations

import argparse
import json
import sys

import bench_click
import bench_encoder
import bench_propagation
import common
import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="encoder / propagation repeats")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="write all results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = str(args.repeats)
    results = {
        "encoder": bench_encoder.main(["--repeats", n]),
        "click": bench_click.main(["--repeats", str(10 * args.repeats)]),
        "propagation": bench_propagation.main(["--repeats", n]),
    }
    rows = []

    def row(what: str, summary: dict, unit: str, scale: float, fast: str = "fast") -> None:
        ref, exact, best = summary["reference"], summary["exact"], summary[fast]
        rows.append(
            {
                "what": what,
                "reference": f"{ref['median_s'] * scale:.{0 if scale > 1 else 2}f} {unit}",
                "ours, exact": f"{exact['median_s'] * scale:.{0 if scale > 1 else 2}f} {unit}",
                "ours, fast": f"{best['median_s'] * scale:.{0 if scale > 1 else 2}f} {unit}",
                "exact / ref": f"{exact['ratio']:.2f}x",
                "fast / ref": f"{best['ratio']:.2f}x",
                "fast vs exact: min mask IoU": f"{best['min_iou']:.4f}",
            }
        )

    enc = results["encoder"]
    for variant in bench_encoder.VARIANTS["vit_b"][1:]:
        row(f"vit_b encoder, {variant}", enc["vit_b"]["summary"], "s", 1, variant)
    row("vit_t encoder, fast-fp32", enc["vit_t"]["summary"], "s", 1, "fast-fp32")
    row("one click (prompt -> mask, 512 px)", results["click"]["summary"], "ms", 1e3)
    row("propagation, 100 slices", results["propagation"]["summary"], "s", 1)
    print("\n## summary")
    print("machine:", common.machine())
    print(common.table(rows, list(rows[0])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

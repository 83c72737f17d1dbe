"""Segment objects in a CT/MRI volume with one box each, propagate them, save NIfTI labels.

Run it as it is on the synthetic CT phantom that ships with the plugin: both lungs are boxed on
the slice where they are largest (from the phantom's ground truth, standing in for a user's
boxes), propagated through the volume together, compared with the truth and saved::

    python examples/segment_volume.py --model vit_b            # official SAM (downloads 375 MB)
    python examples/segment_volume.py --model tests/data/sam_test_tiny.safetensors  # offline toy

or on your own scan, with a box in slice pixels (x = column, y = row of ``volume[z]`` in
napari-sam's display orientation)::

    python examples/segment_volume.py scan.nii.gz --slice 40 --box 120 80 220 190 --model vit_t

Press Ctrl+C during propagation to stop early: the finished slices are kept and saved.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from napari_sam import VolumeSession
from napari_sam.prompts import mask_to_box

# label -> (name, slice index, box (x0, y0, x1, y1) in pixels, true mask or None)
Objects = dict[int, tuple[str, int, list[float], np.ndarray | None]]


def phantom_objects() -> tuple[np.ndarray, tuple[float, float, float], Objects]:
    """The CT phantom (HU), its geometry and a box per lung on the lung's largest slice."""
    from napari_sam._napari.sample_data import PHANTOM_LABELS, make_ct_phantom

    volume, spacing, truth = make_ct_phantom(shape=(48, 192, 192), spacing=(3.0, 1.0, 1.0))
    objects: Objects = {}
    for label, name in enumerate(("right_lung", "left_lung"), start=1):
        inside = truth == PHANTOM_LABELS[name]
        z = int(np.argmax(inside.sum(axis=(1, 2))))
        objects[label] = (name, z, mask_to_box(inside[z]).tolist(), inside)
    return volume, spacing, objects


def main(argv: list[str] | None = None) -> int:
    """Run the example with command-line arguments ``argv``; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("volume", nargs="?", help=".nii/.nii.gz (default: the CT phantom)")
    parser.add_argument("--slice", type=int, help="slice of the box (your own volume)")
    parser.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"))
    parser.add_argument("--model", default="vit_b", help="model name or checkpoint file")
    parser.add_argument("--window", default=None, help="intensity window (default: auto)")
    parser.add_argument("--cache-dir", help="keep slice embeddings here for the next run")
    parser.add_argument("-o", "--output", default="segmentation.nii.gz")
    args = parser.parse_args(argv)

    if args.volume is None:
        volume, spacing, objects = phantom_objects()
        source = dict(volume=volume, scale=spacing, window=args.window or "lung")
    else:
        if args.slice is None or args.box is None:
            parser.error("give --slice and --box for your own volume")
        objects = {1: ("object", args.slice, list(args.box), None)}
        source = dict(volume=args.volume, window=args.window or "auto")

    start = time.perf_counter()
    with VolumeSession(source.pop("volume"), args.model, cache_dir=args.cache_dir, **source) as s:
        print(f"volume {s.volume.shape}, window {s.window}, model {s.model.spec.name}")
        for label, (name, z, box, _) in objects.items():
            mask = s.segment_slice(z, box=box, label_id=label, multimask=False)
            score = s.last_result.score
            print(f"{name}: slice {z}, {mask.sum()} pixels, predicted IoU {score:.2f}")

        # propagate_iter writes each slice before yielding it; stopping keeps whole slices.
        try:
            for step in s.propagate_iter():
                print(f"\rslice {step.index:3d} ({step.done}/{step.total})", end="", flush=True)
                for label, why in step.stopped.items():
                    print(f"\n{objects[label][0]} stops at slice {step.index}: {why}")
        except KeyboardInterrupt:
            print("\nstopped: keeping the slices done so far")
        print()

        for label, (name, _, _, truth) in objects.items():
            found = s.labels == label
            if truth is not None:
                dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
                print(f"{name}: {found.sum()} voxels, Dice with the truth {dice:.3f}")
            else:
                print(f"{name}: {found.sum()} voxels")
        path = s.save(args.output)
    print(f"saved {path} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

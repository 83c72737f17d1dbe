"""SAM 2.1 tracking through a volume: ours (VolumeTracker + models/sam2) vs Meta's sam2 1.1.0.

One click on the middle slice of a synthetic ``N x 512 x 512`` CT-like volume (a bright
ellipsoid over noise), then tracking up and down through every slice, with the same random
weights (drawn at the real size) in both implementations:

- ours: ``napari_sam.volume.tracking.VolumeTracker`` over a ``FeatureCache``, on the project's
  ``Sam2`` (``napari_sam.models.sam2.build.build_sam2``);
- fast: the same tracker on ``napari_sam.speed.optimize_sam2(model, "bf16")`` (image encoder,
  memory attention under bfloat16 autocast, float32 outputs);
- reference: ``sam2.sam2_video_predictor.SAM2VideoPredictor`` driven the same way
  (``add_new_points_or_box`` on the middle slice, ``propagate_in_video`` forward, then in
  reverse), its ``inference_state["images"]`` replaced by the tensors our preprocessing makes,
  so both see identical inputs.

The timed run is one subprocess holding all three models, stepping them in lockstep (one slice
of each in turn, who goes first rotating every slice); peak RSS comes from further runs, one
implementation per subprocess. Parts are timed with forward hooks on the model's submodules
(same attribute names in both): image encoder, memory attention, prompt encoder + mask decoder,
memory encoder; "other" is the rest (preprocessing, object pointers, bookkeeping, upscaling).

    PYTHONPATH=src python bench/bench_tracking.py [--slices 100] [--repeats 1] [--threads 2]
        [--models sam2.1_hiera_tiny,medsam2] [--memory-slices N] [--json out.json]

Before timing, each model encodes one random image (first-call allocations and kernel set-up
would otherwise fall on whichever implementation runs first).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = {
    "encoder": ("image_encoder",),
    "memory_attention": ("memory_attention",),
    "decoder": ("sam_prompt_encoder", "sam_mask_decoder"),
    "memory_encoder": ("memory_encoder",),
}


def volume(slices: int, size: int = 512) -> np.ndarray:
    """``slices x size x size`` float32 HU-like volume: an ellipsoid of 100 over N(0, 10) noise."""
    zz, yy, xx = np.ogrid[:slices, :size, :size]
    mid = (slices - 1) / 2
    radius = size * (0.25 - 0.12 * np.abs(zz - mid) / max(mid, 1))
    blob = (yy - 0.45 * size) ** 2 + ((xx - 0.55 * size) / 1.2) ** 2 < radius**2
    rng = np.random.default_rng(0)
    return (100.0 * blob + rng.normal(0.0, 10.0, (slices, size, size))).astype(np.float32)


def click(size: int = 512) -> np.ndarray:
    """Return the click (x, y) at the ellipsoid's centre."""
    return np.array([[0.55 * size, 0.45 * size]], dtype=np.float32)


class PartTimer:
    """Wall time spent inside chosen submodules (forward pre/post hooks), in seconds."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.totals = dict.fromkeys(PARTS, 0.0)
        self.calls = dict.fromkeys(PARTS, 0)
        self._start: dict[str, float] = {}
        for part, names in PARTS.items():
            for name in names:
                module = getattr(model, name)
                module.register_forward_pre_hook(self._pre(part, name))
                module.register_forward_hook(self._post(part, name))

    def reset(self) -> None:
        """Forget the time measured so far."""
        self.totals = dict.fromkeys(PARTS, 0.0)
        self.calls = dict.fromkeys(PARTS, 0)

    def _pre(self, part: str, name: str):
        def hook(module, args):
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, part: str, name: str):
        def hook(module, args, output):
            self.totals[part] += time.perf_counter() - self._start.pop(name)
            if name == PARTS[part][-1]:
                self.calls[part] += 1

        return hook


def _reference_model(image_size: int):
    sys.path.insert(0, str(ROOT / "tests"))
    import sam2_reference

    model = sam2_reference.build_reference_sam2(image_size, seed=0)
    model.fill_hole_area = 0  # ours is told the same (VolumeTracker(fill_hole_area=0))
    # Random weights put the object score near 0; lift it so the object is seen on every
    # slice and the masks (not SAM 2's "no object" fill) carry the comparison.
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 0.5
    return model


def _image_size(model_name: str) -> int:
    from napari_sam.registry import get_spec

    return int(get_spec(model_name).image_size)


def _ours(model, vol: np.ndarray, mid: int, point: np.ndarray):
    """Our tracking as a generator of ``(slice, logits)``; all work happens inside ``next``."""
    from napari_sam.volume.sam2_features import FeatureCache
    from napari_sam.volume.tracking import VolumeTracker

    cache = FeatureCache(model, vol, axis=0, max_memory_slices=8)
    tracker = VolumeTracker(model, cache, fill_hole_area=0)
    tracker.add_prompt(mid, 1, points=point, labels=np.array([1]))
    for step in tracker.track_iter():
        yield step.slice, step.logits[0]


def _reference_state(model, vol: np.ndarray, image_size: int):
    """The reference's inference state holding our preprocessed slices (built untimed)."""
    from PIL import Image

    from napari_sam.sam2_predictor import preprocess
    from napari_sam.volume.sam2_features import FeatureCache

    # The reference reads JPEG frames: give it blank ones, then replace them by our tensors.
    frames = Path(tempfile.mkdtemp())
    blank = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    for i in range(len(vol)):
        blank.save(frames / f"{i:05d}.jpg")
    cache = FeatureCache(model, vol, axis=0, max_memory_slices=0)
    state = model.init_state(str(frames))
    state["images"] = torch.cat(
        [preprocess(cache.slice_image(i), image_size) for i in range(len(vol))]
    )
    state["video_height"], state["video_width"] = vol.shape[1:]
    state["cached_features"] = {}
    return state


def _reference(model, state, mid: int, point: np.ndarray):
    """The reference driven the same way: click, propagate forward, then in reverse."""
    _, _, out = model.add_new_points_or_box(
        state, frame_idx=mid, obj_id=1, points=point, labels=np.array([1])
    )
    yield mid, out[0, 0].numpy()
    for reverse in (False, True):
        for f, _, v in model.propagate_in_video(state, reverse=reverse):
            if f != mid:  # the prompted slice is yielded again by each direction
                yield f, v[0, 0].numpy()


def child(args: argparse.Namespace) -> None:
    """One tracking run of ``ours``, ``ref`` or ``both`` in lockstep (one slice each in turn).

    Prints a JSON line per implementation; saves the logits (float16) to ``args.out``.
    """
    torch.set_num_threads(args.threads)
    from napari_sam.models.sam2.build import build_sam2
    from napari_sam.registry import get_spec

    spec = get_spec(args.model)
    vol = volume(args.slices)
    mid = args.slices // 2
    point = click()
    state_dict = torch.load(args.weights, weights_only=True)
    impls = ["ours", "fast", "ref"] if args.impl == "all" else [args.impl]
    runs = {}
    for impl in impls:
        if impl in ("ours", "fast"):
            model = build_sam2(spec).eval()
        else:
            model = _reference_model(spec.image_size)
        model.load_state_dict(state_dict, strict=True)
        if impl == "fast":
            from napari_sam.speed.sam2 import FastSam2

            # Not optimize_sam2: the bench runs bf16 whatever this CPU's flags say.
            model = FastSam2.from_exact(model)
        runs[impl] = {"model": model, "timer": PartTimer(model), "wall": 0.0, "logits": {}}
    with torch.inference_mode():
        warm = torch.randn(1, 3, spec.image_size, spec.image_size)
        for run in runs.values():
            run["model"].forward_image(warm)
        if "ref" in runs:
            ref = runs["ref"]
            ref["steps"] = _reference(
                ref["model"], _reference_state(ref["model"], vol, spec.image_size), mid, point
            )
        for impl in ("ours", "fast"):
            if impl in runs:
                runs[impl]["steps"] = _ours(runs[impl]["model"], vol, mid, point)
        for run in runs.values():
            run["timer"].reset()  # the warm-up (and the reference's init_state) encoded once
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for i in range(args.slices):
            # Rotate who goes first, so none always meets another's cache state.
            for impl in impls[i % len(impls) :] + impls[: i % len(impls)]:
                run = runs[impl]
                t0 = time.perf_counter()
                index, logits = next(run["steps"])
                run["wall"] += time.perf_counter() - t0
                run["logits"][index] = logits
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for impl, run in runs.items():
        logits = run["logits"]
        assert sorted(logits) == list(range(args.slices)), f"{impl} missed slices"
        np.save(
            f"{args.out}-{impl}.npy",
            np.stack([logits[i] for i in range(args.slices)]).astype(np.float16),
        )
        parts = {k: v / args.slices for k, v in run["timer"].totals.items()}
        print(
            json.dumps(
                {
                    "impl": impl,
                    "mode": args.impl,
                    "model": args.model,
                    "slices": args.slices,
                    "per_slice_s": run["wall"] / args.slices,
                    "parts_per_slice_s": parts,
                    "other_per_slice_s": run["wall"] / args.slices - sum(parts.values()),
                    "calls": run["timer"].calls,
                    "rss_before_mib": rss_before,
                    "rss_peak_mib": rss_peak,
                    "load": os.getloadavg(),
                }
            )
        )


def _run_child(impl: str, model: str, slices: int, args, weights: str, out: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        "--model",
        model,
        "--slices",
        str(slices),
        "--threads",
        str(args.threads),
        "--weights",
        weights,
        "--out",
        out,
    ]
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=path)
    )
    if done.returncode:
        raise RuntimeError(f"{impl} {model} failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {r["impl"]: r for r in lines}


def _fmt_load(load) -> str:
    return " ".join(f"{x:.1f}" for x in load)


def _agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Mask agreement of two ``slices x H x W`` logit stacks: pixels, per-slice IoU, logits."""
    ma, mb = a > 0, b > 0
    inter = np.logical_and(ma, mb).sum(axis=(1, 2))
    union = np.logical_or(ma, mb).sum(axis=(1, 2))
    ious = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {
        "pixels": float((ma == mb).mean()),
        "min_iou": float(ious.min()),
        "mean_iou": float(ious.mean()),
        "max_logit_diff": float(np.abs(a - b).max()),
    }


def _report(name: str, size: int, runs: dict, masks: dict) -> dict:
    """Print one model's table (best repetition of each) and return its summary."""
    impls = [k for k in ("ours", "fast", "ref") if runs.get(k)]
    best = {k: min(runs[k], key=lambda r: r["per_slice_s"]) for k in impls}

    def ratio(impl: str) -> list[float]:
        return [a["per_slice_s"] / b["per_slice_s"] for a, b in zip(runs["ref"], runs[impl])]

    print(f"{name} (input {size} px), lockstep, best of {len(runs['ref'])}, seconds per slice:")
    print("  " + f"{'part':18s}" + "".join(f"{k:>8s}" for k in impls) + "  ref/ours ref/fast")
    for part in [*PARTS, "other"]:
        row = [
            r["other_per_slice_s"] if part == "other" else r["parts_per_slice_s"][part]
            for r in (best[k] for k in impls)
        ]
        f = row[-1]
        print(
            f"  {part:18s}"
            + "".join(f"{x:8.3f}" for x in row)
            + "".join(f"{f / x if x > 0 else float('nan'):9.2f}" for x in row[:-1])
        )
    totals = [best[k]["per_slice_s"] for k in impls]
    print(
        f"  {'total':18s}"
        + "".join(f"{x:8.3f}" for x in totals)
        + "".join(f"{totals[-1] / x:9.2f}" for x in totals[:-1])
    )
    summary: dict = {"model": name, "image_size": size, "runs": runs}
    for impl in impls[:-1]:
        rs = ratio(impl)
        summary[f"ratios_{impl}"] = rs
        print(f"  ref/{impl} per repetition: {', '.join(f'{x:.2f}' for x in rs)}")
    pairs = [("ours", "ref"), ("fast", "ref"), ("fast", "ours")]
    for a, b in pairs:
        if a in masks and b in masks:
            agree = _agreement(masks[a], masks[b])
            summary[f"agreement_{a}_{b}"] = agree
            print(
                f"  masks {a} vs {b}: {agree['pixels']:.5f} of pixels agree, per-slice IoU "
                f"min {agree['min_iou']:.4f} mean {agree['mean_iou']:.4f}, "
                f"max |logit diff| {agree['max_logit_diff']:.2e}"
            )
    print(f"  object on {float((masks['ref'] > 0).mean()):.3f} of pixels (reference)")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--models", default="sam2.1_hiera_tiny,medsam2")
    parser.add_argument("--repeats", type=int, default=1, help="lockstep runs per model")
    parser.add_argument(
        "--memory-slices",
        type=int,
        default=None,
        help="slices of the separate peak-RSS runs (default --slices; 0: none)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--child", choices=["ours", "fast", "ref", "all"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.impl = args.child
        child(args)
        return

    sys.path.insert(0, str(ROOT / "bench"))
    from common import machine

    torch.set_num_threads(args.threads)
    memory_slices = args.slices if args.memory_slices is None else args.memory_slices
    info = machine()
    print(f"machine: {info}")
    print(
        f"volume: {args.slices} x 512 x 512, click on slice {args.slices // 2}, "
        f"{args.threads} threads; timing: ours (fp32, bf16) and the reference in one process, "
        f"one slice each in turn, {args.repeats} repetition(s)"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            size = _image_size(name)
            weights = os.path.join(tmp, f"{name}.pt")
            torch.save(_reference_model(size).state_dict(), weights)
            runs: dict[str, list[dict]] = {"ours": [], "fast": [], "ref": []}
            for rep in range(args.repeats):
                out = os.path.join(tmp, name)
                both = _run_child("all", name, args.slices, args, weights, out)
                for impl, r in both.items():
                    runs[impl].append(r)
                    print(
                        f"  {name} {impl:4s} rep {rep}: {r['per_slice_s']:.3f} s/slice, "
                        f"load {_fmt_load(r['load'])}",
                        flush=True,
                    )
            masks = {
                k: np.load(os.path.join(tmp, f"{name}-{k}.npy")).astype(np.float32) for k in runs
            }
            summary = _report(name, size, runs, masks)
            if memory_slices:
                # Peak RSS needs one implementation per process; these runs also time each
                # alone (less paired than the lockstep figures).
                for impl in ("ref", "ours", "fast"):
                    r = _run_child(
                        impl, name, memory_slices, args, weights, os.path.join(tmp, "mem")
                    )[impl]
                    summary[f"alone_{impl}"] = r
                    print(
                        f"  {impl:4s} alone, {memory_slices} slices: peak RSS "
                        f"{r['rss_peak_mib']:.0f} MiB (before tracking "
                        f"{r['rss_before_mib']:.0f}), {r['per_slice_s']:.3f} s/slice, "
                        f"load {_fmt_load(r['load'])}",
                        flush=True,
                    )
            results.append(summary)
    print(f"load average at the end: {_fmt_load(os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()

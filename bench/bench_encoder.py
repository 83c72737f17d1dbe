"""Image encoder per slice (``set_image`` on a 512 x 512 image): reference vs exact vs fast.

Usage::

    python bench/bench_encoder.py                 # vit_b and vit_t, 3 repetitions
    python bench/bench_encoder.py --models vit_t --repeats 5

All models carry the same random weights. Prints per-repetition times, medians, the ratio
reference / ours (median of per-repetition ratios), the agreement of the fast path with the
exact one (embedding difference, mask IoU on the predictor parity cases) and the peak memory of
a fresh process doing one ``set_image``.
"""

from __future__ import annotations

import argparse
import sys

import common
import numpy as np
import torch

VARIANTS = {"vit_b": ("exact", "fast-fp32", "fast-int8"), "vit_t": ("exact", "fast-fp32")}


def make_predictor(name: str, variant: str, ref_model, ours):
    from napari_sam import SamPredictor

    if variant == "reference":
        return common.reference_predictor(name, ref_model)
    if variant == "exact":
        return SamPredictor(ours)
    return SamPredictor(ours, fast=variant.split("-", 1)[1])


def bench(name: str, repeats: int, image: np.ndarray) -> dict:
    ref_model, ours = common.model_pair(name)
    variants = ("reference", *VARIANTS[name])
    predictors = {v: make_predictor(name, v, ref_model, ours) for v in variants}
    with torch.no_grad():
        times = common.interleaved(
            {v: (lambda p=p: p.set_image(image)) for v, p in predictors.items()}, repeats
        )
        summary = common.summarise(times, "reference")
        # Agreement: every predictor's last set_image was this image.
        exact = predictors["exact"]
        exact_masks = common.predictions(exact, image.shape[:2])
        ref_masks = common.predictions(predictors["reference"], image.shape[:2])
        for v in variants:
            p = predictors[v]
            diff = (p.features.float() - exact.features).abs()
            summary[v]["embedding_max_abs_diff"] = float(diff.max())
            summary[v]["embedding_mean_abs"] = float(exact.features.abs().mean())
            masks = ref_masks if v == "reference" else common.predictions(p, image.shape[:2])
            summary[v].update(common.agreement(masks, exact_masks))
    return {"times": times, "summary": summary}


def peak_memory(name: str, variant: str, image: np.ndarray) -> None:
    """One set_image in this (fresh) process, with only the model it needs; print the peak RSS."""
    import napari_sam

    torch.manual_seed(0)
    if variant == "reference":
        ref = common.reference()
        package = ref.mobile_sam if name == "vit_t" else ref.segment_anything
        predictor = make_predictor(name, variant, package.sam_model_registry[name]().eval(), None)
    else:
        predictor = make_predictor(name, variant, None, napari_sam.build_sam(name))
    with torch.no_grad():
        predictor.set_image(image)
    print(f"PEAK_RSS_MIB {common.peak_rss_mib():.0f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_b", "vit_t"], choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", help="also write the results to FILE.<model>.json")
    parser.add_argument("--peak-memory", nargs=2, metavar=("MODEL", "VARIANT"), help="internal")
    args = parser.parse_args(argv)
    image = common.test_image(512, 512)
    if args.peak_memory:
        peak_memory(*args.peak_memory, image)
        return {}

    print("machine:", common.machine())
    results = {}
    columns = {
        "median s": lambda s: f"{s['median_s']:.2f}",
        "ratio": lambda s: f"{s['ratio']:.2f}x",
        "max |emb diff|": lambda s: f"{s['embedding_max_abs_diff']:.1e}",
        "min mask IoU": lambda s: f"{s['min_iou']:.4f}",
        "peak RSS MiB": lambda s: f"{s['peak_rss_mib']:.0f}" if s.get("peak_rss_mib") else "-",
    }
    for name in args.models:
        result = bench(name, args.repeats, image)
        if not args.no_memory:
            for variant in ("reference", *VARIANTS[name]):
                peak = common.run_for_peak_memory("bench_encoder.py", name, variant)
                result["summary"][variant]["peak_rss_mib"] = peak
        title = f"image encoder {name} (set_image of a 512 x 512 image)"
        path = f"{args.json}.{name}.json" if args.json else None
        results[name] = common.report(title, result, columns, path)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)

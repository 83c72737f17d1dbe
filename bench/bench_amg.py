"""Benchmark: automatic mask generation, ours vs segment_anything, same weights, same run.

One 512 x 512 image, a 32 x 32 prompt grid (1024 points, 16 decoder batches of 64), the image
embedding computed once beforehand and given to both generators (the reference's predictor gets
it installed instead of running the encoder), so only prompt decoding and mask post-processing
are timed. Both models hold the same random vit_b weights (the reference's state dict loaded
into ours; speed does not depend on the values).

Two settings: the reference's default thresholds, and thresholds at 0 so that every candidate
mask is upscaled, scored and encoded by both (the worst case for our filter-first upscaling).

Usage::

    python bench/bench_amg.py                  # 32 x 32 points, vit_b, both settings
    python bench/bench_amg.py --points-per-side 8 --settings loose   # a quick check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import reference
from napari_sam.automatic import SamAutomaticMaskGenerator
from napari_sam.models.build import build_sam
from napari_sam.predictor import encode_image

SETTINGS = {
    "default": {},
    "loose": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
}


def test_image(size: int = 512) -> np.ndarray:
    """Shapes on a textured background, uint8 RGB."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size, 3), np.float32) + 60
    img += 20 * np.sin(xx / 17.0)[..., None]
    for cy, cx, r, colour in [(150, 140, 70, (220, 60, 50)), (360, 300, 110, (40, 180, 90))]:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = colour
    img[60:200, 320:470] = (50, 70, 210)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def reference_generator(model, embedding: torch.Tensor, **kwargs):
    """segment_anything's generator whose predictor installs ``embedding`` instead of encoding."""
    generator = reference.segment_anything.SamAutomaticMaskGenerator(model, **kwargs)
    predictor = generator.predictor

    def set_cached(image: np.ndarray, image_format: str = "RGB") -> None:
        predictor.reset_image()
        predictor.original_size = image.shape[:2]
        predictor.input_size = predictor.transform.get_preprocess_shape(
            image.shape[0], image.shape[1], predictor.model.image_encoder.img_size
        )
        predictor.features = embedding
        predictor.is_image_set = True

    predictor.set_image = set_cached
    return generator


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--settings", default="default,loose")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ref_model = reference.segment_anything.sam_model_registry["vit_b"]().eval()
    ours = build_sam("vit_b")
    ours.load_state_dict(ref_model.state_dict())
    image = test_image()
    t_encode, (embedding, _) = timed(lambda: encode_image(ours, image))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; vit_b random "
        f"weights; image {image.shape[1]}x{image.shape[0]}; {args.points_per_side}^2 points; "
        f"encoder (once, not timed below) {t_encode:.1f} s"
    )
    rows = []
    for name in args.settings.split(","):
        kwargs = {"points_per_side": args.points_per_side, **SETTINGS[name]}
        ref_gen = reference_generator(ref_model, embedding, **kwargs)
        our_gen = SamAutomaticMaskGenerator(ours, **kwargs)
        t_ref, ref_masks = timed(lambda g=ref_gen: g.generate(image))
        t_ours, our_masks = timed(lambda g=our_gen: g.generate(image, embedding=embedding))
        rows.append((name, t_ref, t_ours, len(ref_masks), len(our_masks)))
        print(
            f"{name:8s} reference {t_ref:7.1f} s ({len(ref_masks)} masks)   "
            f"ours {t_ours:7.1f} s ({len(our_masks)} masks)   ratio {t_ref / t_ours:.2f}x"
        )
    print()
    print("| setting | segment_anything 1.0 | napari-sam | speed-up | masks (ref / ours) |")
    print("| --- | --- | --- | --- | --- |")
    for name, t_ref, t_ours, n_ref, n_ours in rows:
        speedup = t_ref / t_ours
        print(f"| {name} | {t_ref:.1f} s | {t_ours:.1f} s | {speedup:.2f}x | {n_ref} / {n_ours} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Propagation of one object over 100 slices with cached embeddings: reference vs exact vs fast.

Usage::

    python bench/bench_propagation.py [--slices 100] [--repeats 3] [--masks trained|random]

The embeddings are given (as from a full embedding cache), so this times what the user waits
for after pressing "propagate": per slice the previous mask becomes a dense prompt plus its box,
one decoder call, the mask resized to the slice and the stop rules. The control loop is
:func:`napari_sam.volume.propagation.propagate` for everybody; only the predictor differs: the
reference is segment_anything's ``SamPredictor`` (behind a two-method adapter), "exact" and
"fast" are ours, all with the same weights.

``--masks trained`` (default): SAM's full-size prompt encoder and mask decoder with the
project's trained test weights, following an ellipsoid through a synthetic volume (real,
compact masks; see ``common.trained_decoder_slices``). ``--masks random``: ViT-B's decoder
with random weights on drifting embeddings of one image; its masks are speckle over the
whole slice, the worst case for the mask-dependent steps. The stop rules are relaxed so
every variant walks every slice.
"""

from __future__ import annotations

import argparse
import sys

import common
import numpy as np
import torch

SLICE = 512  # slice side in pixels


class ReferenceAdapter:
    """segment_anything's predictor with the two things ``propagate`` needs besides it."""

    def __init__(self, predictor, transform) -> None:
        self._p = predictor
        self.transform = transform  # same geometry as the reference's, plus input_size()

    @property
    def device(self):
        return self._p.device

    def set_image_embedding(self, embedding, original_size, input_size=None) -> None:
        p = self._p
        p.reset_image()
        p.features = embedding
        p.original_size = tuple(original_size)
        p.input_size = tuple(input_size or self.transform.input_size(original_size))
        p.is_image_set = True

    def predict_torch(self, *args, **kwargs):
        return self._p.predict_torch(*args, **kwargs)


def slice_embeddings(base: torch.Tensor, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` embeddings drifting smoothly away from ``base`` (a random walk of 1 % steps)."""
    gen = torch.Generator().manual_seed(seed)
    scale = float(base.std()) * 0.01
    out, current = [], base.clone()
    for _ in range(count):
        current = current + torch.randn(base.shape, generator=gen) * scale
        out.append(current.clone())
    return out


def seed_mask(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return (yy - 0.5 * size) ** 2 + (xx - 0.45 * size) ** 2 < (0.15 * size) ** 2


def run(predictor, embeddings, input_size, seed: np.ndarray) -> dict[int, np.ndarray]:
    from napari_sam.volume.propagation import propagate

    def get(index):
        return embeddings[index], (SLICE, SLICE), input_size

    steps = propagate(
        get,
        predictor,
        {1: {0: seed}},
        num_slices=len(embeddings),
        directions="forward",
        min_pred_iou=-np.inf,  # random weights predict meaningless (even negative) IoUs
        min_iou_prev=0.0,
    )
    masks = {}
    for step in steps:
        masks.update({step.index: step.masks[1]} if 1 in step.masks else {})
    return masks


def bench(name: str, slices: int, repeats: int, masks: str = "trained") -> dict:
    from napari_sam import SamPredictor

    ref_model, ours = common.model_pair(name)
    exact = SamPredictor(ours)
    input_size = exact.transform.input_size((SLICE, SLICE))
    truth = None
    if masks == "trained":
        state, embeddings, labels = common.trained_decoder_slices(slices + 1, SLICE)
        ref_model.load_state_dict(state, strict=False)
        ours.load_state_dict(state, strict=False)
        truth = labels == 1
        seed = truth[0]
    else:
        with torch.no_grad():
            exact.set_image(common.test_image(SLICE, SLICE))
        embeddings = slice_embeddings(exact.features, slices + 1)
        seed = seed_mask(SLICE)
    # Ours get the embeddings as napari_sam's EmbeddingCache keeps them (channels-last memory,
    # same values); the reference as its predictor holds them.
    cached = [e.contiguous(memory_format=torch.channels_last) for e in embeddings]
    given = {"reference": embeddings, "exact": cached, "fast": cached}
    predictors = {
        "reference": ReferenceAdapter(common.reference_predictor(name, ref_model), exact.transform),
        "exact": exact,
        "fast": SamPredictor(ours, fast=True),
    }
    with torch.no_grad():
        results = {k: run(p, given[k], input_size, seed) for k, p in predictors.items()}
        jobs = {
            k: (lambda p=p, k=k: run(p, given[k], input_size, seed)) for k, p in predictors.items()
        }
        times = common.interleaved(
            jobs,
            repeats,
            warmup=0,
        )
    summary = common.summarise(times, "reference")
    for key, out in results.items():
        common_slices = sorted(set(out) & set(results["exact"]))
        ious = [common.mask_iou(out[i], results["exact"][i]) for i in common_slices]
        summary[key].update(
            slices=len(out),
            min_iou=float(min(ious)) if ious else float("nan"),
            mean_iou=float(np.mean(ious)) if ious else float("nan"),
            per_slice_ms=1e3 * summary[key]["median_s"] / max(len(out), 1),
        )
        if truth is not None:
            dice = [2 * (m & truth[i]).sum() / (m.sum() + truth[i].sum()) for i, m in out.items()]
            summary[key]["dice"] = float(np.mean(dice))
    return {"times": times, "summary": summary, "masks": masks}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b", choices=["vit_b", "vit_t"])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--masks", default="trained", choices=["trained", "random"])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    print("machine:", common.machine())
    result = bench(args.model, args.slices, args.repeats, args.masks)
    title = (
        f"propagation: one object over {args.slices} slices "
        f"({args.model} decoder, {args.masks} weights, {SLICE} px)"
    )
    columns = {
        "median s": lambda s: f"{s['median_s']:.2f}",
        "ms / slice": lambda s: f"{s['per_slice_ms']:.1f}",
        "ratio": lambda s: f"{s['ratio']:.2f}x",
        "slices": lambda s: str(s["slices"]),
        "min mask IoU": lambda s: f"{s['min_iou']:.4f}",
    }
    if args.masks == "trained":
        columns["Dice vs truth"] = lambda s: f"{s['dice']:.3f}"
    return common.report(title, result, columns, args.json)


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)

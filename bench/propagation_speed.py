"""Propagation speed with cached embeddings: one object and three objects through a volume.

The prompt encoder and mask decoder are the same for every SAM model at image size 1024 (vit_b,
vit_l, vit_h, vit_t), and embeddings come from the cache, so the image encoder never runs here:
a tiny stand-in encoder keeps the model small. ``--masks trained`` (default): the decoder and
prompt encoder carry the project's trained test weights and follow three ellipsoids through a
synthetic volume (real, compact masks; bench/common.py ``trained_decoder_slices``, 512 px
only). ``--masks random``: random weights on random embeddings, whose masks are speckle over
the whole slice (the worst case for the mask-dependent steps). Stop rules are switched off so
every slice is decoded.

    python bench/propagation_speed.py [--slices 100] [--size 512] [--threads 2]
                                      [--masks trained|random] [--repeats 3]
                                      [--precision auto|exact]
                                      [--first-pass N]

Prints the time per slice of a bare decoder call (box + dense prompt, masks upscaled to the
slice size) and of full propagation steps (prompts from the previous mask, decoder, stop checks,
writing into the labels), for 1 and 3 objects, and the embedding cache's memory bound.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from napari_sam.models.build import build_sam
from napari_sam.predictor import SamPredictor
from napari_sam.prompts import mask_to_box, mask_to_mask_input
from napari_sam.registry import ModelSpec
from napari_sam.speed import with_precision
from napari_sam.volume.propagation import propagate, write_masks

SPEC = ModelSpec(
    name="bench_decoder",
    encoder="vit",
    encoder_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 1, "global_attn_indexes": ()},
    image_size=1024,
)


class MemoryCache:
    """Embeddings already computed: what ``EmbeddingCache.get`` returns on a memory hit."""

    def __init__(self, num_slices: int, size: int, embeddings=None) -> None:
        gen = torch.Generator().manual_seed(0)
        if embeddings is None:
            embeddings = [torch.randn(1, 256, 64, 64, generator=gen) for _ in range(num_slices)]
        # Channels-last memory, as EmbeddingCache keeps them (one transposing copy per slice
        # when it is encoded or loaded, not one per decoder call).
        self.embeddings = [e.contiguous(memory_format=torch.channels_last) for e in embeddings]
        self.slice_shape = (size, size)

    def __len__(self) -> int:
        return len(self.embeddings)

    def get(self, index: int):
        return self.embeddings[index], self.slice_shape, (1024, 1024)


def discs(size: int) -> list[np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    centres = [(0.4, 0.4, 0.12), (0.65, 0.6, 0.1), (0.3, 0.75, 0.08)]
    return [
        (yy - cy * size) ** 2 + (xx - cx * size) ** 2 <= (r * size) ** 2 for cy, cx, r in centres
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--masks", default="trained", choices=["trained", "random"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--first-pass",
        type=int,
        default=0,
        metavar="N",
        help="also time 1 and 3 objects through N slices whose embeddings are not cached yet "
        "(vit_t, random weights: each slice is encoded on the way, once for all objects)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "exact"),
        help="auto: the fast path (the widget's and command line's default); exact",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_sam(SPEC)
    if args.masks == "trained":
        import common

        state, embeddings, labels = common.trained_decoder_slices(args.slices, args.size, 3)
        model.load_state_dict(state, strict=False)
        cache = MemoryCache(args.slices, args.size, embeddings)
        objects = [labels[0] == k for k in (1, 2, 3)]
    else:
        cache = MemoryCache(args.slices, args.size)
        objects = discs(args.size)
    predictor = SamPredictor(with_precision(model, args.precision))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.precision}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs "
        f"(load average {load:.1f}), {args.slices} slices of {args.size}x{args.size}, "
        f"{args.masks} weights"
    )

    # A bare decoder call, as the propagation makes it (one prompt set).
    emb, original, input_size = cache.get(0)
    predictor.set_image_embedding(emb, original, input_size)
    dense = torch.as_tensor(mask_to_mask_input(objects[0], predictor.transform, original))[None]
    box = predictor.transform.apply_boxes_torch(
        torch.as_tensor(mask_to_box(objects[0]))[None], original
    )
    predictor.predict_torch(None, None, box, dense, multimask_output=False)  # warm-up
    runs = 10
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(runs):
        predictor.predict_torch(None, None, box, dense, multimask_output=False)
    wall, cpu = (time.perf_counter() - start) / runs, (time.process_time() - cpu) / runs
    print(
        f"bare decoder call (1 object, masks at {args.size}^2): {1000 * wall:.0f} ms "
        f"(CPU time {1000 * cpu:.0f} ms)"
    )

    def walk(n: int) -> tuple[int, float]:
        seeds = {k + 1: {0: objects[k]} for k in range(n)}
        labels = np.zeros((args.slices, args.size, args.size), np.uint16)
        steps = propagate(cache, predictor, seeds, min_pred_iou=-1e9, min_iou_prev=0.0)
        cpu, done = time.process_time(), 0
        for step in steps:
            write_masks(labels, step, axis=0)
            done += 1
        return done, time.process_time() - cpu

    # Interleaved repetitions (the machine is shared): medians of each.
    runs: dict[int, list[tuple[float, float]]] = {1: [], 3: []}
    for _ in range(args.repeats):
        for n in (1, 3):
            start = time.perf_counter()
            done, cpu = walk(n)
            runs[n].append((time.perf_counter() - start, cpu))
    per_slice = {}
    for n, values in runs.items():
        total = float(np.median([v[0] for v in values]))
        cpu = float(np.median([v[1] for v in values]))
        per_slice[n] = total / done
        print(
            f"{n} object(s): {done} slices in {total:.2f} s (median of "
            f"{', '.join(f'{v[0]:.2f}' for v in values)}) = {1000 * total / done:.1f} ms/slice "
            f"({1000 * total / done / n:.1f} ms per object-slice; CPU time "
            f"{1000 * cpu / done:.0f} ms/slice)"
        )
    print(f"3 objects / 1 object = {per_slice[3] / per_slice[1]:.2f}x")
    if args.first_pass:
        first_pass(args)
    bound = 32 * 256 * 64 * 64 * 4
    print(f"embedding cache memory bound (default 32 slices x 4 MiB): {bound / 2**20:.0f} MiB")


def first_pass(args) -> None:
    """1 vs 3 objects when the embeddings are computed during the walk (a fresh cache each)."""
    from napari_sam.intensity import minmax_window
    from napari_sam.volume.embeddings import EmbeddingCache

    torch.manual_seed(0)
    model = with_precision(build_sam("vit_t"), args.precision)
    predictor = SamPredictor(model)
    n, size = args.first_pass, args.size
    volume = np.random.default_rng(0).normal(100, 20, (n, size, size)).astype(np.float32)
    objects = discs(size)
    totals = {}
    for count in (1, 3):
        cache = EmbeddingCache(model, volume, window=minmax_window(volume))
        seeds = {k + 1: {0: objects[k]} for k in range(count)}
        labels = np.zeros(volume.shape, np.uint16)
        start, done = time.perf_counter(), 0
        for step in propagate(cache, predictor, seeds, min_pred_iou=-1e9, min_iou_prev=0.0):
            write_masks(labels, step, axis=0)
            done += 1
        totals[count] = time.perf_counter() - start
        print(
            f"first pass, vit_t, {count} object(s): {done} slices in {totals[count]:.1f} s "
            f"({1000 * totals[count] / done:.0f} ms/slice, encoding included)"
        )
    print(f"first pass: 3 objects / 1 object = {totals[3] / totals[1]:.2f}x")


if __name__ == "__main__":
    main()

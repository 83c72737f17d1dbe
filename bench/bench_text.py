"""Text detector time per image: Grounding DINO tiny (or OWLv2 base) at its real size.

Usage::

    python bench/bench_text.py            # Grounding DINO tiny, 1024 x 1024, 2 threads
    python bench/bench_text.py --detector owlv2 --repeats 5 --threads 4

The model is built from transformers' default configuration of each family (Grounding DINO's is
``IDEA-Research/grounding-dino-tiny``'s: Swin-T backbone, BERT-base text encoder, 900 queries;
OWLv2's is ``google/owlv2-base-patch16``'s: ViT-B/16, here at the ensemble checkpoint's
960 x 960) with random weights and the real image processor settings, so the time is that of the
real model; the detections are not.
Times one :meth:`~napari_sam.text.GroundingDinoDetector.detect` call (preprocessing, model,
selection) after one warm-up call, and prints each repetition's wall and CPU time, the median and
the spread (max - min).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import common
import numpy as np
import torch

PROMPT = "liver. left kidney. spleen."


def build(name: str):
    from napari_sam.text import GroundingDinoDetector, Owlv2Detector
    from tiny_detectors import bert_tokenizer, clip_tokenizer

    torch.manual_seed(0)
    if name == "grounding-dino-tiny":
        from transformers import (
            GroundingDinoConfig,
            GroundingDinoForObjectDetection,
            GroundingDinoImageProcessorPil,
        )

        model = GroundingDinoForObjectDetection(GroundingDinoConfig())
        # Default resize: shortest side 800, longest at most 1333 (the real preprocessor's).
        return GroundingDinoDetector(model, GroundingDinoImageProcessorPil(), bert_tokenizer())
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil

    tokenizer = clip_tokenizer()
    # owlv2-base-patch16-ensemble reads 960 x 960 (transformers' default config says 768).
    config = Owlv2Config(
        text_config={"vocab_size": len(tokenizer)}, vision_config={"image_size": 960}
    )
    model = Owlv2ForObjectDetection(config)
    return Owlv2Detector(model, Owlv2ImageProcessorPil(), tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--detector", choices=("grounding-dino-tiny", "owlv2"), default="grounding-dino-tiny"
    )
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    detector = build(args.detector)
    params = sum(p.numel() for p in detector.model.parameters())
    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    detector.detect(image, PROMPT)  # warm-up: first-call allocations
    times, cpu, preprocess = [], [], []
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        detector.detect(image, PROMPT)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        # The image processor's share (resize, rescale, normalise) of the CPU time.
        start_cpu = time.process_time()
        detector.image_processor(images=image, return_tensors="pt")
        preprocess.append(time.process_time() - start_cpu)
    report = {
        "detector": args.detector,
        "parameters_millions": round(params / 1e6, 1),
        "image": f"{args.size}x{args.size}",
        "prompt": PROMPT,
        "seconds": [round(t, 2) for t in times],
        "median_s": round(statistics.median(times), 2),
        "spread_s": round(max(times) - min(times), 2),
        # CPU seconds of all threads: less sensitive than wall time to other processes' load.
        "cpu_seconds": [round(t, 2) for t in cpu],
        "preprocess_cpu_seconds": [round(t, 2) for t in preprocess],
        "machine": common.machine(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

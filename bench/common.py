"""Shared helpers of the benchmarks: same-weight model pairs, interleaved timing, agreement.

The machines these run on are shared and noisy, so every benchmark times the reference and our
implementations interleaved in one process (round-robin, several repetitions) and reports
medians and the ratio reference / ours of each repetition's times.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/reference.py: segment_anything, mobile_sam

# The parity tests' random weights (every parameter and BatchNorm statistic perturbed) and
# their test image (smooth background, bright ellipses, noise).
from test_speed import _image as test_image  # noqa: E402, F401 (used by the scripts)
from test_speed import _perturb as perturbed  # noqa: E402


def reference():
    """The reference packages (``reference.segment_anything``, ``reference.mobile_sam``)."""
    import reference as ref

    return ref


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = fields.get("Model name", model).strip()
        flags = fields.get("Flags", "")
    except (OSError, subprocess.CalledProcessError):
        flags = ""
    wanted = ["avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16"]
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "flags": " ".join(f for f in wanted if f in flags.split()) or "-",
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def model_pair(name: str, seed: int = 0):
    """A reference model with random weights and ours loaded with the same state dict."""
    import napari_sam

    ref = reference()
    torch.manual_seed(seed)
    if name == "vit_t":
        ref_model = ref.mobile_sam.sam_model_registry["vit_t"]()
    else:
        ref_model = ref.segment_anything.sam_model_registry[name]()
    ref_model = perturbed(ref_model, seed)
    ours = napari_sam.build_sam(name)
    ours.load_state_dict(ref_model.state_dict(), strict=False)
    return ref_model, ours.eval()


def reference_predictor(name: str, ref_model):
    ref = reference()
    package = ref.mobile_sam if name == "vit_t" else ref.segment_anything
    return package.SamPredictor(ref_model)


def prompt_cases(h: int, w: int) -> list[tuple[str, dict]]:
    """The predictor parity cases: clicks, a negative click, a box, box + click, single mask."""
    p = np.array([[0.4 * w, 0.5 * h]])
    n = np.array([[0.7 * w, 0.3 * h]])
    box = np.array([0.2 * w, 0.25 * h, 0.75 * w, 0.8 * h])
    one = np.array([1])
    return [
        ("point", {"point_coords": p, "point_labels": one, "multimask_output": True}),
        (
            "point+negative",
            {"point_coords": np.vstack([p, n]), "point_labels": np.array([1, 0])},
        ),
        ("box", {"box": box, "multimask_output": False}),
        (
            "box+point",
            {"box": box, "point_coords": p, "point_labels": one, "multimask_output": False},
        ),
        ("point single", {"point_coords": p, "point_labels": one, "multimask_output": False}),
    ]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def predictions(predictor, image_size: tuple[int, int]) -> list[np.ndarray]:
    """Masks of every parity case plus a refinement with the best low-res logits fed back."""
    h, w = image_size
    out = []
    for _name, kwargs in prompt_cases(h, w):
        masks, scores, logits = predictor.predict(**kwargs)
        out.append(masks)
        best = logits[int(np.argmax(scores))][None]
        refined, _, _ = predictor.predict(
            point_coords=np.array([[0.45 * w, 0.55 * h]]),
            point_labels=np.array([1]),
            mask_input=best,
            multimask_output=False,
        )
        out.append(refined)
    return out


def agreement(masks_a: list[np.ndarray], masks_b: list[np.ndarray]) -> dict[str, float]:
    """Smallest and mean IoU over all masks of two prediction lists."""
    ious = [
        mask_iou(x, y)
        for set_a, set_b in zip(masks_a, masks_b, strict=True)
        for x, y in zip(set_a, set_b, strict=True)
    ]
    return {"min_iou": float(min(ious)), "mean_iou": float(np.mean(ious)), "masks": len(ious)}


def trained_decoder_slices(count: int, size: int = 512, objects: int = 1):
    """A trained decoder and ``count`` consecutive slice embeddings through ``objects`` objects.

    Random weights turn every prompt into speckle covering the whole slice, which is neither
    what a user sees nor a fair load for the mask-dependent steps of propagation. This gives
    real masks at SAM's full decoder size: the project's trained test model
    (tests/data/sam_test_tiny.safetensors) has SAM's own prompt encoder and mask decoder;
    its tiny encoder embeds each ``size x size`` slice of a synthetic ellipsoid volume on a
    16 x 16 grid, upsampled bilinearly to SAM's 64 x 64 (masks are compact and follow the
    object, somewhat smaller than it: Dice about 0.75). The volume is the first of seeds 0, 1,
    ... in which every object is present on ``count`` consecutive slices.

    Returns
    -------
    state : dict
        ``prompt_encoder.*`` and ``mask_decoder.*`` weights (checkpoint names).
    embeddings : list of Tensor
        ``1 x 256 x 64 x 64`` (contiguous, channels first), one per slice.
    truth : (count, size, size) int ndarray
        The objects' labels (1 .. ``objects``) on those slices, each present on every slice.
    """
    import torch.nn.functional as F

    from napari_sam import SamPredictor
    from napari_sam.training.synthetic import ellipsoid_volume
    from napari_sam.weights import load_model

    for seed in range(100):
        shape = (220, size, size)
        volume, labels = ellipsoid_volume(np.random.default_rng(seed), shape, objects)
        spans = [np.flatnonzero((labels == k).any(axis=(1, 2))) for k in range(1, objects + 1)]
        lo, hi = max(s[0] for s in spans), min(s[-1] for s in spans)
        if hi - lo + 1 >= count:
            break
    else:
        raise ValueError(f"no volume has {objects} objects on {count} slices; use fewer")
    start = lo + (hi - lo + 1 - count) // 2
    tiny = load_model(ROOT / "tests" / "data" / "sam_test_tiny.safetensors", device="cpu")
    predictor = SamPredictor(tiny)
    embeddings = []
    with torch.no_grad():
        for z in range(start, start + count):
            predictor.set_image(np.repeat(volume[z][..., None], 3, axis=-1))
            up = F.interpolate(predictor.features, scale_factor=4, mode="bilinear")
            embeddings.append(up.contiguous())
    state = {
        k: v
        for k, v in tiny.state_dict().items()
        if k.startswith(("prompt_encoder.", "mask_decoder."))
    }
    return state, embeddings, labels[start : start + count]


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time every function ``repeats`` times, round-robin, after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def summarise(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Median time per entry and the median of per-repetition ratios baseline / entry."""
    out = {}
    for key, values in times.items():
        ratios = [b / v for b, v in zip(times[baseline], values, strict=True)]
        out[key] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "ratio": statistics.median(ratios),
        }
    return out


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB.

    Linux ``VmHWM`` (it starts afresh at exec; ``ru_maxrss`` would carry the parent's peak).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_for_peak_memory(script: str, *args: str) -> float | None:
    """Run ``script --peak-memory args`` in a fresh process; it prints its peak RSS in MiB."""
    cmd = [sys.executable, str(Path(__file__).parent / script), "--peak-memory", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        print(f"peak-memory run {' '.join(args)} failed: {err}", file=sys.stderr)
        return None
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("PEAK_RSS_MIB "):
            return float(line.split()[1])
    return None


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def report(title: str, result: dict, columns: dict[str, Callable[[dict], str]], path=None):
    """Print a result's summary as a Markdown table (one row per variant); save it as JSON."""
    result["machine"] = machine()
    print(f"\n## {title}")
    print("per repetition (s):", {k: [round(t, 3) for t in v] for k, v in result["times"].items()})
    rows = [
        {"variant": key, **{name: fmt(s) for name, fmt in columns.items()}}
        for key, s in result["summary"].items()
    ]
    print(table(rows, ["variant", *columns]))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    return result

"""Held-out quality measures of a model on synthetic cases, through the real ``SamPredictor``.

Each measure mimics one way the plugin is used: one click inside an object (best of the three
masks by predicted IoU, as the widget shows it), a box, a negative click on a wrongly included
touching neighbour, and propagation through an ellipsoid volume with the previous slice's mask
as a dense prompt. The cases come from :mod:`napari_sam.training.synthetic` with a seed of their
own, so they are never the training images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sam.predictor import SamPredictor
from napari_sam.prompts import mask_to_box, mask_to_mask_input
from napari_sam.training import prompt_sim
from napari_sam.training.synthetic import (
    SceneConfig,
    TrainingSample,
    ellipsoid_volume,
    synthetic_scene,
)

if TYPE_CHECKING:
    from napari_sam.models.sam import Sam

__all__ = [
    "click_and_box_ious",
    "dice",
    "evaluate",
    "iou",
    "negative_click_gains",
    "propagation_dice",
    "propagation_ious",
    "scene_cases",
    "tracking_cases",
    "tracking_dice",
]


# Slices whose true area is at least this share of the object's largest cross-section: the
# "core" of an ellipsoid, without its small end caps.
CORE_AREA = 0.25


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@dataclass
class Case:
    """One held-out image and the object to segment in it (always label 1)."""

    sample: TrainingSample
    truth: np.ndarray  # H x W bool
    click: np.ndarray  # (x, y) well inside the object


def scene_cases(seed: int, n: int, config: SceneConfig | None = None) -> Iterator[Case]:
    """``n`` synthetic scenes, each with object 1 as the target and a click inside it.

    By default touching neighbours always differ in intensity from the target
    (``p_same_intensity=0``): one click on one of two identical touching objects is ambiguous
    (the pair is as good an answer as either object), which is what
    :func:`negative_click_gains` measures instead.
    """
    rng = np.random.default_rng(seed)
    config = config or dataclasses.replace(SceneConfig(), p_same_intensity=0.0)
    made = 0
    while made < n:
        sample = synthetic_scene(rng, config)
        truth = sample.labels == 1
        if not truth.any():
            continue
        yield Case(sample, truth, prompt_sim.interior_point(rng, truth))
        made += 1


def click_and_box_ious(
    predictor: SamPredictor, cases: list[Case]
) -> tuple[list[float], list[float]]:
    """Per case: the IoUs of a click's best mask and of a box's mask.

    The click is one positive point, its mask the best-scored of three; the box is the
    object's tight box, with a single mask. One image encoding serves both.
    """
    clicks, boxes = [], []
    for case in cases:
        predictor.set_image(case.sample.image)
        masks, scores, _ = predictor.predict(
            point_coords=case.click[None], point_labels=np.array([1]), multimask_output=True
        )
        clicks.append(iou(masks[int(np.argmax(scores))], case.truth))
        masks, _, _ = predictor.predict(box=mask_to_box(case.truth), multimask_output=False)
        boxes.append(iou(masks[0], case.truth))
    return clicks, boxes


def negative_click_gains(
    predictor: SamPredictor, seed: int, n: int, config: SceneConfig | None = None
) -> list[tuple[float, float]]:
    """IoU before and after a negative click on a wrongly included touching neighbour.

    Scenes where object 1 touches an object of the same intensity (object 2). A positive click
    in object 1 gives the best-scored mask; if it takes part of object 2, a negative click goes
    deep inside that wrongly taken part and the model runs again with both clicks and the
    previous logits (as the widget refines). Cases where the first mask already avoids the
    neighbour are skipped, until ``n`` pairs ``(iou_before, iou_after)`` are collected.
    """
    config = dataclasses.replace(
        config or SceneConfig(), p_touching=1.0, p_same_intensity=1.0, n_objects=(2, 2)
    )
    rng = np.random.default_rng(seed)
    pairs: list[tuple[float, float]] = []
    for _ in range(50 * n):
        if len(pairs) == n:
            break
        sample = synthetic_scene(rng, config)
        truth, neighbour = sample.labels == 1, sample.labels == 2
        if not truth.any() or not neighbour.any():
            continue
        click = prompt_sim.interior_point(rng, truth)
        predictor.set_image(sample.image)
        masks, scores, low = predictor.predict(
            point_coords=click[None], point_labels=np.array([1]), multimask_output=True
        )
        best = int(np.argmax(scores))
        wrong = masks[best] & neighbour
        if wrong.sum() < 0.1 * neighbour.sum():
            continue
        negative = prompt_sim.interior_point(rng, wrong)
        refined, _, _ = predictor.predict(
            point_coords=np.stack([click, negative]),
            point_labels=np.array([1, 0]),
            mask_input=low[best : best + 1],
            multimask_output=False,
        )
        pairs.append((iou(masks[best], truth), iou(refined[0], truth)))
    return pairs


def propagation_ious(
    predictor: SamPredictor,
    seed: int,
    n_volumes: int,
    shape: tuple[int, int, int] = (24, 144, 176),
    use_box: bool = True,
) -> list[np.ndarray]:
    """Per-slice IoUs of propagating object 1 through ellipsoid volumes.

    The largest cross-section starts from its true mask; each further slice gets the previous
    slice's predicted mask as the dense prompt (and its box when ``use_box``). The walk goes
    both ways and stops where the truth or the prediction vanishes.

    Returns
    -------
    list of ndarray, one ``n x 2`` array per volume
        Column 0: IoU of each visited slice; column 1: that slice's true area relative to the
        largest cross-section (the caps at the ends of an ellipsoid are small, and there a
        one-pixel outline error is already a large IoU error).
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_volumes):
        volume, labels = ellipsoid_volume(rng, shape, n_objects=2)
        truth = labels == 1
        areas = truth.sum(axis=(1, 2))
        start = int(np.argmax(areas))
        ious = []
        for step in (1, -1):
            previous = truth[start]
            z = start + step
            while 0 <= z < shape[0] and truth[z].any() and previous.any():
                image = np.repeat(volume[z][..., None], 3, axis=2)
                predictor.set_image(image)
                box = mask_to_box(previous) if use_box else None
                masks, _, _ = predictor.predict(
                    box=box,
                    mask_input=mask_to_mask_input(previous, predictor.transform, previous.shape),
                    multimask_output=False,
                )
                previous = masks[0]
                ious.append((iou(previous, truth[z]), areas[z] / areas[start]))
                z += step
        out.append(np.array(ious, dtype=float).reshape(-1, 2))
    return out


def evaluate(model: Sam, seed: int, n_cases: int = 50) -> dict[str, float]:
    """All quality measures of ``model`` on held-out cases drawn with ``seed``."""
    predictor = SamPredictor(model)
    cases = list(scene_cases(seed, n_cases))
    clicks, boxes = click_and_box_ious(predictor, cases)
    gains = negative_click_gains(predictor, seed + 1, max(10, n_cases // 3))
    slices = np.concatenate(propagation_ious(predictor, seed + 2, 2))
    flat = slices[:, 0]
    core = slices[slices[:, 1] >= CORE_AREA, 0]
    return {
        "one_click_iou_mean": round(float(np.mean(clicks)), 4),
        "box_iou_mean": round(float(np.mean(boxes)), 4),
        "negative_click_cases": len(gains),
        "negative_click_iou_before": round(float(np.mean([a for a, _ in gains])), 4)
        if gains
        else float("nan"),
        "negative_click_iou_after": round(float(np.mean([b for _, b in gains])), 4)
        if gains
        else float("nan"),
        "negative_click_improved_fraction": round(float(np.mean([b > a for a, b in gains])), 4)
        if gains
        else float("nan"),
        "propagation_slices": len(flat),
        "propagation_iou_mean": round(float(np.mean(flat)), 4) if len(flat) else float("nan"),
        "propagation_iou_min": round(float(np.min(flat)), 4) if len(flat) else float("nan"),
        "propagation_core_iou_mean": round(float(np.mean(core)), 4) if len(core) else float("nan"),
        "propagation_core_iou_min": round(float(np.min(core)), 4) if len(core) else float("nan"),
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean arrays of any shape (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def tracking_cases(
    seed: int,
    n_volumes: int,
    shape: tuple[int, int, int] = (24, 144, 176),
    follow: str = "alternate",
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Held-out volumes for volume-wise comparisons: ``(volume, truth, start)``.

    Each volume holds two ellipsoids: object 1 brighter than the background and drawn on top
    where they overlap, object 2 darker. A model that segments the salient object whatever its
    prompt says scores well on object 1 alone (the first SAM 2 fixture did), so
    ``follow="alternate"`` follows object 1 in the even cases and object 2 in the odd ones
    (``"first"``: object 1 always). The volumes depend on ``seed`` only, not on ``follow``.

    ``start`` is the slice of the followed object's largest cross-section, where both the SAM 1
    propagation and SAM 2 tracking get the object's true mask as their one prompt.
    """
    if follow not in ("alternate", "first"):
        raise ValueError(f'follow must be "alternate" or "first", got {follow!r}')
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n_volumes):
        volume, labels = ellipsoid_volume(rng, shape, n_objects=2)
        truth = labels == (2 if follow == "alternate" and i % 2 else 1)
        cases.append((volume, truth, int(np.argmax(truth.sum(axis=(1, 2))))))
    return cases


def propagation_dice(model: Sam, cases: list[tuple[np.ndarray, np.ndarray, int]]) -> list[float]:
    """Volume Dice of SAM 1 propagation (``napari_sam.volume.propagation.propagate``).

    Seeded with the true mask on each case's start slice; the walk stops by its own rules, as
    in the widget.
    """
    from napari_sam.volume.embeddings import EmbeddingCache
    from napari_sam.volume.propagation import propagate

    predictor = SamPredictor(model)
    out = []
    for volume, truth, start in cases:
        cache = EmbeddingCache(model, volume)
        found = np.zeros_like(truth)
        found[start] = truth[start]
        for step in propagate(cache, predictor, {1: {start: truth[start]}}):
            if 1 in step.masks:
                found[step.index] = step.masks[1]
        out.append(dice(found, truth))
    return out


def tracking_dice(
    model: Any, cases: list[tuple[np.ndarray, np.ndarray, int]], stop_after: int = 2
) -> list[float]:
    """Volume Dice of SAM 2 tracking (:func:`~napari_sam.volume.tracking.track_volume`).

    Prompted with the true mask on each case's start slice, tracked up and down; an object
    absent on ``stop_after`` slices in a row ends its walk.
    """
    from napari_sam.volume.tracking import Prompt, track_volume

    out = []
    for volume, truth, start in cases:
        found = np.zeros_like(truth)
        prompt = Prompt(slice=start, obj_id=1, mask=truth[start])
        for step in track_volume(model, volume, [prompt], stop_after=stop_after):
            found[step.slice] = step.label_image() == 1
        out.append(dice(found, truth))
    return out

"""Grounded SAM: a detector's boxes for phrases, then SAM's mask for each box."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from napari_sam.text.detectors import Detections, Detector
from napari_sam.text.phrases import parse_prompt

if TYPE_CHECKING:  # pragma: no cover
    from napari_sam.predictor import SamPredictor

__all__ = ["TextSegmentation", "segment_boxes", "segment_text"]


@dataclass(frozen=True)
class TextSegmentation:
    """One mask per detected box.

    Attributes
    ----------
    masks : ndarray of bool, shape (N, H, W)
    boxes : ndarray of float64, shape (N, 4)
        ``(x0, y0, x1, y1)`` pixels of the image, the prompts SAM was given.
    phrases : tuple of str, length N
    scores : ndarray of float64, shape (N,)
        The detector's confidence.
    iou_predictions : ndarray of float32, shape (N,)
        SAM's predicted IoU of each mask.
    low_res_logits : ndarray of float32, shape (N, L, L)
        SAM's low-resolution logits (a ``mask_input`` for refining one object).
    """

    masks: np.ndarray
    boxes: np.ndarray
    phrases: tuple[str, ...]
    scores: np.ndarray
    iou_predictions: np.ndarray
    low_res_logits: np.ndarray

    def __len__(self) -> int:
        """Return the number of objects."""
        return len(self.phrases)


def segment_boxes(
    predictor: SamPredictor, boxes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SAM's single-mask answer for each box, all boxes decoded in one batch.

    Parameters
    ----------
    predictor : SamPredictor
        With the image set.
    boxes : ndarray, shape (N, 4)
        ``(x0, y0, x1, y1)`` in pixels of the predictor's image.

    Returns
    -------
    masks : ndarray of bool, shape (N, H, W)
    iou_predictions : ndarray of float32, shape (N,)
    low_res_logits : ndarray of float32, shape (N, L, L)
    """
    embedding = predictor.get_image_embedding()  # raises without an image
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if predictor.original_size is None:  # set with the embedding
        raise RuntimeError("the predictor has an embedding but no image size")
    h, w = predictor.original_size
    if len(boxes) == 0:
        side = 4 * embedding.shape[-1]  # the decoder upscales the embedding 4x
        return (
            np.zeros((0, h, w), dtype=bool),
            np.zeros(0, dtype=np.float32),
            np.zeros((0, side, side), dtype=np.float32),
        )
    frame = predictor.transform.apply_boxes(boxes, (h, w))
    frame_t = torch.as_tensor(frame, dtype=torch.float, device=predictor.device)
    masks, iou, low_res = predictor.predict_torch(None, None, frame_t, multimask_output=False)
    return (
        masks[:, 0].cpu().numpy(),
        iou[:, 0].float().cpu().numpy(),
        low_res[:, 0].float().cpu().numpy(),
    )


def segment_text(
    image: np.ndarray,
    text: str | Iterable[str],
    *,
    predictor: SamPredictor,
    detector: Detector | None = None,
    box_threshold: float | None = None,
    text_threshold: float | None = None,
    image_is_set: bool = False,
) -> TextSegmentation:
    """Segment the objects a text prompt names: detector boxes, then SAM per box.

    Parameters
    ----------
    image : ndarray, shape (H, W), (H, W, 3) or (H, W, 4), any dtype
        Converted with ``predictor.to_uint8`` for both the detector and SAM, so both see the
        same picture (a volume's slice: give the predictor the volume's window).
    text : str or iterable of str
        ``"liver. kidney."`` (see :func:`~napari_sam.text.parse_prompt`).
    predictor : SamPredictor
    detector : Detector, optional
        Default: Grounding DINO tiny, loaded on each call; load one with
        :func:`~napari_sam.text.load_detector` and pass it to reuse it.
    box_threshold, text_threshold : float, optional
        Override the detector's thresholds.
    image_is_set : bool
        The predictor already holds this image's embedding (skip the encoder).

    Returns
    -------
    TextSegmentation
        Empty (N = 0) when the detector finds nothing above the thresholds.
    """
    from napari_sam.predictor import _check_image

    phrases = parse_prompt(text)
    image = _check_image(image)
    rgb = predictor.to_uint8(image)
    if detector is None:
        from napari_sam.text.detectors import load_detector

        detector = load_detector()
    found: Detections = detector.detect(
        rgb, phrases, box_threshold=box_threshold, text_threshold=text_threshold
    )
    if not image_is_set:
        predictor.set_image(image)
    elif tuple(predictor.original_size or ()) != tuple(image.shape[:2]):
        raise ValueError(
            f"image_is_set=True but the predictor holds a {predictor.original_size} image, "
            f"not this {image.shape[:2]} one"
        )
    masks, iou, low_res = segment_boxes(predictor, found.boxes)
    return TextSegmentation(masks, found.boxes, found.phrases, found.scores, iou, low_res)

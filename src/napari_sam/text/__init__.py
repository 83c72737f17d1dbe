"""Text prompts ("Grounded SAM"): a detector's boxes for phrases, then SAM per box.

An open-vocabulary detector finds boxes for phrases and SAM segments each box. SAM's own text
prompts were never released; the field pairs SAM with a detector that reads text.
The detectors (Grounding DINO, OWLv2) come from the optional ``transformers`` dependency::

    pip install "napari-sam-volumes[text]"

Usage::

    from napari_sam import SamPredictor, load_model
    from napari_sam.text import load_detector, segment_text

    predictor = SamPredictor(load_model("vit_b"))
    detector = load_detector("grounding-dino-tiny")      # load once, reuse
    result = segment_text(image, "liver. kidney.", predictor=predictor, detector=detector)
    result.masks, result.boxes, result.phrases, result.scores, result.iou_predictions

Detectors trained on natural images are weak on CT and MRI: check every box (docs/text-prompts.md).
Importing this package does not import transformers; loading a detector does.
"""

from napari_sam.text.detectors import (
    DETECTORS,
    Candidates,
    Detections,
    Detector,
    GroundingDinoDetector,
    Owlv2Detector,
    load_detector,
    select_detections,
)
from napari_sam.text.phrases import parse_prompt
from napari_sam.text.segment import TextSegmentation, segment_boxes, segment_text

__all__ = [
    "DETECTORS",
    "Candidates",
    "Detections",
    "Detector",
    "GroundingDinoDetector",
    "Owlv2Detector",
    "TextSegmentation",
    "load_detector",
    "parse_prompt",
    "segment_boxes",
    "segment_text",
    "select_detections",
]

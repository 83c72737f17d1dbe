"""Open-vocabulary box detectors: an RGB image and phrases in, scored boxes per phrase out.

Two families from ``transformers`` sit behind one small interface (:class:`Detector`):
Grounding DINO (``IDEA-Research/grounding-dino-tiny``, Apache-2.0, the default) and OWLv2
(``google/owlv2-base-patch16-ensemble``, Apache-2.0). Both are loaded with ``from_pretrained``
from a Hub repository (its cache serves it offline) or a local folder.

A detector turns every query slot of the model into a :class:`Candidates` row (a box in pixels,
its score, its score for each phrase); :func:`select_detections` then applies the thresholds,
non-maximum suppression and the box limit the same way for every model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

import numpy as np
import torch

from napari_sam.text.phrases import parse_prompt

__all__ = [
    "DETECTORS",
    "Candidates",
    "Detections",
    "Detector",
    "GroundingDinoDetector",
    "Owlv2Detector",
    "load_detector",
    "select_detections",
]

INSTALL_HINT = "pip install 'napari-sam-volumes[text]'"


@dataclass(frozen=True)
class Detections:
    """Boxes found for phrases in one image, best score first.

    Attributes
    ----------
    boxes : ndarray of float64, shape (N, 4)
        ``(x0, y0, x1, y1)`` in pixels of the image given to the detector, inside it.
    scores : ndarray of float64, shape (N,)
        Detector confidence in 0..1 (the value compared with ``box_threshold``).
    phrases : tuple of str, length N
        The phrase each box was found for, as :func:`~napari_sam.text.parse_prompt` wrote it.
    """

    boxes: np.ndarray
    scores: np.ndarray
    phrases: tuple[str, ...]

    def __len__(self) -> int:
        """Return the number of detections."""
        return len(self.phrases)


@dataclass(frozen=True)
class Candidates:
    """Every query slot of a detector for one image, before any selection.

    Attributes
    ----------
    boxes : ndarray of float64, shape (Q, 4)
        ``(x0, y0, x1, y1)`` in pixels, clipped to the image (a box outside it has zero area).
    box_scores : ndarray of float64, shape (Q,)
        The slot's confidence that it holds any of the phrases, 0..1.
    phrase_scores : ndarray of float64, shape (Q, P)
        Its confidence for each phrase, 0..1.
    """

    boxes: np.ndarray
    box_scores: np.ndarray
    phrase_scores: np.ndarray


@runtime_checkable
class Detector(Protocol):
    """What :func:`~napari_sam.text.segment_text` needs from a detector."""

    box_threshold: float
    text_threshold: float

    def detect(
        self,
        image: np.ndarray,
        phrases: Sequence[str],
        *,
        box_threshold: float | None = None,
        text_threshold: float | None = None,
    ) -> Detections:
        """Boxes for ``phrases`` in an ``(H, W, 3)`` uint8 RGB image."""
        ...


def select_detections(
    candidates: Candidates,
    phrases: Sequence[str],
    *,
    box_threshold: float,
    text_threshold: float,
    nms_iou: float | None = 0.5,
    cross_phrase_iou: float | None = 0.85,
    max_boxes: int | None = 20,
) -> Detections:
    """Choose the detections among a detector's candidates.

    A candidate is kept when its box score exceeds ``box_threshold``, its best phrase score
    exceeds ``text_threshold`` (it is then labelled with that phrase) and its box has an area.
    Duplicates go next: within a phrase, a box overlapping a better one by IoU > ``nms_iou``;
    across phrases, one overlapping a better box of another phrase by IoU > ``cross_phrase_iou``
    (the same object named twice). The best ``max_boxes`` remain.

    Parameters
    ----------
    candidates : Candidates
    phrases : sequence of str, length P
    box_threshold, text_threshold : float
        In 0..1.
    nms_iou, cross_phrase_iou : float or None
        None keeps the duplicates.
    max_boxes : int or None
        None keeps all.

    Returns
    -------
    Detections
    """
    from napari_sam.amg_utils import batched_nms, nms

    for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in 0..1, got {value}")
    if max_boxes is not None and max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1 or None, got {max_boxes}")
    boxes = np.asarray(candidates.boxes, dtype=np.float64).reshape(-1, 4)
    phrase_scores = np.asarray(candidates.phrase_scores, dtype=np.float64)
    if phrase_scores.shape != (len(boxes), len(phrases)):
        raise ValueError(
            f"phrase_scores has shape {phrase_scores.shape}; expected {(len(boxes), len(phrases))}"
        )
    box_scores = np.asarray(candidates.box_scores, dtype=np.float64).reshape(-1)
    best_phrase = phrase_scores.argmax(axis=1) if len(phrases) else np.zeros(len(boxes), int)
    best_score = phrase_scores.max(axis=1, initial=0.0)
    keep = (
        (box_scores > box_threshold)
        & (best_score > text_threshold)
        & (boxes[:, 2] > boxes[:, 0])
        & (boxes[:, 3] > boxes[:, 1])
    )
    index = np.flatnonzero(keep)
    index = index[np.argsort(-box_scores[index], kind="stable")]
    if len(index) and (nms_iou is not None or cross_phrase_iou is not None):
        t_boxes = torch.as_tensor(boxes[index])
        t_scores = torch.as_tensor(box_scores[index])
        order = torch.arange(len(index))
        if nms_iou is not None:
            order = batched_nms(t_boxes, t_scores, torch.as_tensor(best_phrase[index]), nms_iou)
        if cross_phrase_iou is not None:
            order = order[nms(t_boxes[order], t_scores[order], cross_phrase_iou)]
        index = index[np.sort(order.numpy())]  # back to best-first
    if max_boxes is not None:
        index = index[:max_boxes]
    return Detections(
        boxes=boxes[index].copy(),
        scores=box_scores[index].copy(),
        phrases=tuple(phrases[i] for i in best_phrase[index]),
    )


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"text prompts need the transformers package: {INSTALL_HINT}") from exc
    return transformers


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"a detector reads an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}; "
            "convert it first (e.g. napari_sam.predictor.default_to_uint8)"
        )
    if min(image.shape[:2]) < 1:
        raise ValueError(f"the image is empty (shape {image.shape})")
    return np.ascontiguousarray(image)


def _xyxy_pixels(
    cxcywh: torch.Tensor, scale_x: float, scale_y: float, h: int, w: int
) -> np.ndarray:
    """Normalised centre boxes -> pixel corners clipped to an ``h x w`` image."""
    c = cxcywh.double().cpu().numpy().reshape(-1, 4)
    x0 = (c[:, 0] - c[:, 2] / 2) * scale_x
    y0 = (c[:, 1] - c[:, 3] / 2) * scale_y
    x1 = (c[:, 0] + c[:, 2] / 2) * scale_x
    y1 = (c[:, 1] + c[:, 3] / 2) * scale_y
    boxes = np.stack([x0, y0, x1, y1], axis=1)
    return np.clip(boxes, 0.0, np.array([w, h, w, h], dtype=np.float64))


class TransformersDetector:
    """A ``transformers`` detection model with its image processor and tokenizer.

    Subclasses say how one image and its phrases become :class:`Candidates`
    (:meth:`candidates`); thresholds, NMS and the box limit are :func:`select_detections`'.

    Parameters
    ----------
    model : transformers PreTrainedModel
        Put in eval mode; kept on its device.
    image_processor, tokenizer
        The model's, from the same folder or repository.
    box_threshold, text_threshold : float, optional
        Defaults: the class's (the values its authors suggest).
    nms_iou, cross_phrase_iou, max_boxes
        As in :func:`select_detections`.
    """

    model_type: ClassVar[str] = ""
    default_source: ClassVar[str] = ""
    default_box_threshold: ClassVar[float] = 0.35
    default_text_threshold: ClassVar[float] = 0.25

    def __init__(
        self,
        model: Any,
        image_processor: Any,
        tokenizer: Any,
        *,
        box_threshold: float | None = None,
        text_threshold: float | None = None,
        nms_iou: float | None = 0.5,
        cross_phrase_iou: float | None = 0.85,
        max_boxes: int | None = 20,
    ) -> None:
        self.model = model.eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.box_threshold = (
            self.default_box_threshold if box_threshold is None else float(box_threshold)
        )
        self.text_threshold = (
            self.default_text_threshold if text_threshold is None else float(text_threshold)
        )
        self.nms_iou = nms_iou
        self.cross_phrase_iou = cross_phrase_iou
        self.max_boxes = max_boxes

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike | None = None,
        *,
        revision: str | None = None,
        device: str | torch.device = "auto",
        **options: Any,
    ) -> Self:
        """Load the model, image processor and tokenizer from a Hub repository or a folder.

        Parameters
        ----------
        source : str or path, optional
            A Hub repository id (default :attr:`default_source`; downloaded once into the Hub
            cache, which then serves it offline, e.g. with ``HF_HUB_OFFLINE=1``) or a folder
            written by ``save_pretrained``.
        revision : str, optional
            A branch, tag or commit of the repository.
        device : str or torch.device
            ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``...
        **options
            Thresholds and selection settings (see the class).
        """
        from napari_sam.weights import WeightsUnavailableError, resolve_device

        tf = _transformers()
        source = str(source or cls.default_source)
        kwargs = {"revision": revision} if revision else {}
        try:
            config = tf.AutoConfig.from_pretrained(source, **kwargs)
            if config.model_type != cls.model_type:
                raise ValueError(
                    f"{source} holds a {config.model_type!r} model; {cls.__name__} reads "
                    f"{cls.model_type!r} models (load_detector picks the class itself)"
                )
            model = cls._model_class(tf).from_pretrained(source, **kwargs)
            # The PIL backend: transformers' default backend would import torchvision.
            backend = {"backend": "pil"} if int(tf.__version__.split(".")[0]) >= 5 else {}
            image_processor = tf.AutoImageProcessor.from_pretrained(source, **backend, **kwargs)
            tokenizer = tf.AutoTokenizer.from_pretrained(source, **kwargs)
        except OSError as exc:
            raise WeightsUnavailableError(
                f"cannot load the text detector {source!r}: {exc}\nDownload it once with network "
                "access (it is then kept in the Hugging Face cache and works offline) or pass "
                "a local folder written by save_pretrained."
            ) from None
        model.to(resolve_device(device))
        return cls(model, image_processor, tokenizer, **options)

    @staticmethod
    def _model_class(tf: Any) -> Any:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def candidates(self, image: np.ndarray, phrases: Sequence[str] | str) -> Candidates:
        """Every query slot's box and scores for an ``(H, W, 3)`` uint8 RGB image."""
        image = _check_rgb(image)
        phrases = parse_prompt(phrases)
        with torch.inference_mode():
            return self._candidates(image, phrases)

    def _candidates(self, image: np.ndarray, phrases: list[str]) -> Candidates:
        raise NotImplementedError

    def detect(
        self,
        image: np.ndarray,
        phrases: Sequence[str] | str,
        *,
        box_threshold: float | None = None,
        text_threshold: float | None = None,
    ) -> Detections:
        """Boxes for phrases in an image.

        Parameters
        ----------
        image : ndarray of uint8, shape (H, W, 3)
            RGB.
        phrases : str or sequence of str
            Parsed with :func:`~napari_sam.text.parse_prompt` (``"liver. kidney."`` works).
        box_threshold, text_threshold : float, optional
            Override this detector's thresholds for one call.

        Returns
        -------
        Detections
            Boxes in pixels of ``image``.
        """
        phrases = parse_prompt(phrases)
        found = self.candidates(image, phrases)
        return select_detections(
            found,
            phrases,
            box_threshold=self.box_threshold if box_threshold is None else box_threshold,
            text_threshold=self.text_threshold if text_threshold is None else text_threshold,
            nms_iou=self.nms_iou,
            cross_phrase_iou=self.cross_phrase_iou,
            max_boxes=self.max_boxes,
        )

    def __repr__(self) -> str:
        name = getattr(self.model.config, "_name_or_path", "") or self.model_type
        return (
            f"{type(self).__name__}({name!r}, box_threshold={self.box_threshold}, "
            f"text_threshold={self.text_threshold})"
        )


class GroundingDinoDetector(TransformersDetector):
    """Grounding DINO: one text of phrases ("liver. kidney."), a score per token and query.

    A query's box score is its highest token score over the whole text (as Grounding DINO
    reports it); its score for a phrase is the highest over that phrase's tokens. With real
    weights, 0.35 / 0.25 are the usual thresholds.
    """

    model_type = "grounding-dino"
    default_source = "IDEA-Research/grounding-dino-tiny"
    default_box_threshold = 0.35
    default_text_threshold = 0.25

    @staticmethod
    def _model_class(tf: Any) -> Any:
        return tf.GroundingDinoForObjectDetection

    def _tokens(self, phrases: Sequence[str]) -> tuple[Any, np.ndarray]:
        """Tokenise the text; also return, per phrase, a boolean mask over its tokens."""
        text = " ".join(phrases)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("Grounding DINO needs a fast tokenizer (tokenizer.json) to map tokens")
        enc = self.tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping")[0].numpy()
        limit = self.model.config.max_text_len
        if enc["input_ids"].shape[1] > limit:
            raise ValueError(
                f"the text prompt is {enc['input_ids'].shape[1]} tokens long; this detector "
                f"reads at most {limit}: use fewer or shorter phrases"
            )
        masks = np.zeros((len(phrases), len(offsets)), dtype=bool)
        start = 0
        for i, phrase in enumerate(phrases):
            end = start + len(phrase) - 1  # the phrase's words, without its "."
            masks[i] = (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > 0)
            start += len(phrase) + 1
        empty = [p for p, m in zip(phrases, masks) if not m.any()]
        if empty:
            raise ValueError(f"the tokenizer gives no tokens for the phrases {empty}")
        return enc, masks

    def _candidates(self, image: np.ndarray, phrases: list[str]) -> Candidates:
        enc, token_masks = self._tokens(phrases)
        pixels = self.image_processor(images=image, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in {**enc, **pixels}.items()}
        out = self.model(**inputs)
        n = enc["input_ids"].shape[1]
        probs = out.logits[0, :, :n].sigmoid().double().cpu().numpy()  # (Q, tokens)
        phrase_scores = np.stack([probs[:, m].max(axis=1) for m in token_masks], axis=1)
        h, w = image.shape[:2]
        # Boxes are relative to the resized image, which spans the whole original one.
        boxes = _xyxy_pixels(out.pred_boxes[0], w, h, h, w)
        return Candidates(boxes, probs.max(axis=1), phrase_scores)


class Owlv2Detector(TransformersDetector):
    """OWLv2: each phrase is its own text query; one score per query and phrase.

    The box score is the best phrase score, so ``text_threshold`` only matters above
    ``box_threshold``. OWLv2's scores run lower than Grounding DINO's: 0.1 is the usual box
    threshold with real weights.
    """

    model_type = "owlv2"
    default_source = "google/owlv2-base-patch16-ensemble"
    default_box_threshold = 0.1
    default_text_threshold = 0.1

    @staticmethod
    def _model_class(tf: Any) -> Any:
        return tf.Owlv2ForObjectDetection

    def _candidates(self, image: np.ndarray, phrases: list[str]) -> Candidates:
        queries = [p.rstrip(".") for p in phrases]
        length = self.model.config.text_config.max_position_embeddings
        for query, ids in zip(queries, self.tokenizer(queries)["input_ids"]):
            if len(ids) > length:
                raise ValueError(
                    f"the phrase {query!r} is {len(ids)} tokens long; OWLv2 reads at most "
                    f"{length} per phrase: shorten it"
                )
        enc = self.tokenizer(queries, padding="max_length", max_length=length, return_tensors="pt")
        pixels = self.image_processor(images=image, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in {**enc, **pixels}.items()}
        out = self.model(**inputs)
        phrase_scores = out.logits[0].sigmoid().double().cpu().numpy()  # (Q, P)
        h, w = image.shape[:2]
        # OWLv2 pads the image to a square at the bottom and right before resizing: boxes are
        # relative to that square.
        side = max(h, w)
        boxes = _xyxy_pixels(out.pred_boxes[0], side, side, h, w)
        return Candidates(boxes, phrase_scores.max(axis=1), phrase_scores)


DETECTORS: dict[str, tuple[type[TransformersDetector], str]] = {
    "grounding-dino-tiny": (GroundingDinoDetector, "IDEA-Research/grounding-dino-tiny"),
    "grounding-dino-base": (GroundingDinoDetector, "IDEA-Research/grounding-dino-base"),
    "owlv2": (Owlv2Detector, "google/owlv2-base-patch16-ensemble"),
}
"""Short names accepted by :func:`load_detector`: class and Hub repository."""


def load_detector(
    source: str | os.PathLike = "grounding-dino-tiny",
    *,
    revision: str | None = None,
    device: str | torch.device = "auto",
    **options: Any,
) -> TransformersDetector:
    """Load a text detector by short name, Hub repository id or folder.

    Parameters
    ----------
    source : str or path
        A name in :data:`DETECTORS` (``"grounding-dino-tiny"``, the default; ``"owlv2"``), a Hub
        repository id, or a folder written by ``save_pretrained``. For the last two the class
        follows the ``model_type`` in its ``config.json``.
    revision : str, optional
        Branch, tag or commit of a Hub repository.
    device : str or torch.device
    **options
        ``box_threshold``, ``text_threshold``, ``nms_iou``, ``cross_phrase_iou``, ``max_boxes``.

    Raises
    ------
    ImportError
        Without transformers (``pip install 'napari-sam-volumes[text]'``).
    ValueError
        For a model type that is not a supported detector.
    napari_sam.weights.WeightsUnavailableError
        When the model is neither cached nor downloadable.
    """
    from napari_sam.weights import WeightsUnavailableError

    name = str(source)
    if name in DETECTORS:
        cls, repo = DETECTORS[name]
        return cls.from_pretrained(repo, revision=revision, device=device, **options)
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(name, **({"revision": revision} if revision else {}))
    except OSError as exc:
        known = ", ".join(DETECTORS)
        raise WeightsUnavailableError(
            f"cannot load the text detector {name!r} (not one of {known}, and no folder or "
            f"cached Hub repository of that name): {exc}"
        ) from None
    by_type = {cls.model_type: cls for cls, _ in DETECTORS.values()}
    if config.model_type not in by_type:
        raise ValueError(
            f"{name} holds a {config.model_type!r} model, not a supported text detector "
            f"(model types: {', '.join(sorted(by_type))})"
        )
    return by_type[config.model_type].from_pretrained(
        name, revision=revision, device=device, **options
    )

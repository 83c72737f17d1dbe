"""Automatic mask generation: segment everything in an image from a grid of point prompts.

:class:`SamAutomaticMaskGenerator` is a drop-in for Meta's generator (same parameters, defaults
and output records) with four differences that change no mask:

- The ~1000 grid prompts are decoded by the fast decoder
  (:class:`~napari_sam.speed.decoder.FastMaskDecoder`, made from the model's own decoder when
  that is the exact one): all prompts share one embedding, so the first layer's image side is
  computed once per crop, and the rest is reassociated around the prompt tokens (same
  function, less than half the arithmetic).
- Masks are upscaled to image resolution only after the predicted-IoU filter, which needs no
  pixels; the reference upscales every candidate first.
- A cached embedding of the whole image can be passed to :meth:`~SamAutomaticMaskGenerator.generate`
  so the encoder does not run again; any dtype and channel count is accepted (``to_uint8``).
- Neither OpenCV nor pycocotools is needed (see :mod:`napari_sam.amg_utils`).

:func:`segment_everything` turns the masks into one label image for a napari Labels layer.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_sam.amg_utils import (
    area_from_rle,
    batched_mask_to_box,
    batched_nms,
    box_area,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_decode_rle,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle,
    remove_small_regions,
    rle_to_mask,
)
from napari_sam.models.sam import Sam
from napari_sam.predictor import SamPredictor, _check_image, encode_image
from napari_sam.speed.decoder import FastMaskDecoder

__all__ = [
    "AmgProgress",
    "SamAutomaticMaskGenerator",
    "iter_segment_everything",
    "masks_to_labels",
    "segment_everything",
]

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")

# Float32 logits of the candidate masks upscaled at once stay under this many bytes (the
# reference upscales a whole batch: 0.8 GB for 192 masks of a 512 x 512 image).
_UPSCALE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class AmgProgress:
    """Progress of mask generation: ``done`` of ``total`` steps (encoder runs, prompt batches)."""

    done: int
    total: int
    stage: str


def _run(steps: Generator) -> Any:
    """Drive a step generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _take(data: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """Rows ``keep`` (bool mask or indices) of every column of a table of candidates."""
    out = {}
    for key, value in data.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[keep.to(value.device)]
        elif isinstance(value, np.ndarray):
            out[key] = value[keep.cpu().numpy()]
        else:
            idx = torch.nonzero(keep).flatten() if keep.dtype == torch.bool else keep
            out[key] = [value[i] for i in idx.tolist()]
    return out


def _concat(tables: list[dict[str, Any]]) -> dict[str, Any]:
    keys = tables[0].keys()
    out = {}
    for key in keys:
        parts = [t[key] for t in tables]
        if isinstance(parts[0], torch.Tensor):
            out[key] = torch.cat(parts)
        elif isinstance(parts[0], np.ndarray):
            out[key] = np.concatenate(parts)
        else:
            out[key] = [item for part in parts for item in part]
    return out


def _empty_table(device: torch.device) -> dict[str, Any]:
    return {
        "rles": [],
        "boxes": torch.zeros(0, 4, dtype=torch.int64, device=device),
        "iou_preds": torch.zeros(0, device=device),
        "points": torch.zeros(0, 2, dtype=torch.float64),
        "stability_score": torch.zeros(0, device=device),
    }


class SamAutomaticMaskGenerator:
    """Generate masks for everything in an image from a grid of point prompts.

    Parameters
    ----------
    model : Sam
        The model; a :class:`~napari_sam.predictor.SamPredictor` is accepted too (its model and
        ``to_uint8`` are used; its current image is left alone).
    points_per_side : int or None
        The prompt grid has ``points_per_side**2`` points; None if ``point_grids`` is given.
    points_per_batch : int
        Prompts decoded together in one decoder call.
    pred_iou_thresh : float
        Keep masks whose predicted IoU is above this (0 disables the filter).
    stability_score_thresh : float
        Keep masks whose stability score is at least this (0 disables the filter).
    stability_score_offset : float
        Logit offset of the stability score.
    box_nms_thresh : float
        Box IoU above which the lower-scoring of two masks of one crop is dropped.
    crop_n_layers : int
        Also run on ``(2**i)**2`` crops for each layer ``i = 1..crop_n_layers``.
    crop_nms_thresh : float
        Box IoU above which duplicates across crops are dropped (smaller crops win).
    crop_overlap_ratio : float
        Overlap of first-layer crops as a fraction of the image's short side.
    crop_n_points_downscale_factor : int
        Layer ``i`` uses ``points_per_side / factor**i`` points per side.
    point_grids : list of ndarray or None
        Explicit ``N x 2`` grids in [0, 1] (x, y), one per layer; excludes ``points_per_side``.
    min_mask_region_area : int
        If > 0, fill holes and remove islands smaller than this many pixels.
    output_mode : {"binary_mask", "uncompressed_rle", "coco_rle"}
        Form of each record's ``segmentation``.
    to_uint8 : callable, optional
        Converts the image to ``H x W x 3`` uint8 (default: the predictor's min-max).

    Attributes
    ----------
    decoder : nn.Module
        What decodes the prompt grid: the model's mask decoder, or its fast twin when that is
        SAM's exact decoder (same weights, same masks up to float rounding).
    """

    def __init__(
        self,
        model: Sam | SamPredictor,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        to_uint8: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        if isinstance(model, SamPredictor):
            to_uint8 = to_uint8 or model.to_uint8
            model = model.model
        if (points_per_side is None) == (point_grids is None):
            raise ValueError(
                "give exactly one of points_per_side (a regular grid) or point_grids "
                "(explicit grids, one per crop layer)"
            )
        if crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
        if points_per_side is not None:
            if points_per_side < 1:
                raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
            if crop_n_points_downscale_factor < 1:
                raise ValueError(
                    "crop_n_points_downscale_factor must be >= 1, got "
                    f"{crop_n_points_downscale_factor}"
                )
            if int(points_per_side / crop_n_points_downscale_factor**crop_n_layers) < 1:
                raise ValueError(
                    f"points_per_side={points_per_side} leaves no points in crop layer "
                    f"{crop_n_layers} after downscaling by {crop_n_points_downscale_factor} per "
                    "layer; use more points or fewer layers"
                )
            grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
            if len(grids) < crop_n_layers + 1:
                raise ValueError(
                    f"point_grids has {len(grids)} grid(s) but crop_n_layers={crop_n_layers} "
                    f"needs {crop_n_layers + 1} (one per layer, the whole image first)"
                )
            for g in grids:
                if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0:
                    raise ValueError(
                        f"each point grid must be a non-empty N x 2 array of (x, y) in [0, 1], "
                        f"got shape {g.shape}"
                    )
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
        if min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area must be >= 0, got {min_mask_region_area}")

        self.point_grids = grids
        self.predictor = SamPredictor(model, to_uint8=to_uint8)
        self.decoder = _grid_decoder(self.predictor.model.mask_decoder)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    # -- public API -----------------------------------------------------------------------------

    def generate(
        self, image: np.ndarray, embedding: torch.Tensor | np.ndarray | None = None
    ) -> list[dict[str, Any]]:
        """Generate masks for an image.

        Parameters
        ----------
        image : ndarray, shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), any dtype
            Converted with ``to_uint8`` (uint8 RGB is used as is).
        embedding : Tensor or ndarray, shape (1, 256, E, E), optional
            The whole image's embedding (e.g. from an embedding cache or
            ``predictor.get_image_embedding()``), computed from the same uint8 image; skips the
            encoder for the whole-image crop. Crops of deeper layers are always encoded.

        Returns
        -------
        list of dict
            One record per mask: ``segmentation`` (H x W bool, or RLE dict by
            ``output_mode``), ``area`` (int), ``bbox`` (XYWH), ``predicted_iou``,
            ``point_coords`` ([[x, y]]), ``stability_score``, ``crop_box`` (XYWH).
        """
        return _run(self.iter_generate(image, embedding=embedding))

    def iter_generate(
        self, image: np.ndarray, embedding: torch.Tensor | np.ndarray | None = None
    ) -> Generator[AmgProgress, None, list[dict[str, Any]]]:
        """:meth:`generate` as a generator: yields :class:`AmgProgress`, returns the records.

        Stopping the iteration early cancels the work between two decoder calls.
        """
        rgb = self._to_rgb(image)
        data = yield from self._generate_masks(rgb, embedding)
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(
                data,
                self.min_mask_region_area,
                max(self.box_nms_thresh, self.crop_nms_thresh),
            )
        return self._records(data)

    # -- pipeline -------------------------------------------------------------------------------

    def _to_rgb(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        rgb = self.predictor.to_uint8(image)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise ValueError(
                f"to_uint8 must return an HxWx3 uint8 array, got {rgb.dtype} {rgb.shape}"
            )
        return rgb

    def _generate_masks(
        self, rgb: np.ndarray, embedding: torch.Tensor | np.ndarray | None
    ) -> Generator[AmgProgress, None, dict[str, Any]]:
        orig_size = rgb.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(
            orig_size, self.crop_n_layers, self.crop_overlap_ratio
        )
        batches = [
            -(-len(self.point_grids[layer]) // self.points_per_batch) for layer in layer_idxs
        ]
        total = len(crop_boxes) + sum(batches)
        done = 0
        tables = []
        for crop_box, layer in zip(crop_boxes, layer_idxs):
            steps = self._process_crop(
                rgb, crop_box, layer, orig_size, embedding if layer == 0 else None
            )
            while True:
                try:
                    stage = next(steps)
                except StopIteration as finished:
                    tables.append(finished.value)
                    break
                done += 1
                yield AmgProgress(done, total, stage)

        data = _concat(tables)
        if len(crop_boxes) > 1 and len(data["rles"]):
            # Duplicates across crops: the mask from the smaller crop wins.
            scores = 1 / box_area(data["crop_boxes"]).float()
            keep = batched_nms(
                data["boxes"].float(),
                scores,
                torch.zeros(len(scores), dtype=torch.int64),
                self.crop_nms_thresh,
            )
            data = _take(data, keep)
        return data

    def _process_crop(
        self,
        rgb: np.ndarray,
        crop_box: list[int],
        layer: int,
        orig_size: tuple[int, int],
        embedding: torch.Tensor | np.ndarray | None,
    ) -> Generator[str, None, dict[str, Any]]:
        x0, y0, x1, y1 = crop_box
        crop = rgb[y0:y1, x0:x1]
        crop_size = crop.shape[:2]
        predictor = self.predictor
        if embedding is not None:
            predictor.set_image_embedding(embedding, crop_size)
        else:
            # Not set_image: a custom to_uint8 must not run twice.
            features, input_size = encode_image(predictor.model, np.ascontiguousarray(crop))
            predictor.set_image_embedding(features, crop_size, input_size)
        yield "encode"

        # Grid points in pixels of the crop.
        points = self.point_grids[layer] * np.array(crop_size, dtype=np.float64)[None, ::-1]
        tables = []
        for start in range(0, len(points), self.points_per_batch):
            batch = points[start : start + self.points_per_batch]
            tables.append(self._process_batch(batch, crop_size, crop_box, orig_size))
            yield "decode"
        predictor.reset_image()

        data = _concat(tables)
        keep = batched_nms(
            data["boxes"].float(),
            data["iou_preds"],
            torch.zeros(len(data["boxes"]), dtype=torch.int64),
            self.box_nms_thresh,
        )
        data = _take(data, keep)
        # Back to the whole image's frame.
        data["boxes"] = data["boxes"] + torch.tensor([x0, y0, x0, y0], device=data["boxes"].device)
        data["points"] = data["points"] + torch.tensor([x0, y0], dtype=torch.float64)
        data["crop_boxes"] = torch.tensor(
            [crop_box] * len(data["rles"]), dtype=torch.int64
        ).reshape(-1, 4)
        return data

    @torch.no_grad()
    def _process_batch(
        self,
        points: np.ndarray,
        crop_size: tuple[int, int],
        crop_box: list[int],
        orig_size: tuple[int, int],
    ) -> dict[str, Any]:
        predictor = self.predictor
        model = predictor.model
        device = predictor.device
        coords = predictor.transform.apply_coords(points, crop_size)
        coords_t = torch.as_tensor(coords, dtype=torch.float, device=device)[:, None, :]
        labels_t = torch.ones(coords_t.shape[:2], dtype=torch.int, device=device)
        sparse, dense = model.prompt_encoder(points=(coords_t, labels_t), boxes=None, masks=None)
        # One embedding and the no-mask dense prompt for all points: the fast decoder shares
        # the image side between them.
        low_res, iou_preds = self.decoder(
            image_embeddings=predictor.features,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        n_masks = low_res.shape[1]
        low_res = low_res.flatten(0, 1)
        iou_preds = iou_preds.flatten(0, 1)
        point_rows = torch.as_tensor(np.repeat(points, n_masks, axis=0))

        # The predicted IoU needs no pixels: filter before the costly upscaling.
        if self.pred_iou_thresh > 0.0:
            keep = iou_preds > self.pred_iou_thresh
            low_res, iou_preds, point_rows = low_res[keep], iou_preds[keep], point_rows[keep.cpu()]

        orig_h, orig_w = orig_size
        x0, y0, x1, y1 = crop_box
        tables = [_empty_table(device)]
        side = model.image_size
        per_mask = 4 * max(side * side, crop_size[0] * crop_size[1])
        step = max(1, min(32, _UPSCALE_BYTES // per_mask))
        for start in range(0, len(low_res), step):
            chunk = slice(start, start + step)
            logits = model.postprocess_masks(low_res[chunk, None], predictor.input_size, crop_size)[
                :, 0
            ]
            stability = calculate_stability_score(
                logits, model.mask_threshold, self.stability_score_offset
            )
            keep = torch.ones(len(logits), dtype=torch.bool, device=logits.device)
            if self.stability_score_thresh > 0.0:
                keep &= stability >= self.stability_score_thresh
            masks = logits > model.mask_threshold
            boxes = batched_mask_to_box(masks)
            keep &= ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
            if not keep.any():
                continue
            masks = masks[keep]
            if (x0, y0, x1, y1) != (0, 0, orig_w, orig_h):
                full = masks.new_zeros((len(masks), orig_h, orig_w))
                full[:, y0:y1, x0:x1] = masks
                masks = full
            tables.append(
                {
                    "rles": mask_to_rle(masks),
                    "boxes": boxes[keep],
                    "iou_preds": iou_preds[chunk][keep],
                    "points": point_rows[chunk][keep.cpu()],
                    "stability_score": stability[keep],
                }
            )
        return _concat(tables)

    @staticmethod
    @torch.no_grad()
    def postprocess_small_regions(
        mask_data: dict[str, Any], min_area: int, nms_thresh: float
    ) -> dict[str, Any]:
        """Fill small holes and remove small islands, then drop new duplicates by box NMS.

        Masks left unchanged by the clean-up win over changed ones in the NMS.
        """
        if len(mask_data["rles"]) == 0:
            return mask_data
        masks = []
        unchanged = []
        for rle in mask_data["rles"]:
            mask, holes_changed = remove_small_regions(rle_to_mask(rle), min_area, "holes")
            mask, islands_changed = remove_small_regions(mask, min_area, "islands")
            masks.append(torch.as_tensor(mask))
            unchanged.append(not (holes_changed or islands_changed))
        boxes = batched_mask_to_box(torch.stack(masks))
        scores = torch.tensor(unchanged, dtype=torch.float32)
        keep = batched_nms(
            boxes.float(), scores, torch.zeros(len(boxes), dtype=torch.int64), nms_thresh
        )
        rles = list(mask_data["rles"])
        new_boxes = mask_data["boxes"].clone()
        for i in keep.tolist():
            if not unchanged[i]:
                rles[i] = mask_to_rle(masks[i][None])[0]
                new_boxes[i] = boxes[i].to(new_boxes)
        out = dict(mask_data)
        out["rles"] = rles
        out["boxes"] = new_boxes
        return _take(out, keep)

    def _records(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if not data.get("rles"):
            return []
        if self.output_mode == "coco_rle":
            segmentations = [coco_encode_rle(rle) for rle in data["rles"]]
        elif self.output_mode == "binary_mask":
            segmentations = [rle_to_mask(rle) for rle in data["rles"]]
        else:
            segmentations = data["rles"]
        boxes = box_xyxy_to_xywh(data["boxes"]).cpu().numpy()
        crop_boxes = box_xyxy_to_xywh(data["crop_boxes"]).cpu().numpy()
        ious = data["iou_preds"].float().cpu().numpy()
        stabilities = data["stability_score"].float().cpu().numpy()
        points = data["points"].cpu().numpy()
        return [
            {
                "segmentation": segmentation,
                "area": area_from_rle(rle),
                "bbox": boxes[i].tolist(),
                "predicted_iou": float(ious[i]),
                "point_coords": [points[i].tolist()],
                "stability_score": float(stabilities[i]),
                "crop_box": crop_boxes[i].tolist(),
            }
            for i, (segmentation, rle) in enumerate(zip(segmentations, data["rles"]))
        ]


def _grid_decoder(mask_decoder: nn.Module) -> nn.Module:
    """The decoder that runs the prompt grid.

    The fast twin of SAM's exact mask decoder (sharing its weights); a fast decoder, or a
    decoder of any other kind (a subclass too), as it is.
    """
    if FastMaskDecoder.accepts(mask_decoder):
        return FastMaskDecoder.from_exact(mask_decoder)
    return mask_decoder


# -- labels for napari ---------------------------------------------------------------------------


def masks_to_labels(records: list[dict[str, Any]], shape: tuple[int, int]) -> np.ndarray:
    """Paint mask records into one label image, largest first so small masks stay visible.

    Label ``k`` (1-based) is the ``k``-th largest mask; where masks overlap, the smaller one
    wins. Masks whose pixels are all covered by smaller ones leave their label unused.

    Parameters
    ----------
    records : list of dict
        Output of :meth:`SamAutomaticMaskGenerator.generate` in any output mode.
    shape : (H, W)

    Returns
    -------
    ndarray of int32, shape (H, W)
        0 where no mask lies.
    """
    labels = np.zeros(shape, dtype=np.int32)
    order = sorted(range(len(records)), key=lambda i: -records[i]["area"])
    for label, i in enumerate(order, start=1):
        labels[_record_mask(records[i]["segmentation"])] = label
    return labels


def _record_mask(segmentation: Any) -> np.ndarray:
    if isinstance(segmentation, np.ndarray):
        return segmentation
    if isinstance(segmentation.get("counts"), (str, bytes)):
        segmentation = coco_decode_rle(segmentation)
    return rle_to_mask(segmentation)


def iter_segment_everything(
    predictor_or_model: Sam | SamPredictor,
    image: np.ndarray,
    embedding: torch.Tensor | np.ndarray | None = None,
    **amg_kwargs: Any,
) -> Generator[AmgProgress, None, np.ndarray]:
    """:func:`segment_everything` as a generator for a worker thread (progress, cancel).

    Yields :class:`AmgProgress` per encoder run and decoder batch; returns the label image.
    """
    generator = SamAutomaticMaskGenerator(predictor_or_model, **amg_kwargs)
    records = yield from generator.iter_generate(image, embedding=embedding)
    return masks_to_labels(records, np.shape(image)[:2])


def segment_everything(
    predictor_or_model: Sam | SamPredictor,
    image: np.ndarray,
    embedding: torch.Tensor | np.ndarray | None = None,
    **amg_kwargs: Any,
) -> np.ndarray:
    """Segment everything in a 2-D image into one label image.

    Parameters
    ----------
    predictor_or_model : SamPredictor or Sam
        With a predictor, its model and ``to_uint8`` (e.g. a CT window) are used; its current
        image is not touched. To reuse the embedding it holds for this very image, pass
        ``embedding=predictor.get_image_embedding()``.
    image : ndarray, shape (H, W) or (H, W, C), any dtype
    embedding : Tensor or ndarray, shape (1, 256, E, E), optional
        Cached embedding of ``image`` (after ``to_uint8``): skips the encoder.
    **amg_kwargs
        Parameters of :class:`SamAutomaticMaskGenerator` (``points_per_side``,
        ``pred_iou_thresh``, ...).

    Returns
    -------
    ndarray of int32, shape (H, W)
        0 = background, ``k`` = the ``k``-th largest mask (see :func:`masks_to_labels`).
    """
    return _run(iter_segment_everything(predictor_or_model, image, embedding, **amg_kwargs))

"""Building blocks of automatic mask generation: prompt grids, crops, scores, NMS, RLE.

Plain functions on arrays and tensors, each with the semantics of its counterpart in Meta's
``segment_anything.utils.amg`` so that :class:`~napari_sam.automatic.SamAutomaticMaskGenerator`
produces the same masks. Nothing here needs torchvision, OpenCV or pycocotools:

- :func:`batched_nms` is greedy non-maximum suppression with torchvision's rules (IoU strictly
  above the threshold suppresses, scores sorted descending with ties kept in input order, one
  suppression pass per category).
- :func:`remove_small_regions` labels 8-connected components with scikit-image.
- :func:`coco_encode_rle` writes the compressed COCO RLE string itself (pycocotools'
  ``frPyObjects`` on an uncompressed RLE gives the same string).

Conventions
-----------
Boxes are ``(x0, y0, x1, y1)`` with ``x1``/``y1`` the last pixel inside the mask (inclusive), as in
the reference. Uncompressed RLE is ``{"size": [H, W], "counts": [...]}`` over the mask in
column-major (Fortran) order, starting with a run of zeros (possibly empty).
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any

import numpy as np
import torch

__all__ = [
    "area_from_rle",
    "batched_mask_to_box",
    "batched_nms",
    "box_area",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "coco_decode_rle",
    "coco_encode_rle",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_rle",
    "nms",
    "remove_small_regions",
    "rle_to_mask",
]

# -- prompt grids and crops ------------------------------------------------------------------


def build_point_grid(n_per_side: int) -> np.ndarray:
    """Points at the centres of an ``n x n`` tiling of the unit square.

    Returns
    -------
    ndarray, shape (n * n, 2), float64
        ``(x, y)`` in [0, 1]; x varies fastest (row-major over the image).
    """
    if n_per_side < 1:
        raise ValueError(f"points per side must be >= 1, got {n_per_side}")
    half_step = 1.0 / (2 * n_per_side)
    ticks = np.linspace(half_step, 1.0 - half_step, n_per_side)
    xs, ys = np.meshgrid(ticks, ticks, indexing="xy")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """One point grid per crop layer; layer ``i`` has ``int(n / scale**i)`` points per side."""
    return [build_point_grid(int(n_per_side / scale_per_layer**i)) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, ...], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes of all layers: the whole image, then ``(2**i)**2`` overlapping crops in layer i.

    Parameters
    ----------
    im_size : (H, W)
    n_layers : int
        Number of crop layers below the whole image.
    overlap_ratio : float
        Overlap of neighbouring crops in layer 1 as a fraction of the image's short side; deeper
        layers halve it per layer.

    Returns
    -------
    boxes : list of [x0, y0, x1, y1]
        Integer pixel boxes (``x1``, ``y1`` exclusive), whole image first.
    layer_idxs : list of int
        The layer of each box.
    """
    im_h, im_w = int(im_size[0]), int(im_size[1])
    short_side = min(im_h, im_w)
    boxes: list[list[int]] = [[0, 0, im_w, im_h]]
    layers = [0]
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        # Crops of equal length whose union covers the side with the given overlap.
        crop_w = math.ceil((overlap * (per_side - 1) + im_w) / per_side)
        crop_h = math.ceil((overlap * (per_side - 1) + im_h) / per_side)
        x_starts = [int((crop_w - overlap) * i) for i in range(per_side)]
        y_starts = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0, y0 in product(x_starts, y_starts):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer)
    return boxes, layers


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: list[int], orig_box: list[int], atol: float = 20.0
) -> torch.Tensor:
    """Which boxes (in crop coordinates) touch a crop edge that is not an image edge.

    Parameters
    ----------
    boxes : Tensor, shape (N, 4)
        XYXY boxes relative to the crop's top-left corner.
    crop_box, orig_box : [x0, y0, x1, y1]
        The crop and the whole image in image coordinates.
    atol : float
        Distance in pixels that counts as touching.

    Returns
    -------
    Tensor of bool, shape (N,)
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    image = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    in_image = boxes.float() + crop[[0, 1, 0, 1]]
    near_crop = (in_image - crop).abs() <= atol
    near_image = (in_image - image).abs() <= atol
    return (near_crop & ~near_image).any(dim=1)


# -- scores and boxes ------------------------------------------------------------------------


def calculate_stability_score(
    masks: torch.Tensor, mask_threshold: float, threshold_offset: float
) -> torch.Tensor:
    """IoU of a mask's logits thresholded at ``threshold +- offset``.

    The high-threshold mask lies inside the low-threshold one, so the IoU is a ratio of areas.
    Empty masks give NaN (0 / 0), which fails any threshold.

    Parameters
    ----------
    masks : Tensor, shape (..., H, W)
        Logits.

    Returns
    -------
    Tensor of float32, shape (...)
    """
    inner = (masks > (mask_threshold + threshold_offset)).sum(dim=(-2, -1), dtype=torch.int32)
    outer = (masks > (mask_threshold - threshold_offset)).sum(dim=(-2, -1), dtype=torch.int32)
    return inner / outer


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (inclusive corners) of boolean masks; ``[0, 0, 0, 0]`` for empty masks.

    Parameters
    ----------
    masks : Tensor of bool, shape (..., H, W)

    Returns
    -------
    Tensor of int64, shape (..., 4)
    """
    h, w = masks.shape[-2:]
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, dtype=torch.int64, device=masks.device)
    rows = masks.any(dim=-1).to(torch.uint8)  # (..., H)
    cols = masks.any(dim=-2).to(torch.uint8)  # (..., W)
    # argmax returns the first maximum: the first occupied row / column from either end.
    top = rows.argmax(dim=-1)
    bottom = (h - 1) - rows.flip(-1).argmax(dim=-1)
    left = cols.argmax(dim=-1)
    right = (w - 1) - cols.flip(-1).argmax(dim=-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    empty = rows.amax(dim=-1) == 0
    return boxes.masked_fill(empty.unsqueeze(-1), 0)


def box_xyxy_to_xywh(box: Any) -> Any:
    """``(x0, y0, x1, y1)`` -> ``(x0, y0, width, height)``; a copy, same type as the input."""
    # Tensor or ndarray: both support the same indexing arithmetic.
    out: Any = box.clone() if isinstance(box, torch.Tensor) else np.array(box, copy=True)
    out[..., 2] = out[..., 2] - out[..., 0]
    out[..., 3] = out[..., 3] - out[..., 1]
    return out


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas ``(x1 - x0) * (y1 - y0)`` of ``N x 4`` XYXY boxes."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


# -- non-maximum suppression -----------------------------------------------------------------


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (torchvision's ``nms`` semantics).

    Boxes are visited by descending score (equal scores keep their input order); each kept box
    removes the later boxes whose IoU with it is strictly greater than ``iou_threshold``.

    Parameters
    ----------
    boxes : Tensor, shape (N, 4)
        XYXY boxes.
    scores : Tensor, shape (N,)
    iou_threshold : float

    Returns
    -------
    Tensor of int64, shape (K,)
        Indices of the kept boxes, by descending score.
    """
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    # float32 as torchvision computes it, so that IoUs right at the threshold agree.
    b = boxes[order].detach().to("cpu", torch.float32).numpy()
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = (x1 - x0) * (y1 - y0)
    n = len(b)
    removed = np.zeros(n, dtype=bool)
    kept = []
    for i in range(n):
        if removed[i]:
            continue
        kept.append(i)
        rest = slice(i + 1, n)
        iw = np.clip(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0, None)
        ih = np.clip(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0, None)
        inter = iw * ih
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        removed[rest] |= iou > iou_threshold
    return order[torch.as_tensor(kept, dtype=torch.int64, device=order.device)]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Non-maximum suppression within each category (torchvision's ``batched_nms``).

    Parameters
    ----------
    boxes : Tensor, shape (N, 4)
    scores : Tensor, shape (N,)
    idxs : Tensor, shape (N,)
        Category of each box; boxes of different categories never suppress each other.
    iou_threshold : float

    Returns
    -------
    Tensor of int64, shape (K,)
        Indices of the kept boxes, by descending score.
    """
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    kept = []
    for category in torch.unique(idxs):
        members = torch.nonzero(idxs == category).flatten()
        kept.append(members[nms(boxes[members], scores[members], iou_threshold)])
    keep = torch.cat(kept)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


# -- run-length encoding ---------------------------------------------------------------------


def mask_to_rle(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """Uncompressed COCO RLE of each mask.

    Parameters
    ----------
    masks : Tensor or ndarray of bool, shape (B, H, W)

    Returns
    -------
    list of dict
        ``{"size": [H, W], "counts": [int, ...]}`` per mask; runs alternate 0 / 1 over the
        column-major pixels and start with a (possibly empty) run of zeros.
    """
    masks = torch.as_tensor(masks)
    b, h, w = masks.shape
    # Column-major order as COCO stores masks.
    flat = masks.transpose(1, 2).reshape(b, h * w).to(torch.bool)
    if h * w == 0:
        return [{"size": [h, w], "counts": [0]} for _ in range(b)]
    mask_idx, before = torch.nonzero(flat[:, 1:] != flat[:, :-1], as_tuple=True)
    pos = (before + 1).cpu().numpy()
    splits = np.cumsum(torch.bincount(mask_idx, minlength=b).cpu().numpy())[:-1]
    starts_with_one = flat[:, 0].cpu().numpy()
    out = []
    for i, changes in enumerate(np.split(pos, splits)):
        edges = np.concatenate([[0], changes, [h * w]])
        runs = np.diff(edges).tolist()
        if starts_with_one[i]:
            runs.insert(0, 0)
        out.append({"size": [h, w], "counts": runs})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode an uncompressed RLE (see :func:`mask_to_rle`) into an ``H x W`` bool mask."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts add up to {counts.sum()}, expected H * W = {h * w}")
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T


def area_from_rle(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """Compress an uncompressed RLE into COCO's string form (as pycocotools does).

    From the fourth run on, each count is stored as the difference to the count two runs
    earlier; each number is written little-endian in 5-bit groups, a sixth bit flagging that
    more groups follow, each group shifted into printable ASCII by adding 48.

    Returns
    -------
    dict
        ``{"size": [H, W], "counts": str}``, ready for JSON.
    """
    counts = [int(c) for c in rle["counts"]]
    chars = []
    for i, value in enumerate(counts):
        if i > 2:
            value -= counts[i - 2]
        while True:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: negative differences end at -1
            more = value != -1 if group & 0x10 else value != 0
            chars.append(chr((group | 0x20 if more else group) + 48))
            if not more:
                break
    return {"size": [int(s) for s in rle["size"]], "counts": "".join(chars)}


def coco_decode_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """Expand a compressed COCO RLE (``counts`` a string) into an uncompressed one."""
    text = rle["counts"]
    if isinstance(text, bytes):
        text = text.decode("ascii")
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value = shift = 0
        while True:
            group = ord(text[pos]) - 48
            pos += 1
            value |= (group & 0x1F) << shift
            shift += 5
            if not group & 0x20:
                if group & 0x10:
                    value |= -1 << shift  # sign-extend
                break
            if pos >= len(text):
                raise ValueError("truncated COCO RLE string")
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return {"size": [int(s) for s in rle["size"]], "counts": counts}


# -- clean-up --------------------------------------------------------------------------------


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Fill small holes or drop small islands of a binary mask (8-connectivity).

    Parameters
    ----------
    mask : ndarray of bool, shape (H, W)
    area_thresh : float
        Regions with fewer pixels than this are small.
    mode : {"holes", "islands"}
        ``"holes"``: small background regions become foreground (the background around the
        mask counts as a region too). ``"islands"``: small foreground regions are removed; if
        every island is small, the largest one is kept.

    Returns
    -------
    mask : ndarray of bool, shape (H, W)
    changed : bool
    """
    from skimage.measure import label

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    mask = np.asarray(mask, dtype=bool)
    holes = mode == "holes"
    regions = label(mask ^ holes, connectivity=2)
    sizes = np.bincount(regions.ravel())[1:]  # label 0 is the complement
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    if holes:
        return mask | np.isin(regions, np.flatnonzero(small) + 1), True
    big = np.flatnonzero(~small) + 1
    if big.size == 0:
        big = np.array([np.argmax(sizes) + 1])
    return np.isin(regions, big), True

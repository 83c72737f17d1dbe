"""SamPredictor: one image embedding, many prompts — a drop-in for segment_anything's.

The image is encoded once (:meth:`SamPredictor.set_image`); each prompt then costs only the light
prompt encoder and mask decoder (:meth:`SamPredictor.predict`). Embeddings computed elsewhere (a
cache, another process) are installed with :meth:`SamPredictor.set_image_embedding`.

Everything is exact float32 by default, numerically equal to Meta's implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import ArrayLike

from napari_sam.transforms import ResizeLongestSide, transform_for

if TYPE_CHECKING:
    from napari_sam.models.sam import Sam

__all__ = ["SamPredictor", "check_prompts", "default_to_uint8", "encode_image", "image_to_rgb"]

ToUint8 = Callable[[np.ndarray], np.ndarray]


def _check_image(image: ArrayLike) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise ValueError(
            f"expected an image of shape HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}; "
            "for a volume, pass one slice (e.g. volume[z])"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"the image is empty (shape {image.shape}); both sides must be > 0")
    if image.dtype.kind not in "biuf":
        raise ValueError(f"unsupported image dtype {image.dtype}; expected integers or floats")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError(
            "the image contains NaN or infinite values; replace them first "
            "(e.g. np.nan_to_num(image)) or choose an intensity window"
        )
    return image


def default_to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert any image to ``H x W x 3`` uint8 RGB.

    uint8 is kept as is; every other dtype is scaled min-max to 0..255 over the whole image (all
    channels together). Grayscale is repeated into three channels; an alpha channel is dropped.

    Parameters
    ----------
    image : ndarray, shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)

    Returns
    -------
    ndarray of uint8, shape (H, W, 3)
    """
    image = _check_image(image)
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8:
        data = image.astype(np.float32)
        lo, hi = float(data.min()), float(data.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = np.clip(np.rint((data - lo) * scale), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image)


def image_to_rgb(
    image: np.ndarray, to_uint8: ToUint8, image_format: str = "RGB", model_format: str = "RGB"
) -> np.ndarray:
    """Check an image and convert it with ``to_uint8`` into the model's ``H x W x 3`` uint8 order.

    ``image_format`` names the channel order of a colour image ("RGB" or "BGR"); it is flipped
    when it differs from ``model_format``.
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    image = _check_image(image)
    rgb = to_uint8(image)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"to_uint8 must return an HxWx3 uint8 array, got {rgb.dtype} {rgb.shape}")
    if image.ndim == 3 and image_format != model_format:
        rgb = np.ascontiguousarray(rgb[..., ::-1])
    return rgb


def _input_tensor(
    transform: ResizeLongestSide, rgb: np.ndarray, device: torch.device | str
) -> torch.Tensor:
    """Resize an ``H x W x 3`` uint8 image into a ``1 x 3 x h x w`` uint8 tensor."""
    resized = transform.apply_image(rgb)
    return torch.as_tensor(resized, device=device).permute(2, 0, 1).contiguous()[None]


@torch.no_grad()
def encode_image(model: Sam, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """Encode one ``H x W x 3`` uint8 RGB image; a pure function of model and image.

    Returns
    -------
    embedding : Tensor, shape (1, 256, E, E), on the model's device
        ``E = spec.image_size // 16`` (64 for official models).
    input_size : (int, int)
        Size of the resized image inside the padded encoder frame.
    """
    tensor = _input_tensor(transform_for(model), image, model.device)
    embedding = model.image_encoder(model.preprocess(tensor))
    return embedding, (int(tensor.shape[-2]), int(tensor.shape[-1]))


def check_prompts(
    point_coords: ArrayLike | None,
    point_labels: ArrayLike | None,
    box: ArrayLike | None,
    mask_input: ArrayLike | None,
    image_size: tuple[int, int],
    low_res_side: int,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Validate one prompt set against an image.

    Parameters
    ----------
    point_coords : array_like, shape (N, 2), optional
        ``(x, y)`` pixels.
    point_labels : array_like, shape (N,), optional
    box : array_like, shape (4,), optional
    mask_input : array_like, shape (1, L, L) or (L, L), optional
    image_size : (int, int)
        ``(H, W)`` the points and box must lie in.
    low_res_side : int
        ``L``, the side of a mask input.

    Returns
    -------
    coords : ndarray, shape (N, 2), float64, or None
    labels : ndarray, shape (N,), or None
    box : ndarray, shape (1, 4), float64, or None
    mask : ndarray, shape (1, L, L), float32, or None

    Raises
    ------
    ValueError
        Saying what to change, for any bad prompt or none at all.
    """
    h, w = image_size
    coords = labels = boxes = masks = None
    if point_coords is not None and np.asarray(point_coords).size:
        coords = np.asarray(point_coords, dtype=np.float64)
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise ValueError(
                f"point_coords must be an Nx2 array of (x, y) pixels, got shape {coords.shape}"
            )
        if point_labels is None:
            raise ValueError("point_labels must be given with point_coords (1 = fg, 0 = bg)")
        labels = np.asarray(point_labels)
        if labels.shape != (len(coords),):
            raise ValueError(
                f"point_labels must have shape ({len(coords)},) to match point_coords, "
                f"got {labels.shape}"
            )
        if not np.isin(labels, (-1, 0, 1, 2, 3)).all():
            raise ValueError("point_labels must be 1 (foreground) or 0 (background)")
        if not np.isfinite(coords).all():
            raise ValueError("point_coords contain NaN or infinite values")
        outside = (coords[:, 0] < 0) | (coords[:, 0] > w) | (coords[:, 1] < 0) | (coords[:, 1] > h)
        if outside.any():
            x, y = coords[np.argmax(outside)]
            raise ValueError(
                f"point ({x:g}, {y:g}) lies outside the image (width {w}, height {h}); "
                "points are (x, y) in pixels of the original image"
            )
    elif point_labels is not None and np.asarray(point_labels).size:
        raise ValueError("point_labels were given without point_coords")
    if box is not None:
        boxes = np.asarray(box, dtype=np.float64)
        if boxes.size != 4:
            raise ValueError(
                f"box must be 4 numbers (x0, y0, x1, y1) in pixels, got shape {boxes.shape}"
            )
        boxes = boxes.reshape(1, 4)
        x0, y0, x1, y1 = boxes[0]
        if not np.isfinite(boxes).all() or x1 < x0 or y1 < y0:
            raise ValueError(f"box must be finite with x0 <= x1 and y0 <= y1, got {box}")
        if x1 < 0 or y1 < 0 or x0 > w or y0 > h:
            raise ValueError(f"box {list(boxes[0])} lies outside the image (width {w}, height {h})")
    if mask_input is not None:
        masks = np.asarray(mask_input, dtype=np.float32)
        side = low_res_side
        if masks.shape == (side, side):
            masks = masks[None]
        if masks.shape != (1, side, side):
            raise ValueError(
                f"mask_input must have shape (1, {side}, {side}) (low-res logits from a "
                f"previous predict), got {masks.shape}"
            )
        if not np.isfinite(masks).all():
            raise ValueError("mask_input contains NaN or infinite values")
    if coords is None and boxes is None and masks is None:
        raise ValueError(
            "no prompt given: pass point_coords with point_labels, a box, or a mask_input"
        )
    return coords, labels, boxes, masks


class SamPredictor:
    """Compute masks for an image from prompts, with the image encoded once.

    Parameters
    ----------
    sam_model : Sam
        The model (see :func:`napari_sam.load_model` or ``sam_model_registry``).
    to_uint8 : callable, optional
        Converts the images given to :meth:`set_image` into ``H x W x 3`` uint8 RGB. Default:
        :func:`default_to_uint8` (uint8 as is, other dtypes min-max). Volumes should pass a window
        from :mod:`napari_sam.intensity` so every slice is converted the same way.
    fast : bool or {"auto", "fp32", "int8", "bf16"}
        False (default): the exact float32 path, equal to segment_anything's. True or a
        precision: run :func:`napari_sam.speed.optimize` on the model first (the fast twin
        shares its weights; ``self.model`` is then the fast model). True means ``"auto"``: the
        fastest path whose masks agree with the exact ones at IoU >= 0.99.
    """

    # The image set (by set_image or set_image_embedding); None before, and after reset_image.
    features: torch.Tensor | None
    original_size: tuple[int, int] | None
    input_size: tuple[int, int] | None

    def __init__(
        self, sam_model: Sam, to_uint8: ToUint8 | None = None, fast: bool | str = False
    ) -> None:
        if fast is not False:
            from napari_sam.speed import optimize

            sam_model = optimize(sam_model, "auto" if fast is True else fast)
        self.model = sam_model
        self.transform: ResizeLongestSide = transform_for(sam_model)
        self.to_uint8: ToUint8 = to_uint8 or default_to_uint8
        self.reset_image()

    @property
    def device(self) -> torch.device:
        """Device of the model (and of the embedding)."""
        return self.model.device

    @property
    def _low_res_size(self) -> int:
        return 4 * (self.transform.target_length // 16)

    # -- image --------------------------------------------------------------------------------

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode an image so that prompts can be answered.

        Parameters
        ----------
        image : ndarray, shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), any dtype
            Converted with ``to_uint8``.
        image_format : {"RGB", "BGR"}
            Channel order of a colour image.
        """
        rgb = image_to_rgb(image, self.to_uint8, image_format, self.model.image_format)
        self.set_torch_image(_input_tensor(self.transform, rgb, self.device), rgb.shape[:2])

    @torch.no_grad()
    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> None:
        """Encode an image already resized by ``self.transform`` (``1 x 3 x h x w``)."""
        size = self.transform.target_length
        if (
            transformed_image.ndim != 4
            or transformed_image.shape[1] != 3
            or max(*transformed_image.shape[2:]) != size
        ):
            raise ValueError(
                f"set_torch_image expects a 1x3xhxw tensor whose long side is {size}, got "
                f"{tuple(transformed_image.shape)}; use predictor.transform.apply_image first"
            )
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(transformed_image.shape[-2]), int(transformed_image.shape[-1]))
        self.features = self.model.image_encoder(self.model.preprocess(transformed_image))
        self.is_image_set = True

    def set_image_embedding(
        self,
        embedding: torch.Tensor | np.ndarray,
        original_size: tuple[int, int],
        input_size: tuple[int, int] | None = None,
    ) -> None:
        """Install a precomputed embedding (from a cache) instead of running the encoder.

        Parameters
        ----------
        embedding : Tensor or ndarray, shape (1, 256, E, E) or (256, E, E)
        original_size : (int, int)
            ``(H, W)`` of the image the embedding was computed from.
        input_size : (int, int), optional
            Its resized size; derived from ``original_size`` when omitted.
        """
        emb = torch.as_tensor(embedding)
        if emb.ndim == 3:
            emb = emb[None]
        e = self.transform.target_length // 16
        expected = (1, self.model.prompt_encoder.embed_dim, e, e)
        if tuple(emb.shape) != expected:
            raise ValueError(
                f"embedding must have shape {expected} for this model, got {tuple(emb.shape)}"
            )
        self.reset_image()
        self.features = emb.to(device=self.device, dtype=torch.float32)
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (
            (int(input_size[0]), int(input_size[1]))
            if input_size is not None
            else self.transform.input_size(self.original_size)
        )
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's embedding, ``1 x 256 x E x E``."""
        features, _, _ = self._require_image()
        return features

    def reset_image(self) -> None:
        """Forget the current image (and its embedding)."""
        self.is_image_set = False
        self.features = None
        self.orig_h = self.orig_w = self.input_h = self.input_w = None
        self.original_size = None
        self.input_size = None

    def _require_image(self) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """The embedding, original size and input size of the image set."""
        features, original, resized = self.features, self.original_size, self.input_size
        if not self.is_image_set or features is None or original is None or resized is None:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        return features, original, resized

    # -- prompts ------------------------------------------------------------------------------

    def _check_prompts(
        self,
        point_coords: ArrayLike | None,
        point_labels: ArrayLike | None,
        box: ArrayLike | None,
        mask_input: ArrayLike | None,
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        _, original, _ = self._require_image()
        return check_prompts(
            point_coords, point_labels, box, mask_input, original, self._low_res_size
        )

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool | str = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for the current image from prompts.

        Parameters
        ----------
        point_coords : ndarray, shape (N, 2), optional
            ``(x, y)`` pixel coordinates in the original image.
        point_labels : ndarray, shape (N,), optional
            1 for a foreground point, 0 for a background point.
        box : ndarray, shape (4,), optional
            ``(x0, y0, x1, y1)`` in pixels.
        mask_input : ndarray, shape (1, L, L), optional
            Low-resolution logits from a previous call (``L = 256`` for official models).
        multimask_output : bool or "best"
            Three candidate masks (recommended for a single click) instead of one. ``"best"``:
            decode the three and return only the one with the highest predicted IoU (C = 1);
            only that one is resized to the image, which saves most of a click's resizing.
        return_logits : bool
            Return logits instead of boolean masks.

        Returns
        -------
        masks : ndarray, shape (C, H, W), bool (float32 with ``return_logits``)
        iou_predictions : ndarray, shape (C,)
        low_res_logits : ndarray, shape (C, L, L)
        """
        _, original, _ = self._require_image()
        coords, labels, boxes, masks = self._check_prompts(
            point_coords, point_labels, box, mask_input
        )
        coords_t = labels_t = box_t = mask_t = None
        if coords is not None:
            coords = self.transform.apply_coords(coords, original)
            coords_t = torch.as_tensor(coords, dtype=torch.float, device=self.device)[None]
            labels_t = torch.as_tensor(labels, dtype=torch.int, device=self.device)[None]
        if boxes is not None:
            boxes = self.transform.apply_boxes(boxes, original)
            box_t = torch.as_tensor(boxes, dtype=torch.float, device=self.device)
        if masks is not None:
            mask_t = torch.as_tensor(masks, dtype=torch.float, device=self.device)[None]
        out_masks, iou, low_res = self.predict_torch(
            coords_t, labels_t, box_t, mask_t, multimask_output, return_logits=return_logits
        )
        return (
            out_masks[0].detach().cpu().numpy(),
            iou[0].detach().cpu().numpy(),
            low_res[0].detach().cpu().numpy(),
        )

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool | str = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction; coordinates already in the encoder frame.

        Parameters
        ----------
        point_coords : Tensor, shape (B, N, 2), optional
            Use ``predictor.transform.apply_coords_torch`` to map pixel coordinates.
        point_labels : Tensor, shape (B, N), optional
        boxes : Tensor, shape (B, 4), optional
        mask_input : Tensor, shape (B, 1, L, L), optional
        multimask_output : bool or "best"
            As in :meth:`predict` (``"best"``: per prompt set).
        return_logits : bool
            As in :meth:`predict`.

        Returns
        -------
        masks : Tensor, shape (B, C, H, W)
        iou_predictions : Tensor, shape (B, C)
        low_res_logits : Tensor, shape (B, C, L, L)
        """
        features, original, resized = self._require_image()
        best = isinstance(multimask_output, str)
        if best and multimask_output != "best":
            raise ValueError(
                f"multimask_output must be True, False or 'best', got {multimask_output!r}"
            )
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=bool(multimask_output),
        )
        if best:
            rows = torch.arange(iou.shape[0], device=iou.device)
            chosen = iou.argmax(dim=1)
            low_res, iou = low_res[rows, chosen][:, None], iou[rows, chosen][:, None]
        masks = self.model.postprocess_masks(low_res, resized, original)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res

"""Sam2ImagePredictor: one slice encoded once, many prompts, with SAM 2's semantics.

SAM 2 differs from SAM 1 in its input and output handling, and this module owns those steps:

- preprocessing (:func:`preprocess`): the 8-bit RGB image is scaled to [0, 1], resized to the
  model's square ``image_size`` *without* keeping the aspect ratio (bilinear, antialiased), then
  normalised with the ImageNet mean and standard deviation;
- prompts are given in pixels of the original image and scaled to the square frame per axis
  (``x * S / W``, ``y * S / H``); a box becomes two corner points with labels 2 and 3 placed
  before the clicks;
- masks come back at ``S/4 x S/4`` and are resized bilinearly to the original size, optionally
  after filling small background holes and removing small foreground specks
  (:func:`fill_small_regions`; off by default, as in SAM 2).

The model is only called through the method names of SAM 2's ``SAM2Base`` (``forward_image``,
``_prepare_backbone_features``, ``sam_prompt_encoder``, ``sam_mask_decoder``, ``no_mem_embed``,
``image_size``), so any model with that interface works.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from napari_sam.predictor import ToUint8, check_prompts, default_to_uint8, image_to_rgb

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Sam2ImagePredictor",
    "Sam2Model",
    "compute_features",
    "fill_small_regions",
    "preprocess",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Features = dict[str, list[torch.Tensor]]


class Sam2Model(Protocol):
    """What this package calls on a SAM 2 model (``SAM2Base``'s names and signatures).

    ``napari_sam.models.sam2.Sam2`` provides it, and so does Meta's ``SAM2Base``.
    """

    image_size: int
    num_maskmem: int
    directly_add_no_mem_embed: bool
    no_mem_embed: torch.Tensor
    sam_prompt_encoder: Any
    sam_mask_decoder: Any

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        ...

    def forward_image(self, img_batch: torch.Tensor) -> dict[str, Any]:
        """Encode ``(B, 3, S, S)`` images: ``backbone_fpn`` and ``vision_pos_enc`` lists."""
        ...

    def _prepare_backbone_features(self, backbone_out: dict[str, Any]) -> tuple: ...

    def track_step(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Segment one frame from prompts and/or memory (``SAM2Base.track_step``)."""
        ...

    def _encode_new_memory(self, *args: Any, **kwargs: Any) -> tuple: ...


def _normalisation(model: Sam2Model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # A model trained with other statistics (a fine-tune) declares them; SAM 2 uses ImageNet's.
    return (
        tuple(getattr(model, "image_mean", IMAGENET_MEAN)),
        tuple(getattr(model, "image_std", IMAGENET_STD)),
    )


def preprocess(
    rgb: np.ndarray,
    image_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """Make SAM 2's encoder input from one ``H x W x 3`` uint8 image.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8
    image_size : int
        Side ``S`` of the model's square input.
    mean, std : tuple of 3 floats
        Channel statistics on the [0, 1] scale (ImageNet's by default).

    Returns
    -------
    Tensor, shape (1, 3, image_size, image_size), float32, on the CPU
        ``(resize(rgb / 255) - mean) / std``; the resize is bilinear with antialiasing (so a
        large slice is averaged, not subsampled) and stretches each axis independently.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {rgb.dtype} {rgb.shape}")
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div(255.0)
    x = F.interpolate(
        x[None],
        size=(image_size, image_size),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


@torch.no_grad()
def stretch_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Stretch ``N x 1 x H x W`` masks (0/1) to ``size`` squared as frames are, binarised.

    Antialiased so that a thin structure survives a shrink; unchanged when already square at
    ``size``. Returns float 0/1.
    """
    masks = masks.float()
    if tuple(masks.shape[-2:]) == (size, size):
        return masks
    out = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False, antialias=True)
    return (out >= 0.5).float()


def compute_features(model: Sam2Model, rgb: np.ndarray) -> Features:
    """Encode one ``H x W x 3`` uint8 slice: the model's ``forward_image`` output.

    Parameters
    ----------
    model : Sam2
    rgb : ndarray, shape (H, W, 3), uint8

    Returns
    -------
    dict
        ``"backbone_fpn"``: list of Tensors ``(1, C_l, S/4^.., ..)``, finest level first (the two
        high-resolution levels already projected for the mask decoder);
        ``"vision_pos_enc"``: list of the matching positional encodings. On the model's device.
    """
    mean, std = _normalisation(model)
    tensor = preprocess(rgb, int(model.image_size), mean, std).to(model.device)
    out = model.forward_image(tensor)
    return {
        "backbone_fpn": list(out["backbone_fpn"]),
        "vision_pos_enc": list(out["vision_pos_enc"]),
    }


def _small_components(binary: np.ndarray, max_area: float) -> np.ndarray:
    """Pixels of the 8-connected components of ``binary`` whose area is <= ``max_area``."""
    from scipy import ndimage

    labels, count = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros_like(binary)
    areas = np.bincount(labels.ravel())
    small = areas <= max_area
    small[0] = False  # label 0 is everything outside the components
    return small[labels]


def fill_small_regions(
    logits: torch.Tensor,
    max_hole_area: float = 0.0,
    max_sprinkle_area: float = 0.0,
    threshold: float = 0.0,
    hole_value: float = 10.0,
    sprinkle_value: float = -10.0,
) -> torch.Tensor:
    """Fill small background holes and remove small foreground specks in mask logits.

    A hole is an 8-connected region of pixels ``<= threshold`` whose area (pixels) is at most
    ``max_hole_area``; it is set to ``threshold + hole_value``. A speck is an 8-connected region
    of pixels ``> threshold`` of area at most ``max_sprinkle_area`` (found on the input, before
    holes are filled); it is set to ``threshold + sprinkle_value``. Areas of 0 turn a step off.

    Parameters
    ----------
    logits : Tensor, shape (..., h, w)

    Returns
    -------
    Tensor, same shape, dtype and device (the input when both steps are off)
    """
    if max_hole_area <= 0 and max_sprinkle_area <= 0:
        return logits
    planes = logits.detach().float().cpu().reshape(-1, *logits.shape[-2:]).numpy()
    out = planes.copy()
    for plane, result in zip(planes, out):
        if max_hole_area > 0:
            result[_small_components(plane <= threshold, max_hole_area)] = threshold + hole_value
        if max_sprinkle_area > 0:
            speck = _small_components(plane > threshold, max_sprinkle_area)
            result[speck] = threshold + sprinkle_value
    return torch.from_numpy(out).reshape(logits.shape).to(logits.device, logits.dtype)


class Sam2ImagePredictor:
    """Masks for one image from prompts, with the image encoded once (SAM 2 models).

    Parameters
    ----------
    model : Sam2Model
        A SAM 2 model (``SAM2Base`` interface).
    to_uint8 : callable, optional
        Converts the images given to :meth:`set_image` into ``H x W x 3`` uint8 RGB; default
        :func:`napari_sam.predictor.default_to_uint8` (uint8 as is, other dtypes min-max).
        Volumes should pass a window from :mod:`napari_sam.intensity`.
    mask_threshold : float
        Logit above which a pixel is in the mask.
    max_hole_area, max_sprinkle_area : float
        Fill background holes / remove foreground specks up to this area, in pixels of the
        ``S/4`` low-resolution masks, before resizing (:func:`fill_small_regions`); 0 = off.
    """

    _features: dict[str, Any] | None
    original_size: tuple[int, int] | None

    def __init__(
        self,
        model: Sam2Model,
        to_uint8: ToUint8 | None = None,
        mask_threshold: float = 0.0,
        max_hole_area: float = 0.0,
        max_sprinkle_area: float = 0.0,
    ) -> None:
        self.model = model
        self.to_uint8: ToUint8 = to_uint8 or default_to_uint8
        self.mask_threshold = float(mask_threshold)
        self.max_hole_area = float(max_hole_area)
        self.max_sprinkle_area = float(max_sprinkle_area)
        self.reset_predictor()

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.model.device

    @property
    def _low_res_size(self) -> int:
        return int(self.model.image_size) // 4

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
        rgb = image_to_rgb(image, self.to_uint8, image_format)
        self.set_features(compute_features(self.model, rgb), rgb.shape[:2])

    @torch.no_grad()
    def set_features(self, features: Features, original_size: tuple[int, int]) -> None:
        """Install features computed elsewhere (:func:`compute_features`, a feature cache).

        Parameters
        ----------
        features : dict
            ``forward_image`` output of one image (batch 1).
        original_size : (int, int)
            ``(H, W)`` of the image they were computed from.
        """
        self.reset_predictor()
        _, feats, _, sizes = self.model._prepare_backbone_features(
            {
                "backbone_fpn": list(features["backbone_fpn"]),
                "vision_pos_enc": list(features["vision_pos_enc"]),
            }
        )
        if feats[0].shape[1] != 1:
            raise ValueError(f"features must hold one image, got a batch of {feats[0].shape[1]}")
        if getattr(self.model, "directly_add_no_mem_embed", False):
            # The image is a video's first frame: SAM 2 marks "no memory" this way.
            feats[-1] = feats[-1] + self.model.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(1, -1, *s) for f, s in zip(feats, sizes)]
        self._features = {"image_embed": maps[-1], "high_res_feats": maps[:-1]}
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """Return the current image's embedding, ``1 x 256 x S/16 x S/16``."""
        features, _ = self._require_image()
        return features["image_embed"]

    def reset_predictor(self) -> None:
        """Forget the current image."""
        self.is_image_set = False
        self._features = None
        self.original_size = None

    def _require_image(self) -> tuple[dict[str, Any], tuple[int, int]]:
        if not self.is_image_set or self._features is None or self.original_size is None:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        return self._features, self.original_size

    # -- prompts ------------------------------------------------------------------------------

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for the current image from prompts.

        Parameters
        ----------
        point_coords : ndarray, shape (N, 2), optional
            ``(x, y)`` in pixels of the original image (in [0, 1] when not ``normalize_coords``).
        point_labels : ndarray, shape (N,), optional
            1 foreground, 0 background.
        box : ndarray, shape (4,), optional
            ``(x0, y0, x1, y1)``, same units as the points.
        mask_input : ndarray, shape (1, L, L), optional
            Low-resolution logits from a previous call (``L = image_size / 4``).
        multimask_output : bool
            Three candidate masks (recommended for one click) instead of one.
        return_logits : bool
            Return logits instead of boolean masks.
        normalize_coords : bool
            Whether the coordinates are pixels (True) or already normalised to [0, 1].

        Returns
        -------
        masks : ndarray, shape (C, H, W), bool (float32 logits with ``return_logits``)
        iou_predictions : ndarray, shape (C,)
        low_res_logits : ndarray, shape (C, L, L), clipped to [-32, 32]
        """
        _, original = self._require_image()
        frame = original if normalize_coords else (1, 1)
        coords, labels, boxes, masks = check_prompts(
            point_coords, point_labels, box, mask_input, frame, self._low_res_size
        )
        h, w = frame
        size = float(self.model.image_size)
        scale = np.array([size / w, size / h])
        corners = [] if boxes is None else [boxes.reshape(2, 2) * scale]
        clicks = [] if coords is None else [coords * scale]
        points = None
        if corners or clicks:
            xy = np.concatenate(corners + clicks, axis=0)
            tags = np.array(
                ([2, 3] if corners else []) + ([] if labels is None else [int(v) for v in labels])
            )
            points = (
                torch.as_tensor(xy, dtype=torch.float, device=self.device)[None],
                torch.as_tensor(tags, dtype=torch.int, device=self.device)[None],
            )
        mask_t = None
        if masks is not None:
            mask_t = torch.as_tensor(masks, dtype=torch.float, device=self.device)[None]
        out, iou, low_res = self._predict(points, mask_t, multimask_output, return_logits)
        return (
            out[0].detach().cpu().numpy(),
            iou[0].detach().float().cpu().numpy(),
            low_res[0].detach().float().cpu().numpy(),
        )

    @torch.no_grad()
    def _predict(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        return_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features, size = self._require_image()
        sparse, dense = self.model.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)
        low_res, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=features["image_embed"],
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=bool(multimask_output),
            repeat_image=False,
            high_res_features=features["high_res_feats"],
        )
        low_res = low_res.float()
        filled = fill_small_regions(
            low_res, self.max_hole_area, self.max_sprinkle_area, self.mask_threshold
        )
        masks = F.interpolate(filled, size, mode="bilinear", align_corners=False)
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks, iou, torch.clamp(low_res, -32.0, 32.0)

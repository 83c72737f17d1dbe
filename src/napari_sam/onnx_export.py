"""Export SAM's prompt encoder + mask decoder + mask upscaling to ONNX.

The exported graph has the inputs and outputs of Meta's ``scripts/export_onnx_model.py``, so
clients written for it (the web demo, onnxruntime scripts) work unchanged:

========================  ==========================  =============================================
input                     shape                       meaning
========================  ==========================  =============================================
``image_embeddings``      ``1 x 256 x E x E``         the image encoder's output
``point_coords``          ``1 x N x 2``               (x, y) in the encoder frame (after
                                                      ``transform.apply_coords``); a box is two
                                                      points labelled 2 and 3; without a box add
                                                      one padding point (0, 0) labelled -1
``point_labels``          ``1 x N``                   1 fg, 0 bg, 2 / 3 box corners, -1 padding
``mask_input``            ``1 x 1 x 4E x 4E``         low-res logits of a previous prediction
``has_mask_input``        ``(1,)``                    1 to use ``mask_input``, else 0
``orig_im_size``          ``(2,)``                    (H, W) of the original image, float
========================  ==========================  =============================================

Outputs: ``masks`` (logits at ``orig_im_size``), ``iou_predictions``, ``low_res_masks``; all four
mask tokens, or only the best one with ``return_single_mask``. ``N`` is dynamic; the image size is
handled inside the graph. Exported with PyTorch's TorchScript-based exporter (the dynamo exporter
needs onnxscript, which this package does not require).
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.amg_utils import calculate_stability_score
from napari_sam.io.atomic import atomic_path

if TYPE_CHECKING:
    from napari_sam.models.mask_decoder import MaskDecoder
    from napari_sam.models.prompt_encoder import PromptEncoder
    from napari_sam.transforms import ResizeLongestSide

__all__ = [
    "INPUT_NAMES",
    "DecoderParts",
    "SamOnnxDecoder",
    "dummy_inputs",
    "export_decoder",
    "onnx_inputs",
    "output_names",
    "quantize_decoder",
]

INPUT_NAMES = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
MIN_OPSET = 11


class DecoderParts(Protocol):
    """What the export reads of a model: a :class:`~napari_sam.models.sam.Sam` has all of it.

    A model may also have ``is_medsam`` (bool, MedSAM's mask upscaling); it is read when
    present.
    """

    @property
    def prompt_encoder(self) -> PromptEncoder:
        """Points, boxes and masks to prompt embeddings."""
        ...

    @property
    def mask_decoder(self) -> MaskDecoder:
        """Embeddings to mask logits and IoU predictions."""
        ...

    @property
    def image_size(self) -> int:
        """Side ``S`` of the square encoder input, in pixels."""
        ...

    @property
    def mask_threshold(self) -> float:
        """Logit threshold of a mask pixel."""
        ...


@dataclass(frozen=True)
class _DecoderCopy:
    """CPU copies of a model's two small modules with the scalars the export needs."""

    prompt_encoder: PromptEncoder
    mask_decoder: MaskDecoder
    image_size: int
    is_medsam: bool
    mask_threshold: float


class SamOnnxDecoder(nn.Module):
    """Prompt encoder, mask decoder and upscaling of a Sam, traceable into one ONNX graph.

    Written without data-dependent Python control flow, so that tracing records every branch.

    Parameters
    ----------
    model : Sam or DecoderParts
        Its ``prompt_encoder`` and ``mask_decoder`` are used (not copied); anything with those
        and ``image_size``, ``mask_threshold`` (and optionally ``is_medsam``) will do.
    return_single_mask : bool
        Return only one mask: token 0 when there are more than two points (a box or several
        clicks), else the best of the three multimask outputs by predicted IoU.
    use_stability_score : bool
        Replace the predicted IoU by the stability score of the low-res logits (offset 1).
    return_extra_metrics : bool
        Also return the stability scores and the areas of the upscaled masks.
    """

    def __init__(
        self,
        model: DecoderParts,
        return_single_mask: bool,
        use_stability_score: bool = False,
        return_extra_metrics: bool = False,
    ) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.image_size = int(model.image_size)
        self.medsam = bool(getattr(model, "is_medsam", False))
        self.mask_threshold = float(model.mask_threshold)
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.return_extra_metrics = return_extra_metrics
        self.stability_score_offset = 1.0

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe_layer = self.prompt_encoder.pe_layer
        size = (self.image_size, self.image_size)
        pe = pe_layer.forward_with_coords(coords + 0.5, size)  # pixel centres
        labels = labels.unsqueeze(-1)
        # Label arithmetic instead of indexing: labels arrive as floats and -1 must not index.
        embedding = pe * (labels != -1).to(pe.dtype)
        embedding = embedding + self.prompt_encoder.not_a_point_embed.weight * (labels == -1).to(
            pe.dtype
        )
        for i in range(len(self.prompt_encoder.point_embeddings)):
            point_embed = self.prompt_encoder.point_embedding(i)
            embedding = embedding + point_embed * (labels == i).to(pe.dtype)
        return embedding

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        masked = self.prompt_encoder.mask_downscaling(mask_input)
        return has_mask_input * masked + (1 - has_mask_input) * no_mask

    def _upscale(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        size = orig_im_size.to(torch.int64)
        h, w = size[0], size[1]
        # h and w are 0-d tensors, not ints, so that the traced graph reads the output size
        # from orig_im_size (ints would be frozen into the graph); torch's stubs say int.
        if self.medsam:
            return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)  # type: ignore[arg-type]
        s = self.image_size
        masks = F.interpolate(masks, size=(s, s), mode="bilinear", align_corners=False)
        # The resized image's size inside the padded frame, computed in the graph.
        orig = orig_im_size.to(torch.float32)
        resized = torch.floor(orig * (s / torch.max(orig)) + 0.5).to(torch.int64)
        masks = masks[..., : resized[0], : resized[1]]
        return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)  # type: ignore[arg-type]

    def _select_single(
        self, masks: torch.Tensor, scores: torch.Tensor, num_points: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Token 0 wins by a large margin when there are more than 2.5 points, else it loses.
        bias = torch.zeros_like(scores[:1])
        bias[:, 0] = 1000.0
        best = torch.argmax(scores + (num_points - 2.5) * bias, dim=1)
        rows = torch.arange(masks.shape[0])
        return masks[rows, best].unsqueeze(1), scores[rows, best].unsqueeze(1)

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """Decode masks for one image embedding and one prompt set (see the module table).

        Returns
        -------
        tuple of Tensor
            ``masks``, ``iou_predictions``, then ``stability_scores`` and ``areas`` when
            ``return_extra_metrics``, then ``low_res_masks``; :func:`output_names` names them.
        """
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        masks, scores = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        if self.use_stability_score:
            scores = calculate_stability_score(
                masks, self.mask_threshold, self.stability_score_offset
            )
        if self.return_single_mask:
            masks, scores = self._select_single(masks, scores, point_coords.shape[1])
        upscaled = self._upscale(masks, orig_im_size)
        if self.return_extra_metrics:
            stability = calculate_stability_score(
                upscaled, self.mask_threshold, self.stability_score_offset
            )
            areas = (upscaled > self.mask_threshold).sum(-1).sum(-1)
            return upscaled, scores, stability, areas, masks
        return upscaled, scores, masks


def output_names(return_extra_metrics: bool = False) -> list[str]:
    """Names of the exported graph's outputs, in the order :class:`SamOnnxDecoder` returns them."""
    if return_extra_metrics:
        return ["masks", "iou_predictions", "stability_scores", "areas", "low_res_masks"]
    return ["masks", "iou_predictions", "low_res_masks"]


def dummy_inputs(model: DecoderParts, num_points: int = 5) -> dict[str, torch.Tensor]:
    """Example inputs of the right shapes (random values) for tracing and smoke runs."""
    gen = torch.Generator().manual_seed(0)
    e = model.prompt_encoder.image_embedding_size
    dim = model.prompt_encoder.embed_dim
    s = int(model.image_size)
    return {
        "image_embeddings": torch.randn(1, dim, *e, generator=gen),
        "point_coords": torch.randint(0, s, (1, num_points, 2), generator=gen).float(),
        "point_labels": torch.randint(0, 4, (1, num_points), generator=gen).float(),
        "mask_input": torch.randn(1, 1, 4 * e[0], 4 * e[1], generator=gen),
        "has_mask_input": torch.tensor([1.0]),
        "orig_im_size": torch.tensor([1500.0, 2250.0]),
    }


def _replace_atomically(write: Callable[[Path], None], output: Path) -> None:
    """Call ``write(tmp_path)``, then move the file into place; nothing is left on failure."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        write(tmp)


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ImportError(
            f"ONNX export needs the '{module}' package: pip install 'napari-sam-volumes[onnx]'"
        ) from None


def export_decoder(
    model: DecoderParts,
    output: str | os.PathLike,
    *,
    return_single_mask: bool = False,
    opset: int = 17,
    gelu_approximate: bool = False,
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
    check: bool = True,
) -> Path:
    """Export the prompt decoder of ``model`` to an ONNX file.

    Parameters
    ----------
    model : Sam or DecoderParts
    output : path-like
        The ``.onnx`` file; written atomically (an existing file is replaced only on success).
    return_single_mask, use_stability_score, return_extra_metrics : bool
        See :class:`SamOnnxDecoder`.
    opset : int
        ONNX opset (>= 11; 17 by default).
    gelu_approximate : bool
        Use the tanh approximation of GELU (for runtimes without a fast ``Erf``).
    check : bool
        Run the exported file once in onnxruntime (when installed).

    Returns
    -------
    Path
        The written file.
    """
    _require("onnx")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    output = Path(output)
    # Copies of the two small modules only (never the image encoder, up to 2.5 GB): the user's
    # model keeps its device and its GELUs.
    decoder_only = _DecoderCopy(
        prompt_encoder=copy.deepcopy(model.prompt_encoder).to("cpu").eval(),
        mask_decoder=copy.deepcopy(model.mask_decoder).to("cpu").eval(),
        image_size=model.image_size,
        is_medsam=getattr(model, "is_medsam", False),
        mask_threshold=model.mask_threshold,
    )
    if gelu_approximate:
        for part in (decoder_only.prompt_encoder, decoder_only.mask_decoder):
            for module in part.modules():
                if isinstance(module, nn.GELU):
                    module.approximate = "tanh"
    wrapper = SamOnnxDecoder(
        decoder_only,
        return_single_mask=return_single_mask,
        use_stability_score=use_stability_score,
        return_extra_metrics=return_extra_metrics,
    )
    inputs = dummy_inputs(decoder_only)
    wrapper(**inputs)  # fail here, with a PyTorch error, rather than inside the exporter

    def write(path: Path) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                wrapper,
                tuple(inputs.values()),
                str(path),
                export_params=True,
                opset_version=opset,
                do_constant_folding=True,
                input_names=list(INPUT_NAMES),
                output_names=output_names(return_extra_metrics),
                dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                dynamo=False,
            )
        if check:
            _smoke_run(path, inputs)

    _replace_atomically(write, output)
    return output


def _smoke_run(path: Path, inputs: dict[str, torch.Tensor]) -> None:
    try:
        import onnxruntime
    except ImportError:
        return
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run(None, {k: v.numpy() for k, v in inputs.items()})


def _quiet_preprocess_hint(record: logging.LogRecord) -> bool:
    # onnxruntime logs a generic "run pre-processing" hint on the root logger for every model.
    return "pre-processing before quantization" not in record.getMessage()


def quantize_decoder(source: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Dynamic int8 quantisation of an exported decoder (weights uint8, as Meta's script).

    Returns
    -------
    Path
        The written file (atomically).
    """
    _require("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, output = Path(source), Path(output)
    if not source.is_file():
        raise FileNotFoundError(f"no ONNX file at {source}")

    def write(path: Path) -> None:
        root = logging.getLogger()
        root.addFilter(_quiet_preprocess_hint)
        try:
            quantize_dynamic(
                model_input=str(source),
                model_output=str(path),
                per_channel=False,
                reduce_range=False,
                weight_type=QuantType.QUInt8,
            )
        finally:
            root.removeFilter(_quiet_preprocess_hint)

    _replace_atomically(write, output)
    return output


def onnx_inputs(
    transform: ResizeLongestSide,
    original_size: tuple[int, int],
    image_embedding: torch.Tensor | np.ndarray,
    point_coords: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    mask_input: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Build the exported decoder's inputs from pixel prompts, as a client must.

    Parameters
    ----------
    transform : ResizeLongestSide or StretchResize
        The predictor's transform (``predictor.transform``).
    original_size : (H, W)
    image_embedding : 1 x 256 x E x E
    point_coords : N x 2 (x, y) pixels; point_labels : N
    box : (x0, y0, x1, y1) pixels
    mask_input : 1 x L x L or 1 x 1 x L x L logits

    Returns
    -------
    dict of float32 arrays keyed by input name.
    """
    coords = np.zeros((0, 2))
    labels = np.zeros((0,))
    if point_coords is not None:
        coords = np.asarray(point_coords, dtype=np.float64).reshape(-1, 2)
        labels = np.asarray(point_labels, dtype=np.float64).reshape(-1)
    if box is not None:
        coords = np.concatenate([coords, np.asarray(box, dtype=np.float64).reshape(2, 2)])
        labels = np.concatenate([labels, [2.0, 3.0]])
    else:
        coords = np.concatenate([coords, [[0.0, 0.0]]])
        labels = np.concatenate([labels, [-1.0]])
    frame = transform.apply_coords(coords, original_size)  # the padding point stays at (0, 0)
    side = 4 * (transform.target_length // 16)
    has_mask = mask_input is not None
    mask = (
        np.asarray(mask_input, dtype=np.float32).reshape(1, 1, side, side)
        if has_mask
        else np.zeros((1, 1, side, side), dtype=np.float32)
    )
    embedding = torch.as_tensor(image_embedding).detach().cpu().numpy()
    return {
        "image_embeddings": embedding.reshape(1, *embedding.shape[-3:]).astype(np.float32),
        "point_coords": frame[None].astype(np.float32),
        "point_labels": labels[None].astype(np.float32),
        "mask_input": mask,
        "has_mask_input": np.array([1.0 if has_mask else 0.0], dtype=np.float32),
        "orig_im_size": np.array(original_size, dtype=np.float32),
    }

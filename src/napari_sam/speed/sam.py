"""FastSam: the fast twin of a :class:`~napari_sam.models.sam.Sam`, sharing its weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.models.prompt_encoder import PromptEncoder
from napari_sam.models.sam import Sam
from napari_sam.resampling import apply_rows, operator_taps
from napari_sam.speed.decoder import FastMaskDecoder
from napari_sam.speed.int8 import DynamicInt8Linear
from napari_sam.speed.kernels import DerivedWeights, FusedLinear
from napari_sam.speed.tiny_vit import FastTinyViT
from napari_sam.speed.twin import FastTwin, is_fast
from napari_sam.speed.vit import FastImageEncoderViT

__all__ = ["FastPromptEncoder", "FastSam", "fast_image_encoder", "resampling_taps"]


class FastPromptEncoder(FastTwin, PromptEncoder):
    """The prompt encoder with its dense positional encoding computed once, not per prompt.

    Made with ``FastPromptEncoder.from_exact(prompt_encoder)`` (same state-dict keys, shared
    parameters); the encoding is recomputed when the random-frequency matrix changes (e.g. a
    state dict is loaded). The returned tensor is shared: do not modify it in place.
    """

    exact_type = PromptEncoder

    def speed_up(self, exact: PromptEncoder) -> None:
        """The dense positional encoding, kept until its frequency matrix changes."""
        self._dense_pe = DerivedWeights(
            lambda: (self.pe_layer.positional_encoding_gaussian_matrix,),
            lambda: (PromptEncoder.get_dense_pe(self),),
        )

    def get_dense_pe(self) -> torch.Tensor:
        """As :meth:`PromptEncoder.get_dense_pe`, computed once (a shared tensor)."""
        return self._dense_pe.get()[0]

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """The mask downscaling as three small GEMMs on 4 x 4 pixel blocks.

        Both stride-2 2 x 2 convolutions and the 1 x 1 one never mix blocks, so each token's
        embedding is a function of its own 4 x 4 block of the mask: computed token by token
        in channels-last rows, it comes out in the decoder's token order. Returned as a
        ``B x C x E x E`` view of that ``B x E x E x C`` tensor (no transposing copy).

        A dense prompt made from a mask (:func:`~napari_sam.prompts.mask_to_mask_input`) is
        one constant inside and another outside: only the blocks on its boundary and one
        block per constant go through the network, and every token copies its block's row.
        """
        layers = list(self.mask_downscaling)
        if not _is_mask_downscaling(layers) or masks.shape[-1] % 4 or masks.shape[-2] % 4:
            return super()._embed_masks(masks)
        b, _, h, w = masks.shape
        eh, ew = h // 4, w // 4
        grid = masks.reshape(b, eh, 4, ew, 4)
        lo, hi = grid.amin(dim=(2, 4)).flatten(), grid.amax(dim=(2, 4)).flatten()
        uniform = lo == hi
        mixed = torch.nonzero(~uniform)[:, 0]
        # Worth it while most tokens share a few blocks; logits (all different) go straight.
        if 4 * mixed.numel() > lo.numel():
            # Mask row 4i + 2a + r: token row i, second-convolution tap a, first-conv. tap r.
            taps = masks.reshape(b, eh, 2, 2, ew, 2, 2).permute(0, 1, 4, 2, 5, 3, 6)
            rows = taps.reshape(-1, 16)  # one copy, already in _tap_order's order
            return _embed_rows(layers, rows).reshape(b, eh, ew, -1).permute(0, 3, 1, 2)
        values, which = torch.unique(lo[uniform], return_inverse=True)
        bi, rest = mixed // (eh * ew), mixed % (eh * ew)
        blocks = torch.cat(
            [_tap_order(grid[bi, rest // ew, :, rest % ew, :]), values[:, None].expand(-1, 16)]
        )
        table = _embed_rows(layers, blocks)
        index = torch.empty(lo.shape, dtype=torch.long, device=masks.device)
        index[mixed] = torch.arange(mixed.numel(), device=masks.device)
        index[uniform] = which + mixed.numel()
        dense = table.index_select(0, index)
        return dense.reshape(b, eh, ew, -1).permute(0, 3, 1, 2)


def _tap_order(blocks: torch.Tensor) -> torch.Tensor:
    """``K x 4 x 4`` pixel blocks -> ``K x 16`` rows in the order :func:`_embed_rows` reads.

    That is: second-convolution tap (row, column), then first-convolution tap (row, column).
    """
    # Pixel (2a + r, 2c + s): second-convolution tap (a, c), first-convolution tap (r, s).
    return blocks.reshape(-1, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16)


def _embed_rows(layers: list[nn.Module], blocks: torch.Tensor) -> torch.Tensor:
    """SAM's mask downscaling on ``K x 16`` blocks (:func:`_tap_order`) -> ``K x C`` tokens."""
    conv1, norm1, act1, conv2, norm2, act2, conv3 = layers
    x = F.linear(blocks.reshape(-1, 4), conv1.weight.reshape(conv1.out_channels, 4), conv1.bias)
    x = act1(F.layer_norm(x, x.shape[-1:], norm1.weight, norm1.bias, norm1.eps))
    # Rows are now (token, a, c) x channel: the second convolution's input in (a, c, ch).
    x = x.reshape(-1, 4 * conv1.out_channels)
    weight2 = conv2.weight.permute(0, 2, 3, 1).reshape(conv2.out_channels, -1)
    x = F.linear(x, weight2, conv2.bias)
    x = act2(F.layer_norm(x, x.shape[-1:], norm2.weight, norm2.bias, norm2.eps))
    return F.linear(x, conv3.weight.reshape(conv3.out_channels, -1), conv3.bias)


def _is_mask_downscaling(layers: list) -> bool:
    """SAM's layout: conv 2x2/2, LayerNorm2d, act, conv 2x2/2, LayerNorm2d, act, conv 1x1."""
    if len(layers) != 7:
        return False
    convs = (layers[0], layers[3], layers[6])
    shapes = ((2, 2), (2, 2), (1, 1))
    return (
        all(
            isinstance(c, nn.Conv2d)
            and c.kernel_size == k
            and c.stride == k
            and c.padding == (0, 0)
            and c.groups == 1
            and c.bias is not None
            for c, k in zip(convs, shapes, strict=True)
        )
        and layers[0].in_channels == 1
        and all(hasattr(layers[i], "eps") for i in (1, 4))
    )


class FastSam(FastTwin, Sam):
    """A :class:`Sam` whose modules run the fast path; same interface and state dict.

    Build one with :func:`napari_sam.speed.optimize` (which checks the precision against the
    device, then calls ``FastSam.from_exact(model, precision=...)``). Its parameters are the
    exact model's (shared): loading weights into either changes both. Inference only.

    Attributes
    ----------
    precision : str
        What the encoder runs in: ``"fp32"``, ``"int8"`` or ``"bf16"``.
    encoder_settings : str
        Names everything besides the weights that the image embeddings depend on; use it as
        the ``encoder_settings`` of an embedding cache so that fast and exact embeddings are
        never mixed.
    """

    exact_type = Sam

    def speed_up(self, exact: Sam, precision: str = "fp32") -> None:
        """Fast encoder, prompt encoder and decoder twins.

        Parameters
        ----------
        exact : Sam
            The exact model.
        precision : {"fp32", "int8", "bf16"}
            What the encoder runs in (checked against the device by ``optimize``, not here).
        """
        from napari_sam.speed import FAST_PATH_VERSION

        self.precision = precision
        self.encoder_settings = f"fast-v{FAST_PATH_VERSION}-{precision}"
        self.image_encoder = fast_image_encoder(exact.image_encoder, precision)
        self.prompt_encoder = FastPromptEncoder.from_exact(exact.prompt_encoder)
        self.mask_decoder = FastMaskDecoder.from_exact(exact.mask_decoder)

    def train(self, mode: bool = True) -> FastSam:
        """Inference only: ``train(False)`` (``eval()``) is accepted, ``train()`` raises."""
        if mode:
            raise RuntimeError(
                "the fast model is for inference only; train the exact model it was made from"
            )
        # Only the fast path's own modules: the shared ones belong to the exact model, whose
        # mode is left as its owner set it (the fast forward never depends on it).
        for module in self.modules():
            if is_fast(module):
                module.training = False
        return self

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """Low-res logits -> original size, the exact path's resampling without its detour.

        The exact path resamples bilinearly to ``S x S``, crops the padding and resamples to
        the original size. Both steps are linear and separable, so their composition is one
        sparse matrix per axis (at most four low-res taps per output pixel): applying it gives
        the same logits up to float rounding, without the ``S x S`` intermediate.
        """
        original_size = (int(original_size[0]), int(original_size[1]))
        if self.is_medsam:
            return super().postprocess_masks(masks, input_size, original_size)
        low_h, low_w = masks.shape[-2:]
        rows = self._taps(low_h, int(input_size[0]), original_size[0], masks.device)
        cols = self._taps(low_w, int(input_size[1]), original_size[1], masks.device)
        # Both passes pick whole rows (memory copies, not element gathers): the columns on the
        # transposed low-res logits first, then the rows (two small transposing copies).
        out = apply_rows(masks.transpose(-1, -2).contiguous(), *cols)
        return apply_rows(out.transpose(-1, -2).contiguous(), *rows)

    def _taps(
        self, low: int, n_in: int, n_out: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (low, n_in, n_out, str(device))
        cache = self.__dict__.setdefault("_taps_cache", {})
        if key not in cache:
            if len(cache) >= 16:
                cache.pop(next(iter(cache)))
            cache[key] = tuple(
                t.to(device) for t in resampling_taps(low, self.image_size, n_in, n_out)
            )
        return cache[key]


def fast_image_encoder(encoder: nn.Module, precision: str) -> nn.Module:
    """The fast twin of a ViT or TinyViT image encoder running at ``precision``.

    ``precision`` is ``"fp32"``, ``"int8"`` or ``"bf16"``, not checked against the device here.

    Raises
    ------
    TypeError
        For an encoder of another kind.
    """
    linear = DynamicInt8Linear.from_exact if precision == "int8" else FusedLinear.from_exact
    dtype = torch.bfloat16 if precision == "bf16" else None
    for twin in (FastImageEncoderViT, FastTinyViT):
        if twin.accepts(encoder):
            return twin.from_exact(encoder, linear=linear, autocast_dtype=dtype)
    raise TypeError(f"no fast path for image encoders of type {type(encoder).__name__}")


def resampling_taps(
    low: int, size: int, n_in: int, n_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact path's 1-D resampling ``low -> size -> crop n_in -> n_out`` as sparse taps.

    Returns
    -------
    index : Tensor, shape (n_out, T), int64
        Low-res positions read by each output position.
    weight : Tensor, shape (n_out, T), float32
        Their weights (0 for padding taps).
    """
    # Resampling the identity gives the operator itself, with PyTorch's own weights.
    basis = torch.eye(low, dtype=torch.float32).view(1, low, low, 1)
    up = F.interpolate(basis, size=(size, 1), mode="bilinear", align_corners=False)
    down = F.interpolate(up[:, :, :n_in], size=(n_out, 1), mode="bilinear", align_corners=False)
    return operator_taps(down[0, :, :, 0].T)  # n_out x low

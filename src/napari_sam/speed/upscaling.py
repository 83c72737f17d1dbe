"""The mask decoder's output upscaling on channels-last tokens, and the mask-logit product.

SAM upscales the decoder's image tokens with two stride-2 2 x 2 transposed convolutions around
a channel LayerNorm. Neither convolution mixes pixels: each is a per-token linear map to 2 x 2
sub-pixels, and the channel LayerNorm is a plain LayerNorm over the last axis. So the whole
network runs on ``tokens x channels`` rows as two GEMMs, and the hypernetwork product follows on
those rows; only the final logits are put into image order (one gather of rows).
"""

from __future__ import annotations

import functools
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.models.common import LayerNorm2d
from napari_sam.speed.kernels import fused_linear_available

__all__ = ["is_subpixel_upscaling", "subpixel_weights", "upscale_and_project"]


def is_subpixel_upscaling(upscaling: nn.Sequential) -> bool:
    """Whether ``upscaling`` has SAM's layout.

    That is: 2x2/2 transposed convolution, channel LayerNorm, activation, 2x2/2 transposed
    convolution, activation.
    """
    if len(upscaling) != 5:
        return False
    up1, norm, _, up2, _ = upscaling
    return all(
        isinstance(conv, nn.ConvTranspose2d)
        and conv.kernel_size == (2, 2)
        and conv.stride == (2, 2)
        and conv.padding == (0, 0)
        and conv.output_padding == (0, 0)
        and conv.groups == 1
        and conv.bias is not None
        for conv in (up1, up2)
    ) and all(hasattr(norm, a) for a in ("weight", "bias", "eps"))


def subpixel_weights(upscaling: nn.Sequential) -> tuple[torch.Tensor, ...]:
    """Both transposed convolutions of a SAM upscaling as linear maps per token.

    Returns ``(weight, bias)`` of each: weight ``(2 2 C_out) x C_in`` (sub-pixel major,
    channels last), contiguous.
    """
    out = []
    for conv in cast("tuple[nn.ConvTranspose2d, ...]", (upscaling[0], upscaling[3])):
        cin, cout = conv.weight.shape[:2]
        out.append(conv.weight.permute(2, 3, 1, 0).reshape(4 * cout, cin).contiguous())
        out.append(cast(torch.Tensor, conv.bias).repeat(4))
    return tuple(out)


def upscale_and_project(
    upscaling: nn.Sequential,
    keys: torch.Tensor,
    hyper_in: torch.Tensor,
    grid: tuple[int, int],
    weights: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Mask logits from the decoder's image tokens and hypernetwork outputs.

    Parameters
    ----------
    upscaling : nn.Sequential
        The decoder's ``output_upscaling``; a network of another layout than SAM's runs as it
        is (channels first).
    keys : Tensor, shape (B, N, C)
        Image tokens in row-major order of the ``grid``.
    hyper_in : Tensor, shape (B, M, C_out)
        One row per mask.
    grid : (h, w)
        ``h * w = N``.
    weights : tuple of Tensor, optional
        :func:`subpixel_weights` of ``upscaling``, kept by the caller; without them the layout is
        checked and the weights rebuilt.

    Returns
    -------
    Tensor, shape (B, M, 4h, 4w)
    """
    b = keys.shape[0]
    h, w = grid
    m = hyper_in.shape[1]
    if weights is None and is_subpixel_upscaling(upscaling):
        weights = subpixel_weights(upscaling)
    if weights is None:
        upscaled = upscaling(keys.transpose(1, 2).reshape(b, -1, h, w))
        _, cu, hu, wu = upscaled.shape
        return (hyper_in @ upscaled.reshape(b, cu, hu * wu)).reshape(b, m, hu, wu)
    features = _upscale_rows(upscaling, keys, weights)
    # B x (N 16) x M: M = 1 to 3 columns, memory-bound, a few hundred KB per prompt set.
    logits = torch.bmm(features, hyper_in.transpose(1, 2))
    # Into image order by one gather of whole rows: an 8-D permuted copy with 2-element inner
    # axes is 5x slower.
    pixels = logits.index_select(1, _subpixel_order(h, w, logits.device))
    return pixels.transpose(1, 2).reshape(b, m, 4 * h, 4 * w)


def _upscale_rows(
    upscaling: nn.Sequential, keys: torch.Tensor, weights: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """``B x N x C`` tokens -> ``B x (N 16) x C_out`` features.

    Rows are ordered (token, sub-pixel rows/columns of both levels), channels last.

    On a CPU in float32, oneDNN's fused linear adds the biases inside the GEMMs and applies the
    last GELU in the second one: two passes fewer over the largest tensors.
    """
    _, norm_module, act1, _, act2 = upscaling
    norm = cast(LayerNorm2d, norm_module)  # (or any module with weight, bias, eps)
    b, n = keys.shape[:2]
    fused = keys.device.type == "cpu" and keys.dtype == torch.float32 and fused_linear_available()
    exact_gelu = isinstance(act2, nn.GELU) and act2.approximate == "none"
    w1, b1, w2, b2 = weights

    def subpixel_linear(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        act: nn.Module | None = None,
    ) -> torch.Tensor:
        cout = weight.shape[0] // 4
        x = x.reshape(-1, weight.shape[1])
        if fused and (act is None or exact_gelu):
            attr = "none" if act is None else "gelu"
            out = torch.ops.mkldnn._linear_pointwise(
                x, weight, bias, attr, [], "" if act is None else "none"
            )
        else:
            out = F.linear(x, weight, bias)
            out = out if act is None else act(out)
        return out.reshape(-1, cout)

    x = subpixel_linear(keys, w1, b1)  # (B N 2 2) x C1
    x = act1(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
    x = subpixel_linear(x, w2, b2, act2)  # (B N 2 2 2 2) x C2
    return x.reshape(b, n * 16, -1)


@functools.lru_cache(maxsize=8)
def _subpixel_order(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Row order ``(i, j, dy1, dx1, dy2, dx2)`` of the upscaled features -> image order.

    Entry ``p`` is the row of mask pixel ``p`` (row ``4i + 2 dy1 + dy2``, column
    ``4j + 2 dx1 + dx2``).
    """
    rows = torch.arange(h * w * 16, device=device).view(h, w, 2, 2, 2, 2)
    return rows.permute(0, 2, 4, 1, 3, 5).reshape(-1)

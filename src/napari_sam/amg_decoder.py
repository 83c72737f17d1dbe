"""Many point prompts on one image embedding: SAM's mask decoder, rearranged for throughput.

Automatic mask generation decodes ~1000 single-point prompts against one embedding. The
standard decoder (:class:`~napari_sam.models.mask_decoder.MaskDecoder`) repeats the image
embedding per prompt and projects all ``E*E`` image tokens in every cross-attention, although
only a handful of prompt tokens attend. :func:`decode_shared` computes the same function with
the same weights, reassociated:

- the first block's image-side projections are computed once and shared by all prompts (the
  image tokens are still identical there);
- token-to-image attention projects the few queries into the input space instead of projecting
  every image token (``q . (W_k x + b_k) = (W_k^T q) . x + const``, the constant cancels in the
  softmax; ``sum_j p_j (W_v x_j + b_v) = W_v (sum_j p_j x_j) + b_v``);
- image-to-token attention folds its query and output projections into the prompt tokens'
  side (``(W_q x + b_q) . k = x . (W_q^T k) + b_q . k``; ``W_o (sum_j p_j v_j) = sum_j p_j
  (W_o v_j)``).

For official models this is less than half the multiply-adds per prompt. The outputs equal the
standard decoder's up to float32 rounding (~1e-5 on logits; tested against it).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.speed.kernels import fused_linear_available

__all__ = ["decode_shared"]


def _heads(attn: nn.Module) -> tuple[int, int]:
    return attn.num_heads, attn.internal_dim // attn.num_heads


def _linear_rows(linear: nn.Linear, h: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection's weight as ``h x d x C_in`` and bias as ``h x d`` (one block per head)."""
    return linear.weight.reshape(h, d, -1), linear.bias.reshape(h, d)


def _token_to_image(
    attn: nn.Module, q: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor
) -> torch.Tensor:
    """``attn(q, k_in, v_in)`` for few queries ``B x T x C`` over many image tokens.

    ``k_in`` / ``v_in`` are ``B x N x C``, or ``1 x N x C`` when shared by all prompts.
    """
    b, t, _ = q.shape
    h, d = _heads(attn)
    scale = 1.0 / math.sqrt(d)
    queries = attn.q_proj(q).reshape(b, t, h, d).transpose(1, 2) * scale  # B h T d
    if k_in.shape[0] == 1 and b > 1:
        # Shared image tokens: project them once, attend with one batched matmul per head.
        keys = attn.k_proj(k_in[0]).reshape(-1, h, d).permute(1, 2, 0)  # h d N
        values = attn.v_proj(v_in[0]).reshape(-1, h, d).transpose(0, 1)  # h N d
        flat = queries.transpose(0, 1).reshape(h, b * t, d)
        probs = torch.softmax(flat @ keys, dim=-1)  # h (B T) N
        out = (probs @ values).reshape(h, b, t, d).permute(1, 2, 0, 3)  # B T h d
    else:
        w_k, _ = _linear_rows(attn.k_proj, h, d)
        w_v, b_v = _linear_rows(attn.v_proj, h, d)
        # q . (W_k x + b_k): the b_k term is constant over image tokens and cancels.
        in_space = (queries @ w_k).reshape(b, h * t, -1)  # B (h T) C
        probs = torch.softmax(in_space @ k_in.transpose(1, 2), dim=-1)  # B (h T) N
        mixed = (probs @ v_in).reshape(b, h, t, -1)  # B h T C; rows of probs sum to 1
        out = (mixed @ w_v.transpose(1, 2) + b_v[:, None, :]).transpose(1, 2)  # B T h d
    return attn.out_proj(out.reshape(b, t, h * d))


def _image_to_token(
    attn: nn.Module, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``attn(q_in, k, v)`` for many image-token queries ``B' x N x C`` over ``B x T`` tokens.

    Returns ``B x N x C``; ``q_in`` may be ``1 x N x C`` (shared by all prompts).
    """
    b, t, _ = k.shape
    h, d = _heads(attn)
    scale = 1.0 / math.sqrt(d)
    keys = attn.k_proj(k).reshape(b, t, h, d).transpose(1, 2) * scale  # B h T d
    values = attn.v_proj(v).reshape(b, t, h, d).transpose(1, 2)  # B h T d
    # Logits laid out B x h x T x N: the softmax over the T prompt tokens then runs along a
    # contiguous N axis (a softmax over a last axis of ~7 is slow).
    if q_in.shape[0] == 1 and b > 1:
        queries = attn.q_proj(q_in[0]).reshape(-1, h, d).permute(1, 2, 0)  # h d N
        flat_keys = keys.transpose(0, 1).reshape(h, b * t, d)
        logits = (flat_keys @ queries).reshape(h, b, t, -1).transpose(0, 1)  # B h T N
    else:
        w_q, b_q = _linear_rows(attn.q_proj, h, d)
        # (W_q x + b_q) . k = x . (W_q^T k) + b_q . k
        in_space = (keys @ w_q).reshape(b, h * t, -1)  # B (h T) C
        bias = (keys * b_q[None, :, None, :]).sum(-1).reshape(b, h * t, 1)
        logits = torch.baddbmm(bias, in_space, q_in.transpose(1, 2)).reshape(b, h, t, -1)
    probs = torch.softmax(logits, dim=2).reshape(b, h * t, -1)  # B (h T) N
    # out_proj(concat_h sum_j p_hj v_hj) = sum_hj p_hj (W_o,h v_hj + b_o / h): each head's
    # probabilities sum to 1, so the bias rides along in the product (no separate pass).
    w_o = attn.out_proj.weight.reshape(-1, h, d)  # C_out h d
    projected = torch.einsum("bhtd,chd->bhtc", values, w_o) + attn.out_proj.bias / h
    return probs.transpose(1, 2) @ projected.reshape(b, h * t, -1)  # B N C_out


def _subpixel_weights(upscaling: nn.Sequential) -> tuple[torch.Tensor, ...]:
    """Both transposed convolutions of the output upscaling as ``(weight, bias)`` of a linear
    map per token: weight ``(2 2 C_out) x C_in`` (sub-pixel major, channels last), contiguous."""
    out = []
    for conv in (upscaling[0], upscaling[3]):
        cin, cout = conv.weight.shape[:2]
        out.append(conv.weight.permute(2, 3, 1, 0).reshape(4 * cout, cin).contiguous())
        out.append(conv.bias.repeat(4))
    return tuple(out)


def _is_subpixel_upscaling(upscaling: nn.Sequential) -> bool:
    """SAM's layout: 2x2/2 transposed convolution, channel LayerNorm, activation, 2x2/2
    transposed convolution, activation."""
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


def _upscale_channels_last(
    upscaling: nn.Sequential,
    keys: torch.Tensor,
    grid: tuple[int, int],
    weights: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """SAM's output upscaling applied to image tokens ``B x N x C`` without leaving token order.

    Each stride-2 2x2 transposed convolution is a per-token linear map to 2 x 2 sub-pixels, and
    the channel LayerNorm is a plain LayerNorm over the last axis, so the whole network runs on
    channels-last rows. Returns features ``B x (N 16) x C_out`` (token, sub-pixel rows/columns
    of both levels, channels) and the output grid, or None for an unexpected layout. Pass
    ``weights`` (:func:`_subpixel_weights` of this network, kept by the caller) to skip
    rebuilding them.

    On a CPU in float32, oneDNN's fused linear adds the biases inside the GEMMs and applies the
    last GELU in the second one: two passes fewer over the largest tensors.
    """
    if weights is None:  # (given weights are _subpixel_weights of this layout)
        if not _is_subpixel_upscaling(upscaling):
            return None
        weights = _subpixel_weights(upscaling)
    _, norm, act1, _, act2 = upscaling
    b, n = keys.shape[:2]
    fused = keys.device.type == "cpu" and keys.dtype == torch.float32 and fused_linear_available()
    exact_gelu = isinstance(act2, nn.GELU) and act2.approximate == "none"
    w1, b1, w2, b2 = weights

    def subpixel_linear(x: torch.Tensor, weight, bias, act=None) -> torch.Tensor:
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
    return x.reshape(b, n * 16, -1), (4 * grid[0], 4 * grid[1])


def _upscale_and_project(
    upscaling: nn.Sequential,
    keys: torch.Tensor,
    hyper_in: torch.Tensor,
    grid: tuple[int, int],
    weights: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """``B x N x C`` image tokens and ``B x M x C_out`` hypernetwork outputs -> ``B x M x 4h x
    4w`` mask logits (``weights`` as for :func:`_upscale_channels_last`)."""
    b = keys.shape[0]
    h, w = grid
    m = hyper_in.shape[1]
    rows = _upscale_channels_last(upscaling, keys, grid, weights)
    if rows is None:  # an upscaling network of another shape: run it as it is
        upscaled = upscaling(keys.transpose(1, 2).reshape(b, -1, h, w))
        _, cu, hu, wu = upscaled.shape
        return (hyper_in @ upscaled.reshape(b, cu, hu * wu)).reshape(b, m, hu, wu)
    features, (hu, wu) = rows
    # B x (N 16) x M: M = 1 to 3 columns, memory-bound, a few hundred KB per prompt set.
    logits = torch.bmm(features, hyper_in.transpose(1, 2))
    # Into image order by one gather of whole rows: an 8-D permuted copy with 2-element inner
    # axes is 5x slower.
    pixels = logits.index_select(1, _subpixel_order(h, w, logits.device))
    return pixels.transpose(1, 2).reshape(b, m, hu, wu)


@functools.lru_cache(maxsize=8)
def _subpixel_order(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Row order ``(i, j, dy1, dx1, dy2, dx2)`` of the upscaled features -> image order: entry
    ``p`` is the row of mask pixel ``p`` (row ``4i + 2 dy1 + dy2``, column ``4j + 2 dx1 + dx2``)."""
    rows = torch.arange(h * w * 16, device=device).view(h, w, 2, 2, 2, 2)
    return rows.permute(0, 2, 4, 1, 3, 5).reshape(-1)


def _self_attention(layer: nn.Module, queries: torch.Tensor, query_pe: torch.Tensor):
    """A TwoWayAttentionBlock's first step: the prompt tokens' self-attention, then norm1."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    return layer.norm1(queries)


def _block(layer: nn.Module, queries, keys, query_pe, key_pe):
    """One TwoWayAttentionBlock with the rearranged cross-attentions."""
    queries = _self_attention(layer, queries, query_pe)
    k = keys + key_pe
    attn_out = _token_to_image(layer.cross_attn_token_to_image, queries + query_pe, k, keys)
    queries = layer.norm2(queries + attn_out)
    queries = layer.norm3(queries + layer.mlp(queries))
    attn_out = _image_to_token(layer.cross_attn_image_to_token, k, queries + query_pe, queries)
    keys = layer.norm4(keys + attn_out)
    return queries, keys


@torch.no_grad()
def decode_shared(
    mask_decoder: nn.Module,
    image_embedding: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embedding: torch.Tensor,
    multimask_output: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``B`` prompt sets that share one image embedding and one dense embedding.

    Equal (up to float32 rounding) to ``mask_decoder(image_embedding, image_pe, sparse,
    dense.expand(B, ...), multimask_output)``.

    Parameters
    ----------
    mask_decoder : MaskDecoder
    image_embedding, image_pe, dense_prompt_embedding : Tensor, shape (1, C, E, E)
        The dense embedding is shared too (no mask prompt: the no-mask embedding).
    sparse_prompt_embeddings : Tensor, shape (B, K, C)
    multimask_output : bool

    Returns
    -------
    masks : Tensor, shape (B, M, 4E, 4E)
        Low-resolution logits; ``M`` = 3 with multimask output, else 1.
    iou_pred : Tensor, shape (B, M)
    """
    dec = mask_decoder
    b = sparse_prompt_embeddings.shape[0]
    for name, t in (("image_embedding", image_embedding), ("dense", dense_prompt_embedding)):
        if t.ndim != 4 or t.shape[0] != 1:
            raise ValueError(f"{name} must be 1 x C x E x E (shared), got {tuple(t.shape)}")
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat(
        [output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1
    )
    src = image_embedding + dense_prompt_embedding
    h, w = src.shape[-2:]
    transformer = dec.transformer
    keys = src.flatten(2).transpose(1, 2)  # 1 x N x C until the first block writes to it
    key_pe = image_pe.flatten(2).transpose(1, 2)
    queries = tokens
    for layer in transformer.layers:
        queries, keys = _block(layer, queries, keys, tokens, key_pe)
    keys = keys.expand(b, -1, -1)
    attn_out = _token_to_image(
        transformer.final_attn_token_to_image, queries + tokens, keys + key_pe, keys
    )
    queries = transformer.norm_final_attn(queries + attn_out)

    selected = range(1, dec.num_mask_tokens) if multimask_output else range(1)
    hyper_in = torch.stack(
        [dec.output_hypernetworks_mlps[i](queries[:, 1 + i, :]) for i in selected], dim=1
    )
    masks = _upscale_and_project(dec.output_upscaling, keys, hyper_in, (h, w))
    iou_pred = dec.iou_prediction_head(queries[:, 0, :])[:, list(selected)]
    return masks, iou_pred

"""A faster mask decoder: same mathematics as SAM's, with less work per prompt.

A click runs the decoder on the 64 x 64 = 4096 image tokens with only about 7 prompt tokens;
automatic mask generation runs it on ~1000 single-point prompts against one embedding. The
exact decoder (:class:`~napari_sam.models.mask_decoder.MaskDecoder`) projects all image tokens
in every cross-attention although only a handful of prompt tokens attend. This decoder computes
the same function with the same weights, reassociated around the few prompt tokens:

- token-to-image attention projects the few queries into the input space instead of projecting
  every image token (``q . (W_k x + b_k) = (W_k^T q) . x + const``, the constant cancels in the
  softmax; ``sum_j p_j (W_v x_j + b_v) = W_v (sum_j p_j x_j) + b_v``);
- image-to-token attention folds its query and output projections into the prompt tokens'
  side (``(W_q x + b_q) . k = x . (W_q^T k) + b_q . k``; ``W_o (sum_j p_j v_j) = sum_j p_j
  (W_o v_j)``);
- when every prompt set sees the same image tokens (one embedding, and a dense prompt that is
  one vector broadcast everywhere: the no-mask embedding), the first layer's image-side
  projections do not depend on the prompts: they are computed once per image embedding and
  shared by every prompt set of a batch and every later call (clicks, grid batches);
- the positional encoding enters the attention logits through its projections, computed
  once per weight change, so ``keys + key_pe`` is never formed;
- the final attention runs for the output tokens that are read only; the hypernetwork MLPs of
  the returned mask tokens run as one batched product per layer;
- the output upscaling runs on channels-last tokens (:mod:`napari_sam.speed.upscaling`).

For official models this is less than half the multiply-adds per prompt. The result equals the
exact decoder up to float32 rounding (about 1e-5 on the logits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.models.mask_decoder import MaskDecoder
from napari_sam.models.transformer import Attention, TwoWayAttentionBlock
from napari_sam.speed.kernels import DerivedWeights
from napari_sam.speed.twin import FastTwin
from napari_sam.speed.upscaling import (
    is_subpixel_upscaling,
    subpixel_weights,
    upscale_and_project,
)

__all__ = ["FastMaskDecoder"]


class FastMaskDecoder(FastTwin, MaskDecoder):
    """Fast twin of a :class:`~napari_sam.models.mask_decoder.MaskDecoder` (same interface).

    Made with ``FastMaskDecoder.from_exact(decoder)``; the parameters are the decoder's.
    """

    exact_type = MaskDecoder

    def speed_up(self, exact: MaskDecoder) -> None:
        """Caches of the image side and of the weights rearranged for the fast products."""
        self._image_cache: tuple | None = None
        self._stacked_hypernetworks = DerivedWeights(
            self._hypernetwork_sources, self._hypernetwork_weights
        )
        self._upscaling_weights = DerivedWeights(
            lambda: list(self.output_upscaling.parameters()),
            lambda: subpixel_weights(self.output_upscaling),
        )

    # forward() is MaskDecoder's; it calls predict_masks below.

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        selected: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of the ``selected`` mask tokens (all by default) and IoUs of all tokens."""
        tokens = self._tokens(
            image_embeddings,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            dtype=image_embeddings.dtype,
        )
        h, w = image_embeddings.shape[-2:]
        image = self._image_side(image_embeddings, image_pe, dense_prompt_embeddings)
        # Only the IoU token and the selected mask tokens are read after the transformer.
        wanted = [0] + [1 + i for i in range(self.num_mask_tokens)[selected]]
        queries, keys = self._transformer(tokens, image, wanted)

        hyper_in = self._hypernetworks(queries[:, 1:], selected)
        masks = self._upscale_and_project(keys, hyper_in, (h, w))
        iou_pred = self.iou_prediction_head(queries[:, 0, :])
        return masks, iou_pred

    # -- image side ----------------------------------------------------------------------------

    @staticmethod
    def shares_image(image_embeddings: torch.Tensor, dense: torch.Tensor) -> bool:
        """Whether every prompt set sees the same image tokens.

        True for one image embedding and a dense prompt that is one vector broadcast to every
        prompt set and position (the prompt encoder's no-mask embedding).
        """
        return (
            image_embeddings.shape[0] == 1
            and (dense.shape[0] == 1 or dense.stride(0) == 0)
            and dense.stride(2) == 0
            and dense.stride(3) == 0
        )

    def _image_side(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
    ) -> dict:
        """Image tokens, their positions and (when prompt-independent) layer-0 projections."""
        shared = self.shares_image(image_embeddings, dense)
        if shared:
            # The dense vector by address and version: the cache holds the tensor (below), so
            # no other tensor can take its address while the entry lives.
            key = (
                image_embeddings,
                image_embeddings._version,
                image_pe,
                image_pe._version,
                (dense.data_ptr(), dense._version, dense.stride(1), dense.dtype),
                self._weights_key(),
            )
            cache = self._image_cache
            if cache is not None and all(
                (a is b) if isinstance(a, torch.Tensor) else a == b
                for a, b in zip(cache[0], key, strict=True)
            ):
                return cache[1]
        dense = dense[:1] if shared else dense
        b = max(image_embeddings.shape[0], dense.shape[0])
        # Tokens B x N x C straight from the sum, in one pass (no channels-first intermediate).
        emb_rows, dense_rows = (t.flatten(2).transpose(1, 2) for t in (image_embeddings, dense))
        keys = emb_rows.new_empty(b, *emb_rows.shape[1:])
        torch.add(emb_rows, dense_rows, out=keys)
        state = {"keys": keys, "shared": shared, **self._positional(image_pe)}
        if shared:
            layer = self.transformer.layers[0]
            k = keys + state["key_pe"]
            t2i = layer.cross_attn_token_to_image
            i2t = layer.cross_attn_image_to_token
            state["t2i_k"] = t2i.k_proj(k)
            state["t2i_v"] = t2i.v_proj(keys)
            state["i2t_q"] = i2t.q_proj(k)
            # Keep references to the key tensors so that their ids cannot be reused.
            self._image_cache = (key, state, dense)
        return state

    def _weights_key(self) -> tuple:
        layer = self.transformer.layers[0]
        modules = (
            layer.cross_attn_token_to_image.k_proj,
            layer.cross_attn_token_to_image.v_proj,
            layer.cross_attn_image_to_token.q_proj,
        )
        return tuple((p.data_ptr(), p._version) for m in modules for p in m.parameters())

    # -- two-way transformer -------------------------------------------------------------------

    def _transformer(
        self, tokens: torch.Tensor, image: dict, wanted: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer; returns the ``wanted`` output tokens and the image tokens.

        The final attention changes each prompt token on its own (no token sees another after
        it), so it runs for the wanted tokens only: with one mask asked for, 2 of the 7 rows
        of its two 4096-token products.
        """
        t = self.transformer
        keys, folded = image["keys"], image["pe_folded"]
        queries = tokens
        # Image tokens are per prompt set (batch B) from the first attention on: the shared
        # first layer's residual makes one copy per prompt set.
        for i, layer in enumerate(t.layers):
            if i == 0 and image["shared"]:
                queries, keys = _cached_block(layer, queries, keys, tokens, image)
            else:
                queries, keys = _pe_folded_block(layer, queries, keys, tokens, *folded[i])
        keys = keys.expand(tokens.shape[0], -1, -1)
        queries, tokens = queries[:, wanted], tokens[:, wanted]
        q = queries + tokens
        attn_out = _token_to_image_folded(t.final_attn_token_to_image, q, keys, folded[-1][0])
        queries = t.norm_final_attn(queries + attn_out)
        return queries, keys

    def _positional(self, image_pe: torch.Tensor) -> dict:
        """The positional encoding as tokens and through each attention's projection.

        ``image_pe`` as ``1 x N x C`` tokens (``"key_pe"``) and, per attention over the image
        tokens, the key (or query) projection of it, ``heads x d x N`` (``"pe_folded"``): with
        those, ``keys + key_pe`` (a pass over all image tokens per layer) is never formed. Kept
        while ``image_pe`` is the same tensor and the weights are unchanged.
        """
        t = self.transformer
        projs = [t.final_attn_token_to_image.k_proj]
        for layer in t.layers:
            t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            projs += [t2i.k_proj, i2t.q_proj]
        key = (image_pe._version, tuple((m.weight.data_ptr(), m.weight._version) for m in projs))
        cached = self.__dict__.get("_positional_cache")
        # The tensor itself, not its address, is compared (and kept alive by the cache).
        if cached is not None and cached[0] is image_pe and cached[1] == key:
            return cached[2]
        with torch.no_grad():
            tokens = image_pe.flatten(2).transpose(1, 2).contiguous()
            pe = tokens[0]  # N x C
            folded = []
            for layer in t.layers:
                t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
                folded.append((_project_pe(t2i, t2i.k_proj, pe), _project_pe(i2t, i2t.q_proj, pe)))
            final = t.final_attn_token_to_image
            folded.append((_project_pe(final, final.k_proj, pe),))
        value = {"key_pe": tokens, "pe_folded": folded}
        self.__dict__["_positional_cache"] = (image_pe, key, value)
        return value

    def _hypernetworks(self, tokens: torch.Tensor, selected: slice) -> torch.Tensor:
        """Each mask token through its own MLP, all tokens in one batched product per layer."""
        layers = self._stacked_hypernetworks.get()
        n = len(layers) // 2
        x = tokens.transpose(0, 1)  # M x B x C
        for i in range(n):
            weight, bias = layers[2 * i][selected], layers[2 * i + 1][selected]
            x = torch.baddbmm(bias.unsqueeze(1), x, weight)
            if i < n - 1:
                x = torch.relu_(x)
        return x.transpose(0, 1)

    def _hypernetwork_sources(self) -> list[torch.Tensor]:
        return [p for mlp in self.output_hypernetworks_mlps for p in mlp.parameters()]

    def _hypernetwork_weights(self) -> tuple[torch.Tensor, ...]:
        mlps = self.output_hypernetworks_mlps
        out = []
        for i in range(mlps[0].num_layers):
            out.append(torch.stack([m.layers[i].weight.T for m in mlps]))  # M x in x out
            out.append(torch.stack([m.layers[i].bias for m in mlps]))  # M x out
        return tuple(out)

    # -- output upscaling ----------------------------------------------------------------------

    def _upscale_and_project(
        self, keys: torch.Tensor, hyper_in: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """``B x N x C`` image tokens -> ``B x M x 4h x 4w`` mask logits (``M`` hypernetworks)."""
        upscaling = self.output_upscaling
        weights = self._upscaling_weights.get() if is_subpixel_upscaling(upscaling) else None
        return upscale_and_project(upscaling, keys, hyper_in, size, weights)


def _heads(attn: Attention) -> tuple[int, int]:
    """Number of heads and width per head of an attention."""
    return attn.num_heads, attn.internal_dim // attn.num_heads


def _self_attention(
    layer: TwoWayAttentionBlock, queries: torch.Tensor, query_pe: torch.Tensor
) -> torch.Tensor:
    """A two-way block's first step: the prompt tokens' self-attention, then norm1."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    return layer.norm1(queries)


def _project_pe(attn: Attention, linear: nn.Linear, pe: torch.Tensor) -> torch.Tensor:
    """``W pe^T`` per head (no bias: it is handled where the projection is used): ``h x d x N``."""
    heads, d = _heads(attn)
    return (pe @ linear.weight.T).view(-1, heads, d).permute(1, 2, 0).contiguous()


def _pe_folded_block(
    layer: TwoWayAttentionBlock,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    t2i_pe: torch.Tensor,
    i2t_pe: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A two-way block on per-prompt image tokens.

    Their positional encoding enters the attention logits through its precomputed projections
    (``t2i_pe``, ``i2t_pe``).
    """
    queries = _self_attention(layer, queries, query_pe)
    attn_out = _token_to_image_folded(
        layer.cross_attn_token_to_image, queries + query_pe, keys, t2i_pe
    )
    queries = layer.norm2(queries + attn_out)
    queries = layer.norm3(queries + layer.mlp(queries))
    attn = layer.cross_attn_image_to_token
    b, t, _ = queries.shape
    heads, d = _heads(attn)
    kp = attn.k_proj(queries + query_pe).view(b, t, heads, d).transpose(1, 2) / math.sqrt(d)
    w_q = attn.q_proj.weight.view(heads, d, -1)
    # (W_q (x + pe) + b_q) . k = x . (W_q^T k) + (W_q pe) . k + b_q . k
    in_space = (kp @ w_q).reshape(b, heads * t, -1)
    fixed = kp @ i2t_pe + (kp * attn.q_proj.bias.view(heads, 1, d)).sum(-1, keepdim=True)
    logits = torch.baddbmm(fixed.reshape(b, heads * t, -1), in_space, keys.transpose(1, 2))
    # keys are this call's own tensor (the token sum, or the previous block's output), no
    # longer needed: the residual accumulates into them in place.
    summed = _image_to_token_output(attn, logits, queries, b, t, heads, d, accumulate=keys)
    return queries, layer.norm4(summed)


def _token_to_image_folded(
    attn: Attention, q: torch.Tensor, keys: torch.Tensor, key_pe_proj: torch.Tensor
) -> torch.Tensor:
    """``attn(q, keys + pe, keys)`` for ``B x T`` prompt tokens over ``B x N`` image tokens.

    ``key_pe_proj`` is ``W_k pe^T`` per head (``h x d x N``).
    """
    b, t, _ = q.shape
    heads, d = _heads(attn)
    qp = attn.q_proj(q).view(b, t, heads, d).transpose(1, 2) / math.sqrt(d)  # B h T d
    w_k = attn.k_proj.weight.view(heads, d, -1)
    # q . (W_k (x + pe) + b_k): the b_k term is constant over image tokens and cancels.
    in_space = (qp @ w_k).reshape(b, heads * t, -1)  # B (h T) C
    fixed = (qp @ key_pe_proj).reshape(b, heads * t, -1)  # B (h T) N
    probs = torch.softmax(torch.baddbmm(fixed, in_space, keys.transpose(1, 2)), dim=-1)
    mixed = (probs @ keys).view(b, heads, t, -1)  # rows of probs sum to 1
    w_v = attn.v_proj.weight.view(heads, d, -1)
    out = (mixed @ w_v.transpose(1, 2) + attn.v_proj.bias.view(heads, 1, d)).transpose(1, 2)
    return attn.out_proj(out.reshape(b, t, heads * d))


def _cached_block(
    layer: TwoWayAttentionBlock,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    cached: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two-way block with its image-side projections taken from ``cached``.

    ``keys`` are the shared (batch 1) image tokens; the residual gives one copy per prompt.
    """
    queries = _self_attention(layer, queries, query_pe)
    attn_out = _token_to_image_projected(
        layer.cross_attn_token_to_image, queries + query_pe, cached["t2i_k"], cached["t2i_v"]
    )
    queries = layer.norm2(queries + attn_out)
    queries = layer.norm3(queries + layer.mlp(queries))
    attn_out = _image_to_token_projected(
        layer.cross_attn_image_to_token, cached["i2t_q"], queries + query_pe, queries
    )
    return queries, layer.norm4(keys + attn_out)


def _token_to_image_projected(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``attn(q, ., .)`` for ``B x T`` prompt tokens over shared, projected image tokens.

    ``k``, ``v``: the key and value projections of the image tokens, ``1 x N x Ci``.
    """
    b, t, _ = q.shape
    heads, d = _heads(attn)
    qp = attn.q_proj(q).view(b, t, heads, d).transpose(1, 2)
    n = k.shape[1]
    kh = k.view(1, n, heads, d).transpose(1, 2).expand(b, -1, -1, -1)
    vh = v.view(1, n, heads, d).transpose(1, 2).expand(b, -1, -1, -1)
    out = F.scaled_dot_product_attention(qp, kh, vh)
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, heads * d))


def _image_to_token_projected(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``attn(., k, v)`` for shared, projected image-token queries over ``B x T`` prompt tokens.

    ``q``: the query projection of the image tokens, ``1 x N x Ci``; ``B x N x C`` out.
    """
    b, t, _ = k.shape
    heads, d = _heads(attn)
    kp = attn.k_proj(k).view(b, t, heads, d) * (1.0 / math.sqrt(d))
    n = q.shape[1]
    # (B, T, heads, d) x (N, heads, d) -> (B, heads * T, N)
    logits = torch.einsum("bthd,nhd->bhtn", kp, q.view(n, heads, d)).reshape(b, heads * t, n)
    return _image_to_token_output(attn, logits, v, b, t, heads, d)


def _image_to_token_output(
    attn: Attention,
    logits: torch.Tensor,
    v: torch.Tensor,
    b: int,
    t: int,
    heads: int,
    d: int,
    accumulate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``B x (heads * T) x N`` logits -> ``B x N x C`` attention output (after out_proj).

    With ``accumulate`` (``B x N x C``, contiguous), the output is added to it in place by the
    same GEMM (a residual connection without a copy of the residual) and it is returned.
    """
    n = logits.shape[-1]
    # Softmax over each head's T prompt tokens; N stays the contiguous (vectorised) axis.
    probs = torch.softmax(logits.view(b, heads, t, n), dim=2).view(b, heads * t, n)
    vp = attn.v_proj(v).view(b, t, heads, d)
    wo = attn.out_proj.weight.view(-1, heads, d)  # C x heads x d
    u = torch.einsum("bthd,chd->bhtc", vp, wo).reshape(b, heads * t, -1)
    if accumulate is None:
        return torch.baddbmm(attn.out_proj.bias, probs.transpose(1, 2), u)
    # Each head's probabilities sum to 1 over its T tokens, so out_proj's bias rides along in
    # the product as bias / heads per row of u.
    return accumulate.baddbmm_(probs.transpose(1, 2), u + attn.out_proj.bias / heads)

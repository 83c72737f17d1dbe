"""Two-way transformer of SAM's mask decoder: prompt and image tokens attend to each other."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.models.common import MLPBlock

__all__ = ["Attention", "TwoWayAttentionBlock", "TwoWayTransformer"]


class TwoWayTransformer(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock` and a last token-to-image attention.

    Parameters
    ----------
    depth : int
        Number of two-way blocks.
    embedding_dim : int
        Width of tokens and image embedding.
    num_heads : int
        Attention heads.
    mlp_dim : int
        Hidden width of the token MLP.
    activation : type of nn.Module
        Activation of the token MLP.
    attention_downsample_rate : int
        The cross attentions project to ``embedding_dim / attention_downsample_rate``.
    mlp_block : callable
        ``mlp_block(embedding_dim, mlp_dim, activation)`` builds each token MLP: SAM's
        :class:`~napari_sam.models.common.MLPBlock` (``lin1`` / ``lin2``), or SAM 2's
        two-layer MLP (``layers.0`` / ``layers.1``); the checkpoint keys differ, not the maths.
    """

    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        mlp_block: Callable[[int, int, type[nn.Module]], nn.Module] = MLPBlock,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=i == 0,
                mlp_block=mlp_block,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the two-way attention.

        Parameters
        ----------
        image_embedding : Tensor
            ``B x C x h x w``.
        image_pe : Tensor
            Positional encoding, ``B x C x h x w`` (or broadcastable batch 1).
        point_embedding : Tensor
            Query tokens, ``B x N x C``; also their positional encoding.

        Returns
        -------
        queries : Tensor
            ``B x N x C`` processed tokens.
        keys : Tensor
            ``B x (h w) x C`` processed image tokens.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=key_pe)
        attn_out = self.final_attn_token_to_image(
            q=queries + point_embedding, k=keys + key_pe, v=keys
        )
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image attention, token MLP, image-to-token attention.

    Parameters
    ----------
    embedding_dim, num_heads, mlp_dim : int
        Width, heads and MLP hidden width.
    activation : type of nn.Module
        Activation of the MLP.
    attention_downsample_rate : int
        Internal width divisor of the cross attentions.
    skip_first_layer_pe : bool
        The first block's self-attention replaces (rather than updates) the tokens and sees no
        positional encoding, as in SAM.
    mlp_block : callable
        Builds the token MLP, see :class:`TwoWayTransformer`.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        mlp_block: Callable[[int, int, type[nn.Module]], nn.Module] = MLPBlock,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = mlp_block(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        k = keys + key_pe
        queries = self.norm2(
            queries + self.cross_attn_token_to_image(q=queries + query_pe, k=k, v=keys)
        )
        queries = self.norm3(queries + self.mlp(queries))

        attn_out = self.cross_attn_image_to_token(q=k, k=queries + query_pe, v=queries)
        keys = self.norm4(keys + attn_out)
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention whose projections may narrow the width by ``downsample_rate``.

    Parameters
    ----------
    embedding_dim : int
        Width of inputs and output.
    num_heads : int
        Heads; must divide ``embedding_dim / downsample_rate``.
    downsample_rate : int
        Internal width divisor.
    kv_in_dim : int or None
        Width of the keys and values when it differs from the queries' (SAM 2's memory
        attention reads 64-channel memories); None means ``embedding_dim``.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        kv_in_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must divide the internal width ({self.internal_dim})"
            )
        self.kv_in_dim = embedding_dim if kv_in_dim is None else kv_in_dim
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.v_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attend ``q`` (``B x Nq x C``) over ``k`` / ``v`` (``B x Nk x C``): ``B x Nq x C``."""
        q = self._split_heads(self.q_proj(q))
        k = self._split_heads(self.k_proj(k))
        v = self._split_heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))

"""SAM 2's memory attention: the current frame's features attend to the memory bank.

Each layer is pre-norm: RoPE self-attention over the frame's tokens, RoPE cross-attention
to the memories (spatial memories of earlier frames followed by object-pointer tokens), and
an MLP. Inputs and outputs are sequence-first (``HW x B x C``), as SAM 2's tracking code
passes them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.models.sam2.rope import RoPEAttention

__all__ = ["MemoryAttention", "MemoryAttentionLayer"]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "glu": F.glu,
}


class MemoryAttentionLayer(nn.Module):
    """Self-attention, cross-attention to memories, MLP; each pre-norm with a residual.

    Parameters
    ----------
    activation : {"relu", "gelu", "glu"}
        MLP activation.
    cross_attention : RoPEAttention
        Queries from the frame, keys/values from the memories (``kv_in_dim`` wide).
    d_model : int
        Token width.
    dim_feedforward : int
        MLP hidden width.
    dropout : float
        Dropout of the residual branches while training.
    pos_enc_at_attn : bool
        Add the frame's position encoding to the self-attention queries and keys.
    pos_enc_at_cross_attn_keys, pos_enc_at_cross_attn_queries : bool
        Add the memories' / frame's position encoding in the cross-attention.
    self_attention : RoPEAttention
        Over the frame's tokens.
    """

    def __init__(
        self,
        activation: str,
        cross_attention: nn.Module,
        d_model: int,
        dim_feedforward: int,
        dropout: float,
        pos_enc_at_attn: bool,
        pos_enc_at_cross_attn_keys: bool,
        pos_enc_at_cross_attn_queries: bool,
        self_attention: nn.Module,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        self.d_model = d_model
        self.dim_feedforward = dim_feedforward
        self.self_attn = self_attention
        self.cross_attn_image = cross_attention
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation: Callable[[torch.Tensor], torch.Tensor] = _ACTIVATIONS[activation]
        self.pos_enc_at_attn = pos_enc_at_attn
        self.pos_enc_at_cross_attn_queries = pos_enc_at_cross_attn_queries
        self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
        num_k_exclude_rope: int = 0,
    ) -> torch.Tensor:
        """Run the layer, batch-first.

        ``tgt`` are ``B x N x C`` frame tokens, ``memory`` ``B x M x C_mem``, ``pos`` /
        ``query_pos`` their encodings; the last ``num_k_exclude_rope`` memory tokens (object
        pointers) are not rotated.
        """
        if query_pos is None and (self.pos_enc_at_attn or self.pos_enc_at_cross_attn_queries):
            raise ValueError("this layer adds the frame's position encoding: pass query_pos")
        if pos is None and self.pos_enc_at_cross_attn_keys:
            raise ValueError("this layer adds the memories' position encoding: pass pos")
        x = self.norm1(tgt)
        q = x + query_pos if self.pos_enc_at_attn and query_pos is not None else x
        tgt = tgt + self.dropout1(self.self_attn(q, q, v=x))

        x = self.norm2(tgt)
        extra = {"num_k_exclude_rope": num_k_exclude_rope} if num_k_exclude_rope else {}
        x = self.cross_attn_image(
            q=x + query_pos if self.pos_enc_at_cross_attn_queries and query_pos is not None else x,
            k=memory + pos if self.pos_enc_at_cross_attn_keys and pos is not None else memory,
            v=memory,
            **extra,
        )
        tgt = tgt + self.dropout2(x)

        x = self.linear2(self.dropout(self.activation(self.linear1(self.norm3(tgt)))))
        return tgt + self.dropout3(x)


class MemoryAttention(nn.Module):
    """A stack of :class:`MemoryAttentionLayer` (deep copies of ``layer``) and a final norm.

    Parameters
    ----------
    d_model : int
        Token width.
    pos_enc_at_input : bool
        Add 0.1 x the frame's position encoding to its tokens first.
    layer : MemoryAttentionLayer
        Layer to repeat.
    num_layers : int
        Copies.
    """

    def __init__(
        self, d_model: int, pos_enc_at_input: bool, layer: nn.Module, num_layers: int
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)
        self.pos_enc_at_input = pos_enc_at_input

    def forward(
        self,
        curr: torch.Tensor | list[torch.Tensor],
        memory: torch.Tensor,
        curr_pos: torch.Tensor | list[torch.Tensor] | None = None,
        memory_pos: torch.Tensor | None = None,
        num_obj_ptr_tokens: int = 0,
    ) -> torch.Tensor:
        """Condition the frame on the memories.

        Parameters
        ----------
        curr : Tensor or list of one Tensor
            ``HW x B x C`` frame tokens.
        memory : Tensor
            ``M x B x C_mem`` memory tokens, object pointers last.
        curr_pos, memory_pos : Tensor (or list of one) or None
            Their position encodings.
        num_obj_ptr_tokens : int
            How many trailing memory tokens are object pointers (not rotated).

        Returns
        -------
        Tensor
            ``HW x B x C``.
        """
        if isinstance(curr, list):
            if len(curr) != 1 or not isinstance(curr_pos, list) or len(curr_pos) != 1:
                raise ValueError("curr and curr_pos must be lists of one tensor each")
            curr, curr_pos = curr[0], curr_pos[0]
        elif isinstance(curr_pos, list):
            raise ValueError("curr_pos must be a tensor when curr is one")
        if curr.shape[1] != memory.shape[1]:
            raise ValueError(
                f"batch sizes differ: {curr.shape[1]} frame(s), {memory.shape[1]} memory"
            )
        output = curr
        if self.pos_enc_at_input and curr_pos is not None:
            output = output + 0.1 * curr_pos
        output = output.transpose(0, 1)
        query_pos = curr_pos.transpose(0, 1) if curr_pos is not None else None
        memory = memory.transpose(0, 1)
        memory_pos = memory_pos.transpose(0, 1) if memory_pos is not None else None
        for layer in self.layers:
            exclude = num_obj_ptr_tokens if isinstance(layer.cross_attn_image, RoPEAttention) else 0
            output = layer(
                tgt=output,
                memory=memory,
                pos=memory_pos,
                query_pos=query_pos,
                num_k_exclude_rope=exclude,
            )
        return self.norm(output).transpose(0, 1)

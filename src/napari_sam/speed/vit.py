"""A faster forward pass for SAM's ViT image encoder, sharing the exact model's weights.

Same mathematics as :class:`~napari_sam.models.image_encoder.ImageEncoderViT`, arranged for
speed on a CPU:

- attention runs in PyTorch's fused (flash) SDPA kernel, which needs 4-D ``B x heads x N x d``
  inputs; the relative-position bias is built a few heads at a time (bounded memory);
- the query/key/value projection runs on the image's tokens only, not on the padding of the
  attention windows (whose tokens are zero after the norm, so their q/k/v are the bias), and
  the output projection runs after the padding is cropped: 16 % less work in windowed blocks;
- residual additions happen in place;
- optionally the ``Linear`` layers run in int8 (:class:`~napari_sam.speed.int8.DynamicInt8Linear`).

The fast modules hold the exact model's parameters (not copies), under the same names, so
their state dict is the exact model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.models.common import MLPBlock
from napari_sam.models.image_encoder import (
    Attention,
    Block,
    ImageEncoderViT,
    relative_position_table,
)
from napari_sam.speed.kernels import FusedLinear, LinearFactory, autocast
from napari_sam.speed.twin import FastTwin
from napari_sam.speed.windows import from_windows, to_windows

__all__ = ["FastImageEncoderViT"]


# Elements of relative-position bias built at once (128 MiB in float32): two heads of a
# 64 x 64 global block.
BIAS_BUDGET = 2**25


class FastImageEncoderViT(FastTwin):
    """Fast twin of an :class:`ImageEncoderViT` (same input, output and parameters).

    Made with ``FastImageEncoderViT.from_exact(encoder, linear=..., autocast_dtype=...)``
    (see :meth:`speed_up`).
    """

    exact_type = ImageEncoderViT

    def speed_up(
        self,
        exact: ImageEncoderViT,
        linear: LinearFactory = FusedLinear.from_exact,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        """Fast blocks.

        Parameters
        ----------
        exact : ImageEncoderViT
            The exact encoder; its parameters are shared, not copied.
        linear : callable
            Turns each ``nn.Linear`` of the blocks into the module to use:
            ``FusedLinear.from_exact`` (float32) or ``DynamicInt8Linear.from_exact`` (int8,
            :mod:`napari_sam.speed.int8`). Either takes an optional ``activation="gelu"`` to
            apply after the product.
        autocast_dtype : torch.dtype, optional
            Run under ``torch.autocast`` to this dtype (bf16 on CUDA or AMX CPUs); the output
            is float32 either way.
        """
        self.autocast_dtype = autocast_dtype
        self.blocks = nn.ModuleList(FastBlock.from_exact(b, linear=linear) for b in exact.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x S x S`` images -> ``B x C_out x S/16 x S/16`` embeddings (float32)."""
        ImageEncoderViT.check_input(self, x)  # reads only in_chans and img_size
        with autocast(x.device, self.autocast_dtype):
            x = self.patch_embed(x.float())
            if self.pos_embed is not None:
                x = x + self.pos_embed
            for block in self.blocks:
                x = block(x)
            return self.neck(x.permute(0, 3, 1, 2)).float().contiguous()


class FastBlock(FastTwin):
    """Fast twin of a ViT :class:`Block` (``B x H x W x C`` in and out)."""

    exact_type = Block

    def speed_up(self, exact: Block, linear: LinearFactory) -> None:
        self.attn = FastAttention.from_exact(exact.attn, linear=linear)
        self.mlp = FastMLP.from_exact(exact.mlp, linear=linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = self.attn.qkv(self.norm1(x))
        ws = self.window_size
        if ws > 0:
            # Padding tokens are zero after the norm in the exact model: their q/k/v is the bias.
            bias = self.attn.qkv.bias
            fill = bias.detach().to(qkv.dtype) if bias is not None else 0.0
            windows, nh, nw = to_windows(qkv, ws, fill)
            out = self.attn.attend(windows, (ws, ws))
            out = from_windows(out, ws, nh, nw, h, w)
        else:
            out = self.attn.attend(qkv.reshape(b, h * w, -1), (h, w)).view(b, h, w, c)
        out = self.attn.proj(out)
        x = out.add_(x)
        y = self.mlp(self.norm2(x))
        return y.add_(x)


class FastAttention(FastTwin):
    """Multi-head attention with decomposed relative positions, through flash SDPA."""

    exact_type = Attention

    def speed_up(self, exact: Attention, linear: LinearFactory) -> None:
        self.qkv = linear(exact.qkv)
        self.proj = linear(exact.proj)

    def attend(self, qkv: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``B x N x 3C`` projected tokens of an ``H x W`` grid -> ``B x N x C`` (before proj)."""
        b, n, c3 = qkv.shape
        heads = self.num_heads
        # B x N x (3, heads, d) -> 3 x B x heads x N x d, as strided views (no copy).
        q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
            return out.transpose(1, 2).reshape(b, n, c3 // 3)
        h, w = size
        grid_q = q.reshape(b, heads, h, w, -1)
        rh = relative_position_table(self.rel_pos_h, h, h).to(q.dtype)
        rw = relative_position_table(self.rel_pos_w, w, w).to(q.dtype)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rw)
        step = min(heads, max(1, BIAS_BUDGET // (b * n * n)))
        # One bias buffer for all head groups: a fresh 128 MiB tensor per group costs more in
        # page faults than filling it.
        bias = q.new_empty(b, step, h, w, h, w)
        out = q.new_empty(b, n, heads, q.shape[-1])
        for i in range(0, heads, step):
            group = slice(i, min(i + step, heads))
            mask = bias[:, : group.stop - i]
            torch.add(rel_h[:, group, ..., None], rel_w[:, group, ..., None, :], out=mask)
            part = F.scaled_dot_product_attention(
                q[:, group], k[:, group], v[:, group], attn_mask=mask.view(b, -1, n, n)
            )
            out[:, :, group] = part.transpose(1, 2)
        return out.view(b, n, c3 // 3)


class FastMLP(FastTwin):
    """The block's MLP with its GELU inside the first product."""

    exact_type = MLPBlock

    def speed_up(self, exact: MLPBlock, linear: LinearFactory) -> None:
        self.lin1 = linear(exact.lin1)
        self.lin2 = linear(exact.lin2)
        # SAM's exact-erf GELU can run inside the first product; any other activation runs apart.
        self._fused_gelu = type(exact.act) is nn.GELU and exact.act.approximate == "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused_gelu:
            return self.lin2(self.lin1(x, activation="gelu"))
        return self.lin2(self.act(self.lin1(x)))

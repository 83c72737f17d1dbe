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

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.models.image_encoder import (
    Attention,
    Block,
    ImageEncoderViT,
    relative_position_table,
)
from napari_sam.speed.kernels import FusedLinear, autocast

__all__ = ["FastImageEncoderViT"]

LinearFactory = Callable[[nn.Linear], nn.Module]

# Elements of relative-position bias built at once (128 MiB in float32): two heads of a
# 64 x 64 global block.
BIAS_BUDGET = 2**25


class FastImageEncoderViT(nn.Module):
    """Fast twin of an :class:`ImageEncoderViT` (same input, output and parameters).

    Parameters
    ----------
    encoder : ImageEncoderViT
        The exact encoder; its parameters are shared, not copied.
    linear : callable
        Turns each ``nn.Linear`` of the blocks into the module to use:
        :class:`~napari_sam.speed.kernels.FusedLinear` (float32) or
        :class:`~napari_sam.speed.int8.DynamicInt8Linear` (int8). Either takes an optional
        ``activation="gelu"`` to apply after the product.
    autocast_dtype : torch.dtype, optional
        Run under ``torch.autocast`` to this dtype (bf16 on CUDA or AMX CPUs); the output is
        float32 either way.
    """

    def __init__(
        self,
        encoder: ImageEncoderViT,
        linear: LinearFactory = FusedLinear,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.autocast_dtype = autocast_dtype
        self.img_size = encoder.img_size
        self.patch_size = encoder.patch_size
        self.in_chans = encoder.in_chans
        self.patch_embed = encoder.patch_embed
        self.pos_embed = encoder.pos_embed
        self.blocks = nn.ModuleList(FastBlock(b, linear) for b in encoder.blocks)
        self.neck = encoder.neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"image encoder expects a B x {expected[0]} x {expected[1]} x {expected[2]} "
                f"tensor (preprocess the image with Sam.preprocess first), got {tuple(x.shape)}"
            )
        with autocast(x.device, self.autocast_dtype):
            x = self.patch_embed(x.float())
            if self.pos_embed is not None:
                x = x + self.pos_embed
            for block in self.blocks:
                x = block(x)
            return self.neck(x.permute(0, 3, 1, 2)).float().contiguous()


class FastBlock(nn.Module):
    """Fast twin of a ViT :class:`Block` (``B x H x W x C`` in and out)."""

    def __init__(self, block: Block, linear: LinearFactory) -> None:
        super().__init__()
        self.window_size = block.window_size
        self.norm1 = block.norm1
        self.attn = FastAttention(block.attn, linear)
        self.norm2 = block.norm2
        self.mlp = FastMLP(block.mlp, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = self.attn.qkv(self.norm1(x))
        ws = self.window_size
        if ws > 0:
            windows, hp, wp = _partition_qkv(qkv, ws, self.attn.qkv.bias)
            out = self.attn.attend(windows, (ws, ws))
            out = _unpartition(out, ws, hp, wp, h, w)
        else:
            out = self.attn.attend(qkv.reshape(b, h * w, -1), (h, w)).view(b, h, w, c)
        out = self.attn.proj(out)
        x = out.add_(x)
        y = self.mlp(self.norm2(x))
        return y.add_(x)


class FastAttention(nn.Module):
    """Multi-head attention with decomposed relative positions, through flash SDPA."""

    def __init__(self, attn: Attention, linear: LinearFactory) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.qkv = linear(attn.qkv)
        self.proj = linear(attn.proj)
        self.use_rel_pos = attn.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = attn.rel_pos_h
            self.rel_pos_w = attn.rel_pos_w

    def attend(self, qkv: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``B x N x 3C`` projected tokens of an ``H x W`` grid -> ``B x N x C`` (before proj)."""
        b, n, c3 = qkv.shape
        heads = self.num_heads
        # B x N x (3, heads, d) -> 3 x B x heads x N x d, as strided views (no copy).
        q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            h, w = size
            rh = relative_position_table(self.rel_pos_h, h, h).to(q.dtype)
            rw = relative_position_table(self.rel_pos_w, w, w).to(q.dtype)
            step = max(1, BIAS_BUDGET // (b * n * n))
            if step >= heads:
                out = _sdpa_rel_pos(q, k, v, rh, rw, size)
            else:
                out = torch.cat(
                    [
                        _sdpa_rel_pos(
                            q[:, i : i + step], k[:, i : i + step], v[:, i : i + step], rh, rw, size
                        )
                        for i in range(0, heads, step)
                    ],
                    dim=1,
                )
        return out.transpose(1, 2).reshape(b, n, c3 // 3)


def _sdpa_rel_pos(q, k, v, rh, rw, size):
    b, heads, n, d = q.shape
    h, w = size
    grid_q = q.reshape(b, heads, h, w, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rw)
    # Written into a fresh contiguous tensor: the einsums may return permuted layouts.
    bias = q.new_empty(b, heads, h, w, h, w)
    torch.add(rel_h.unsqueeze(-1), rel_w.unsqueeze(-2), out=bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(b, heads, n, n))


class FastMLP(nn.Module):
    def __init__(self, mlp: nn.Module, linear: LinearFactory) -> None:
        super().__init__()
        self.lin1 = linear(mlp.lin1)
        self.lin2 = linear(mlp.lin2)
        self.act = mlp.act
        # SAM's exact-erf GELU can run inside the first product; any other activation runs apart.
        self._fused_gelu = type(mlp.act) is nn.GELU and mlp.act.approximate == "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused_gelu:
            return self.lin2(self.lin1(x, activation="gelu"))
        return self.lin2(self.act(self.lin1(x)))


def _partition_qkv(
    qkv: torch.Tensor, ws: int, bias: torch.Tensor | None
) -> tuple[torch.Tensor, int, int]:
    """``B x H x W x 3C`` -> ``(B * windows) x ws^2 x 3C``, padding tokens set to ``bias``.

    Padding tokens are zero after the norm in the exact model, so their projection is the bias.
    """
    b, h, w, c3 = qkv.shape
    hp, wp = h + (-h % ws), w + (-w % ws)
    if (hp, wp) != (h, w):
        padded = qkv.new_empty(b, hp, wp, c3)
        padded[:, :h, :w] = qkv
        fill = bias.detach().to(qkv.dtype) if bias is not None else 0.0
        padded[:, h:, :] = fill
        padded[:, :h, w:] = fill
        qkv = padded
    windows = qkv.view(b, hp // ws, ws, wp // ws, ws, c3).permute(0, 1, 3, 2, 4, 5)
    return windows.reshape(-1, ws * ws, c3), hp, wp


def _unpartition(windows: torch.Tensor, ws: int, hp: int, wp: int, h: int, w: int) -> torch.Tensor:
    """``(B * windows) x ws^2 x C`` -> ``B x H x W x C`` without the padding (contiguous)."""
    c = windows.shape[-1]
    nh, nw = hp // ws, wp // ws
    x = windows.view(-1, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
    return x[:, :h, :w].contiguous() if (hp, wp) != (h, w) else x

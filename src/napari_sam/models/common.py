"""Building blocks shared by the SAM modules: channel LayerNorm for images, transformer MLP."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LayerNorm2d", "MLPBlock"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a ``B x C x H x W`` tensor.

    Parameters
    ----------
    num_channels : int
        Number of channels ``C``.
    eps : float
        Added to the variance for numerical stability.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``B x C x H x W`` over ``C`` at every pixel; same shape out."""
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        var = centred.pow(2).mean(dim=1, keepdim=True)
        normed = centred * torch.rsqrt(var + self.eps)
        return normed * self.weight[:, None, None] + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """Two linear layers with an activation in between (the transformer feed-forward block).

    Parameters
    ----------
    embedding_dim : int
        Input and output width.
    mlp_dim : int
        Hidden width.
    act : type of nn.Module
        Activation class, instantiated once.
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``... x embedding_dim`` -> ``... x embedding_dim``."""
        return self.lin2(self.act(self.lin1(x)))

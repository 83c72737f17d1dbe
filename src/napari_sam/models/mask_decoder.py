"""Mask decoder of SAM: prompt tokens + image embedding -> mask logits and predicted IoUs."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from napari_sam.models.common import LayerNorm2d

__all__ = ["MLP", "MaskDecoder"]


class MaskDecoder(nn.Module):
    """Predict masks (and their quality) from image and prompt embeddings.

    Parameters
    ----------
    transformer_dim : int
        Width of the transformer (and of the image embedding).
    transformer : nn.Module
        A :class:`~napari_sam.models.transformer.TwoWayTransformer`.
    num_multimask_outputs : int
        Masks returned when ambiguity is resolved by multiple outputs (3 in SAM); one more
        token gives the single-mask output.
    activation : type of nn.Module
        Activation of the upscaling network.
    iou_head_depth, iou_head_hidden_dim : int
        Depth and width of the IoU prediction MLP.
    iou_prediction_use_sigmoid : bool
        Squash the predicted IoUs into (0, 1) (SAM 2.1; SAM predicts them unbounded).
    """

    def __init__(
        self,
        *,
        transformer_dim: int = 256,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        iou_prediction_use_sigmoid: bool = False,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim,
            iou_head_hidden_dim,
            self.num_mask_tokens,
            iou_head_depth,
            sigmoid_output=iou_prediction_use_sigmoid,
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks for ``B`` prompt sets.

        Parameters
        ----------
        image_embeddings : Tensor
            ``1 x C x E x E`` (shared by all prompt sets) or ``B x C x E x E`` (one per set).
        image_pe : Tensor
            ``1 x C x E x E`` positional encoding (``PromptEncoder.get_dense_pe()``).
        sparse_prompt_embeddings : Tensor
            ``B x K x C`` prompt tokens.
        dense_prompt_embeddings : Tensor
            ``B x C x E x E`` (mask prompt or the no-mask embedding).
        multimask_output : bool
            Return the 3 ambiguity-resolving masks instead of the single mask.

        Returns
        -------
        masks : Tensor
            ``B x M x 4E x 4E`` logits, ``M`` = 3 with multimask output, else 1.
        iou_pred : Tensor
            ``B x M`` predicted IoUs.
        """
        if multimask_output:
            selected = slice(1, None)
        else:
            selected = slice(0, 1)
        masks, iou_pred = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            selected,
        )
        return masks, iou_pred[:, selected]

    def _tokens(
        self,
        image_embeddings: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Check the batch sizes; the output tokens followed by the prompt tokens, ``B x T x C``
        (output tokens cast to ``dtype`` when given).
        """
        b = sparse_prompt_embeddings.shape[0]
        if image_embeddings.ndim != 4 or image_embeddings.shape[0] not in (1, b):
            raise ValueError(
                f"image embeddings must be 1 x C x E x E (shared) or B x C x E x E with B = {b} "
                f"prompt sets, got {tuple(image_embeddings.shape)}"
            )
        if dense_prompt_embeddings.shape[0] not in (1, b):
            raise ValueError(
                f"dense prompt embeddings have batch {dense_prompt_embeddings.shape[0]}, "
                f"expected {b} (one per prompt set)"
            )
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        if dtype is not None:
            output_tokens = output_tokens.to(dtype)
        return torch.cat(
            [output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1
        )

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        selected: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of the ``selected`` mask tokens (all by default) and IoUs of all tokens."""
        tokens = self._tokens(image_embeddings, sparse_prompt_embeddings, dense_prompt_embeddings)
        b = tokens.shape[0]
        # Broadcasting adds a shared embedding to every prompt set without stacking copies first.
        src = (image_embeddings + dense_prompt_embeddings).expand(b, -1, -1, -1)
        pos_src = image_pe.expand(b, -1, -1, -1)
        _, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        token_ids = range(self.num_mask_tokens)[selected]
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in token_ids],
            dim=1,
        )
        _, cu, hu, wu = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, cu, hu * wu)).reshape(b, -1, hu, wu)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred


class MLP(nn.Module):
    """Plain MLP with an activation between layers (hypernetworks, IoU head; SAM 2 blocks).

    Parameters
    ----------
    input_dim, hidden_dim, output_dim : int
        Widths.
    num_layers : int
        Number of linear layers.
    sigmoid_output : bool
        Apply a sigmoid to the output.
    activation : type of nn.Module
        Activation between layers (ReLU in SAM's heads, GELU in Hiera's blocks).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        widths = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(
            nn.Linear(n_in, n_out) for n_in, n_out in itertools.pairwise(widths)
        )
        self.sigmoid_output = sigmoid_output
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = self.act(x)
        if self.sigmoid_output:
            x = torch.sigmoid(x)
        return x

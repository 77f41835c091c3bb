"""The network trained by :class:`~wsi_ssl.pretrain.SlideSSL`: ``standardise -> MIL head ->
projection head``; only the first two are kept to embed slides. The heads are
``wsi_ssl.mil``'s (``create_head(name, D, n_classes=0)``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SlideNet"]


class SlideNet(nn.Module):
    """Standardisation + MIL head (the slide encoder) + projection head (training only).

    Args:
        head: a MIL head whose ``forward(x, mask, coords)`` returns a ``MILOutput``.
        projector: the projection head, or ``None`` for an encoder only.
        in_dim: tile feature dimension (the standardisation buffers).

    Shape:
        ``embed(x, coords)``: x ``(B, k, D)``, coords ``(B, k, 2)`` -> ``(B, E)``;
        ``forward`` -> ``(B, P)`` projections.
    """

    def __init__(self, head: nn.Module, projector: nn.Module | None, in_dim: int) -> None:
        super().__init__()
        self.head = head
        self.projector = projector
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))

    def embed(self, x: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        x = (x - self.feat_mean) / self.feat_std
        return self.head(x, None, coords).embedding

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        z = self.embed(x, coords)
        return self.projector(z) if self.projector is not None else z

"""Slide encoders for slide SSL: any ``wsi_ssl.mil`` head, plus a residual-MLP + mean head.

The network trained by :class:`~wsi_ssl.pretrain.SlideSSL` is ``standardise -> MIL head ->
projection head``; only the first two are kept to embed slides.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["SlideNet", "build_slide_head", "LOCAL_HEADS"]

#: head names served here when ``wsi_ssl.mil`` does not register them itself.
LOCAL_HEADS: tuple[str, ...] = ("resmlp_mean",)


class _ResBlock(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def _make_resmlp_mean(in_dim: int, *, n_classes: int = 0, embed_dim: int = 512, depth: int = 2,
                      dropout: float = 0.0) -> nn.Module:
    from wsi_ssl.mil._base import MILHead, masked_mean

    class ResidualMLPMean(MILHead):
        """Per-tile residual MLP followed by a masked mean over the tiles (Giga-SSL's
        coordinate-free "MLP + mean" aggregator).

        Args:
            in_dim: tile feature dimension ``D``.
            n_classes: classifier size (0 = none, the slide-SSL use).
            embed_dim: output dimension ``E``.
            depth: number of residual blocks (LayerNorm-Linear-GELU-Linear).
            dropout: dropout inside the blocks.

        Shape:
            x ``(B, N, D)``, mask ``(B, N)`` -> ``MILOutput(embedding=(B, E))``; coords ignored.
        """

        def __init__(self) -> None:
            super().__init__(in_dim, n_classes)
            self.embed_dim = int(embed_dim)
            self.inp = nn.Linear(self.in_dim, self.embed_dim)
            self.blocks = nn.Sequential(*[_ResBlock(self.embed_dim, dropout)
                                          for _ in range(int(depth))])
            self.norm = nn.LayerNorm(self.embed_dim)
            self._build_classifier()

        def _pool(self, x, mask, coords):
            return self.norm(masked_mean(self.blocks(self.inp(x)), mask)), None

    return ResidualMLPMean()


def build_slide_head(name: str, in_dim: int, *, embed_dim: int = 512,
                     **kwargs: Any) -> nn.Module:
    """A MIL head without classifier (``n_classes=0``) from ``wsi_ssl.mil``, or a local one
    (``"resmlp-mean"``: residual MLP per tile + mean, when ``wsi_ssl.mil`` has no such head)."""
    from wsi_ssl.mil import create_head, list_heads

    key = str(name).lower().replace("-", "_")
    if key in LOCAL_HEADS and key not in list_heads():
        return _make_resmlp_mean(in_dim, embed_dim=embed_dim, **kwargs)
    return create_head(name, in_dim, n_classes=0, embed_dim=embed_dim, **kwargs)


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

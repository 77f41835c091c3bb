"""Residual MLP per tile + masked mean: Giga-SSL's coordinate-free "MLP + mean" aggregator."""

from __future__ import annotations

import torch
from torch import nn

from wsi_ssl.mil._base import MILHead, _check_int, _check_prob, masked_mean, register_head

__all__ = ["ResidualMLPMean"]


class _ResBlock(nn.Module):
    """``x + Linear(Dropout(GELU(Linear(LayerNorm(x)))))``."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


@register_head("resmlp_mean")
class ResidualMLPMean(MILHead):
    """Per-tile residual MLP followed by a masked mean over the tiles and a LayerNorm.

    The coordinate-free aggregator of Giga-SSL (Lazard et al., CVPRW 2023). Cost: O(N * E^2)
    time, O(N * E) memory.

    Args:
        in_dim: tile feature dimension ``D``.
        n_classes: classes of the linear classifier (0 = none, the slide-SSL use).
        embed_dim: output dimension ``E``.
        depth: number of residual blocks (LayerNorm-Linear-GELU-Dropout-Linear).
        dropout: dropout inside the blocks.

    Shape:
        x ``(B, N, D)``, mask ``(B, N)`` -> ``MILOutput(embedding=(B, E))``; coords ignored.
    """

    def __init__(self, in_dim: int, n_classes: int = 0, *, embed_dim: int = 512, depth: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__(in_dim, n_classes)
        owner = type(self).__name__
        self.embed_dim = _check_int(owner, "embed_dim", embed_dim, 1)
        depth = _check_int(owner, "depth", depth, 0)
        dropout = _check_prob(owner, "dropout", dropout)
        self.inp = nn.Linear(self.in_dim, self.embed_dim)
        self.blocks = nn.Sequential(*[_ResBlock(self.embed_dim, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(self.embed_dim)
        self._build_classifier()

    def _pool(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None
              ) -> tuple[torch.Tensor, None]:
        return self.norm(masked_mean(self.blocks(self.inp(x)), mask)), None

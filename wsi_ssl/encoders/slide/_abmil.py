"""FEATHER (Shao et al., 2025, arXiv:2506.09022; MahmoodLab/MIL-Lab): gated attention MIL
(Ilse et al., 2018) pretrained on a 108-class pan-cancer task, used as a slide encoder.

Written from MIL-Lab's published ``abmil/base.yaml`` (``embed_dim 512``, ``attn_dim 384``,
``num_fc_layers 1``, ``gate True``) and its layer definitions: ``patch_embed`` = Linear + ReLU,
gated attention ``attention_c(tanh(attention_a(h)) * sigmoid(attention_b(h)))``, softmax over
the tiles, the attention-weighted mean of the embedded tiles as the slide embedding (512-d; the
checkpoints carry no classifier). Tile order and positions do not matter.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ABMILSlideModel"]


class _GatedAttention(nn.Module):
    def __init__(self, dim: int, attn_dim: int) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh())
        self.attention_b = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid())
        self.attention_c = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h))


class ABMILSlideModel(nn.Module):
    """FEATHER's ABMIL. ``forward(features, mask)`` embeds a batch of slides.

    Args:
        in_dim: tile feature dimension (CONCH v1.5: 768, UNI: 1024, UNI2-h: 1536).
        embed_dim, attn_dim: published 512, 384.

    Shape:
        features ``(B, N, in_dim)``; mask ``(B, N)`` bool (True: real tile; ``None``: all);
        returns ``(B, embed_dim)``. ``attention(features, mask)`` gives the raw scores ``(B, N)``.
    """

    def __init__(self, *, in_dim: int = 768, embed_dim: int = 512, attn_dim: int = 384) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU())
        self.global_attn = _GatedAttention(embed_dim, attn_dim)

    def _scores(self, features: torch.Tensor, mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.patch_embed(features)
        a = self.global_attn(h).squeeze(-1)
        if mask is not None:
            a = a.masked_fill(~mask, torch.finfo(a.dtype).min)
        return h, a

    def attention(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._scores(features, mask)[1]

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h, a = self._scores(features, mask)
        return torch.bmm(torch.softmax(a, dim=-1).unsqueeze(1), h).squeeze(1)

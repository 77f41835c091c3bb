"""TITAN's slide encoder (Ding et al., 2024, arXiv:2411.19666; hub ``MahmoodLab/TITAN``): a ViT
over the 2-D grid of CONCH v1.5 tile features with 2-D ALiBi attention biases and CoCa attentional
poolers. Written from the published ``config.json`` (``vision_config``) and architecture
description; parameter and buffer names follow the checkpoint (``vision_encoder.*``; the text
encoder in the same file is not built).

Input: the features of one slide and their grid cells (level-0 coordinates divided by the grid's
stride, origin at the slide's first row/column). Output: the contrastive pooler's embedding,
*before* the projection ``proj`` (what ``encode_slide_from_patch_features`` returns), 768-d.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_ssl.encoders.slide._layers import CHUNK_BYTES, alibi_bias, alibi_slopes, chunked_sdpa

__all__ = ["TitanSlideModel"]


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias_fn, chunk_bytes: int) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        out = chunked_sdpa(q, k, v, bias_fn=bias_fn, chunk_bytes=chunk_bytes)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, bias_fn, chunk_bytes: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias_fn, chunk_bytes)
        return x + self.mlp(self.norm2(x))


class _Blocks(nn.Module):
    """Named like the checkpoint's ``blocks.modules_list.<i>``."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.modules_list = nn.ModuleList(blocks)


class _AttentionalPooler(nn.Module):
    """CoCa's attentional pooler: ``n_queries`` learned queries attend to the normalised tokens."""

    def __init__(self, dim: int, heads: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(n_queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads, kdim=dim, vdim=dim)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, n_queries, D)``."""
        kv = self.ln_k(x).permute(1, 0, 2)
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[0], -1)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        return out.permute(1, 0, 2)


class _TitanVision(nn.Module):
    def __init__(self, *, in_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float,
                 pooler_heads: int, pooler_queries: int) -> None:
        super().__init__()
        self.heads = heads
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = _Blocks([_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn_pool = _AttentionalPooler(dim, pooler_heads, pooler_queries)
        self.attn_pool_contrastive = _AttentionalPooler(dim, pooler_heads, 1)
        self.proj = nn.Parameter(torch.zeros(dim, dim))


class TitanSlideModel(nn.Module):
    """TITAN's vision side. ``forward(features, grid)`` embeds one slide.

    Args:
        in_dim: tile feature dimension (CONCH v1.5: 768).
        dim, depth, heads, mlp_ratio: the slide transformer (published: 768, 6, 12, 4).
        pooler_heads, pooler_queries: the CoCa poolers (published: 8 heads; 128 queries for the
            caption pooler, 1 for the contrastive pooler that gives the slide embedding).
        chunk_bytes: bound on one chunk of attention scores (big slides on small machines).

    Shape:
        features ``(N, in_dim)``; grid ``(N, 2)`` int64 grid cells ``(x, y)``; returns ``(dim,)``.
    """

    def __init__(self, *, in_dim: int = 768, dim: int = 768, depth: int = 6, heads: int = 12,
                 mlp_ratio: float = 4.0, pooler_heads: int = 8, pooler_queries: int = 128,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__()
        self.vision_encoder = _TitanVision(in_dim=in_dim, dim=dim, depth=depth, heads=heads,
                                           mlp_ratio=mlp_ratio, pooler_heads=pooler_heads,
                                           pooler_queries=pooler_queries)
        self.chunk_bytes = int(chunk_bytes)

    def tokens(self, features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """The normalised token sequence ``(1, 1 + N', dim)`` (class token first), ``N'`` the
        tiles with non-zero features (TITAN drops empty grid cells, and a cell whose features
        are all zero counts as empty)."""
        enc = self.vision_encoder
        keep = (features != 0).any(dim=1)
        features, grid = features[keep], grid[keep]
        x = enc.patch_embed(features).unsqueeze(0)
        x = torch.cat([enc.cls_token.to(x.dtype), x], dim=1)
        pos = torch.cat([grid.new_zeros(1, 2), grid], dim=0)
        prefix = torch.zeros(len(pos), dtype=torch.bool, device=pos.device)
        prefix[0] = True
        slopes = torch.tensor(alibi_slopes(enc.heads), device=x.device)

        def bias_fn(rows: slice) -> torch.Tensor:
            return alibi_bias(slopes, pos[rows], pos, prefix[rows], prefix).unsqueeze(0)

        for block in enc.blocks.modules_list:
            x = block(x, bias_fn, self.chunk_bytes)
        return enc.norm(x)

    def forward(self, features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        x = self.tokens(features, grid)
        return self.vision_encoder.attn_pool_contrastive(x)[0, 0]

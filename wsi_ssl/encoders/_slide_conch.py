"""CONCH v1.5's vision tower (hub ``MahmoodLab/conchv1_5``, file ``pytorch_model_vision.bin``;
the tile encoder of TITAN and FEATHER): a ViT-L/16 trunk (width 1024, depth 24, 16 heads, MLP
ratio 4, qkv bias, layer scale, LayerNorm eps 1e-6, a class token and a 14 x 14 position table)
read out by CoCa's contrastive attentional pooler (1 query, 8 heads, width 768, context 1024,
bias-free projections) and a LayerNorm: a 768-d tile embedding. Facts from the published
``conch_config`` in TITAN's ``config.json`` (patch 16, context 1024, embed 768, depth 24, 16 heads,
``pooler_n_queries_contrast`` 1) and the published architecture description.

Tiles are 448 x 448 (512-px tiles at 20x, resized): the position table is interpolated to the
28 x 28 grid as published, bicubic with scale factor ``(28 + 0.1) / 14`` (DINO's recipe), not
with timm's antialiased resampling. Blocks are timm's (fused scaled-dot-product attention), so
the parameter names are the checkpoint's (``trunk.blocks.<i>.attn.qkv``, ``trunk.blocks.<i>.ls1
.gamma``, ``attn_pool_contrast.to_kv``, ``ln_contrast``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConchVisionTower"]


class _ContrastPooler(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, n_queries: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(n_queries, dim))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, context_dim)`` -> ``(B, n_queries, dim)``."""
        B, N, _ = x.shape
        q = self.to_q(self.ln_q(self.query)).unsqueeze(0).expand(B, -1, -1)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, t.shape[1], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).reshape(B, q.shape[1], -1))


class ConchVisionTower(nn.Module):
    """CONCH v1.5 image encoder: normalised ``(B, 3, S, S)`` -> ``(B, 768)``.

    Args:
        depth, embed_dim, num_heads, patch_size, img_size: the ViT trunk (published: 24, 1024,
            16, 16; position table of a 224-px image).
        init_values: layer-scale initial value (any non-None value creates the parameters).
        out_dim, pooler_heads: the contrastive pooler (published: 768, 8).
    """

    def __init__(self, *, depth: int = 24, embed_dim: int = 1024, num_heads: int = 16,
                 patch_size: int = 16, img_size: int = 224, init_values: float = 1.0,
                 out_dim: int = 768, pooler_heads: int = 8) -> None:
        super().__init__()
        from timm.models.vision_transformer import (
            VisionTransformer,  # lazy: timm only when an encoder is built
        )

        self.trunk = VisionTransformer(img_size=img_size, patch_size=patch_size,
                                       embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                       mlp_ratio=4.0, qkv_bias=True, init_values=init_values,
                                       num_classes=0, global_pool="", dynamic_img_size=True)
        self.attn_pool_contrast = _ContrastPooler(out_dim, embed_dim, pooler_heads, 1)
        self.ln_contrast = nn.LayerNorm(out_dim)
        self.num_prefix_tokens = 1

    # what activation_bytes and the encoder table read from a trunk
    @property
    def embed_dim(self) -> int:
        return int(self.trunk.embed_dim)

    @property
    def blocks(self) -> nn.Module:
        return self.trunk.blocks

    @property
    def patch_embed(self) -> nn.Module:
        return self.trunk.patch_embed

    def _pos_embed(self, n_h: int, n_w: int) -> torch.Tensor:
        pos = self.trunk.pos_embed
        side = int(math.sqrt(pos.shape[1] - 1))
        if (n_h, n_w) == (side, side):
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((n_h + 0.1) / side, (n_w + 0.1) / side),
                             mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, n_h * n_w, -1)
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final normalised tokens ``(B, 1 + N, embed_dim)``."""
        t = self.trunk
        x = t.patch_embed.proj(x)
        n_h, n_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([t.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self._pos_embed(n_h, n_w).to(x.dtype)
        return t.norm(t.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.attn_pool_contrast(self.forward_features(x))[:, 0]
        return self.ln_contrast(pooled)

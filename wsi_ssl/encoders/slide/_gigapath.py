"""Prov-GigaPath's slide encoder (Xu et al., Nature 2024; hub ``prov-gigapath/prov-gigapath``,
file ``slide_encoder.pth``): a LongNet transformer (Ding et al., 2023, arXiv:2307.02486) over
the tile features, with MAE's fixed 2-D sine-cosine position embedding on a 1000 x 1000 grid.

Written from the published architecture (``gigapath_slide_enc12l768d``: 12 layers, width 768,
16 heads, FFN 3072, sub-LayerNorm ("subln") pre-norm layers, LongNet dilated attention with
segment lengths derived from a 262,144-px slide of 256-px tiles and dilation ratios
1, 2, 4, 8, 16) in plain torch: no flash-attn, no fairscale. Parameter names follow the
checkpoint (``patch_embed.proj``, ``encoder.layers.<i>.self_attn.q_proj``, ...).

Dilated attention, as published: for each (segment length ``w``, ratio ``r``) branch the
sequence (zero-padded to a multiple of ``min(w, L)``) is cut into segments; inside a segment the
heads are split into ``r`` groups and group ``j`` attends among the positions ``= j (mod r)``
(zero padding included: padded keys take part with score 0 and value 0, as flash attention
sees them); the branch outputs are merged per position and head with weights
``softmax_b(lse_b)``, which equals one softmax over the union of all branches' keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_ssl.encoders.slide._layers import CHUNK_BYTES, attention_with_lse, sincos_2d

__all__ = ["LongNetSlideModel", "dilated_attention", "longnet_segment_lengths"]


def longnet_segment_lengths(max_wsi_size: int = 262144, tile_size: int = 256) -> list[int]:
    """Prov-GigaPath's segment lengths: 5 powers of two log-spaced from 1024 to the number of
    tiles of a ``max_wsi_size``-px square slide, truncated to integers (``[1024, 5792, 32768,
    185363, 1048576]`` for the defaults)."""
    max_seq = (max_wsi_size // tile_size) ** 2
    exps = np.linspace(np.log2(1024), int(np.log2(max_seq)), 5)
    return [int(v) for v in np.power(2, exps).astype(int)]


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _sparse(t: torch.Tensor, n: int, g: int, r: int) -> torch.Tensor:
    """``(B, L, H, d)`` -> ``(B n r, hg, m, d)``: segments of ``g`` (the sequence zero-padded to
    ``n g``), each padded to a multiple of ``r``; head group ``j`` keeps positions ``j mod r``."""
    B, L, H, d = t.shape
    hp = _ceil(H, r) * r
    gp = _ceil(g, r) * r
    t = F.pad(t, (0, 0, 0, hp - H, 0, n * g - L)).reshape(B * n, g, hp, d)
    t = F.pad(t, (0, 0, 0, 0, 0, gp - g)).reshape(B * n, gp // r, r, r, hp // r, d)
    t = torch.diagonal(t, dim1=2, dim2=3)  # (B n, m, hg, d, r): group j at offset j
    return t.permute(0, 4, 2, 1, 3).reshape(B * n * r, hp // r, gp // r, d)


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      segment_lengths: Sequence[int], ratios: Sequence[int], *,
                      chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """LongNet's dilated attention (module docstring), one branch at a time.

    Shape:
        q, k, v ``(B, L, H, d)``; returns ``(B, L, H, d)``.
    """
    B, L, H, d = q.shape
    outs, lses = [], []
    for w, r in zip(segment_lengths, ratios, strict=True):
        g = min(int(w), L)
        n = _ceil(L, g)
        gp, hp = _ceil(g, r) * r, _ceil(H, r) * r
        hg, m = hp // r, gp // r
        o, lse = attention_with_lse(_sparse(q, n, g, r), _sparse(k, n, g, r),
                                    _sparse(v, n, g, r), chunk_bytes=chunk_bytes)
        o = o.reshape(B * n, r, hg, m, d).permute(0, 3, 2, 4, 1)  # (B n, m, hg, d, r)
        o = torch.diag_embed(o, dim1=-2, dim2=-1)  # (B n, m, hg, d, r1, r2)
        o = o.permute(0, 1, 4, 5, 2, 3).reshape(B, n * gp, hp, d)[:, :L, :H]
        lse = lse.reshape(B * n, r, hg, m).permute(0, 3, 2, 1)  # (B n, m, hg, r)
        full = lse.new_full((B * n, m, hg, r, r), -1e8)
        idx = torch.arange(r, device=lse.device)
        full[:, :, :, idx, idx] = lse
        lse = full.permute(0, 1, 3, 4, 2).reshape(B, n * gp, hp)[:, :L, :H]
        outs.append(o)
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses, dim=0), dim=0)  # over branches
    out = torch.zeros_like(outs[0])
    for o, wgt in zip(outs, weights, strict=True):
        out = out + o * wgt.unsqueeze(-1).to(o.dtype)
    return out


class _DilatedSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, segments: Sequence[int],
                 ratios: Sequence[int]) -> None:
        super().__init__()
        self.heads, self.segments, self.ratios = heads, list(segments), list(ratios)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
        B, L, C = x.shape
        shape = (B, L, self.heads, C // self.heads)
        q, k, v = (p(x).reshape(shape) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = dilated_attention(q, k, v, self.segments, self.ratios, chunk_bytes=chunk_bytes)
        return self.out_proj(self.inner_attn_ln(a.reshape(B, L, C)))


class _FFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x).float()).to(x.dtype)
        return self.fc2(self.ffn_layernorm(h))


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, segments: Sequence[int],
                 ratios: Sequence[int]) -> None:
        super().__init__()
        self.self_attn = _DilatedSelfAttention(dim, heads, segments, ratios)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=1e-5)
        self.ffn = _FFN(dim, hidden)
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), chunk_bytes)
        return x + self.ffn(self.final_layer_norm(x))


class _Encoder(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, hidden: int, segments: Sequence[int],
                 ratios: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(dim, heads, hidden, segments, ratios)
                                    for _ in range(depth))
        self.layer_norm = nn.LayerNorm(dim, eps=1e-5)


class _PatchEmbed(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)


class LongNetSlideModel(nn.Module):
    """Prov-GigaPath's ``LongNetViT``. ``forward(features, grid)`` embeds one slide.

    Args:
        in_dim: tile feature dimension (Prov-GigaPath tiles: 1536).
        dim, depth, heads, ffn_dim: the LongNet encoder (published: 768, 12, 16, 3072).
        slide_ngrids: side of the position-embedding grid (published: 1000).
        segment_lengths, dilated_ratios: the dilated attention (default: the published ones).
        global_pool: ``False`` (the model card's ``slide_encoder(tiles, coords)``): the class token
            of the final, normalised sequence; ``True``: the mean of the tile tokens, normalised.
        output_layer: ``None``: after all layers and the encoder's final LayerNorm; ``k``: the
            hidden state after ``k`` layers (``all_layer_embed=True`` output ``k``; TRIDENT
            takes ``k=11`` with ``global_pool=True``).

    Shape:
        features ``(N, in_dim)``; grid ``(N, 2)`` int64 absolute grid cells ``(x, y)``; returns
        ``(dim,)``.
    """

    def __init__(self, *, in_dim: int = 1536, dim: int = 768, depth: int = 12, heads: int = 16,
                 ffn_dim: int = 3072, slide_ngrids: int = 1000,
                 segment_lengths: Sequence[int] | None = None,
                 dilated_ratios: Sequence[int] = (1, 2, 4, 8, 16), global_pool: bool = False,
                 output_layer: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__()
        segments = list(segment_lengths or longnet_segment_lengths())
        self.patch_embed = _PatchEmbed(in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = _Encoder(dim, depth, heads, ffn_dim, segments, list(dilated_ratios))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.slide_ngrids = int(slide_ngrids)
        self.global_pool = bool(global_pool)
        self.output_layer = output_layer
        self.chunk_bytes = int(chunk_bytes)

    def position_embedding(self, grid: torch.Tensor) -> torch.Tensor:
        """The fixed embedding of each tile's cell: row ``x``, column ``y`` of the
        ``slide_ngrids``-square table (what ``pos_embed[:, 1 + x * ngrids + y]`` holds)."""
        return sincos_2d(self.cls_token.shape[-1], grid[:, 0], grid[:, 1])

    def forward(self, features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(features)
        x = x + self.position_embedding(grid).to(x.device, x.dtype)
        x = torch.cat([self.cls_token[0].to(x.dtype), x], dim=0).unsqueeze(0)
        layers = self.encoder.layers
        stop = len(layers) if self.output_layer is None else int(self.output_layer)
        for layer in list(layers)[:stop]:
            x = layer(x, self.chunk_bytes)
        if self.output_layer is None:
            x = self.encoder.layer_norm(x)
        if self.global_pool:
            return self.norm(x[0, 1:].mean(dim=0))
        return self.norm(x)[0, 0]

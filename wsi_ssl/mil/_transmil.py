"""TransMIL (Shao et al., NeurIPS 2021): a class token, two self-attention layers over the tiles
and the PPEG positional module, with Nystrom (Xiong et al., AAAI 2021) or plain attention.

Two changes from the reference code keep the head exact under padding and tile order:

* Nystrom landmarks are segment means of the real tokens taken in a fixed, content-defined order
  (sorted along a fixed random direction), not in input order; bags with fewer tokens than
  landmarks use one landmark per token. Padded tokens are never keys nor landmarks.
* PPEG (depthwise 7x7 + 5x5 + 3x3 convolutions of the tokens laid out on a 2-D grid) runs on the
  tiles' real grid cells from ``coords`` with :class:`~wsi_ssl.mil._sparseconv.SparseConv2d`;
  without ``coords`` the tile order carries no position and PPEG is skipped.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from wsi_ssl.errors import ConfigError
from wsi_ssl.mil._base import (
    MILHead,
    _check_int,
    _check_option,
    _check_prob,
    projection,
    register_head,
)
from wsi_ssl.mil._sparseconv import SparseConv2d, SparseGrid

__all__ = ["TransMIL", "NystromAttention", "PPEG"]


def _iterative_pinv(k: torch.Tensor, iters: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse by Newton-Schulz iterations (as in Nystromformer)."""
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    col = k.abs().sum(dim=-2).amax(dim=-1, keepdim=True).unsqueeze(-1)
    row = k.abs().sum(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
    z = k.transpose(-1, -2) / (col * row)
    for _ in range(iters):
        kz = k @ z
        z = 0.25 * z @ (13 * eye - kz @ (15 * eye - kz @ (7 * eye - kz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention, Nystrom-approximated with ``m`` landmarks, or exact.

    Cost: Nystrom O(L * m * E + m^3) time and O(L * m * heads) memory (linear in the sequence
    length ``L``); ``mode="full"`` O(L^2 * E) time (memory O(L^2 * heads) unless torch picks a
    fused kernel): keep it for bags of a few thousand tiles.

    Shape:
        x ``(B, L, E)``, mask ``(B, L)`` -> out ``(B, L, E)``, attention of token 0 ``(B, L)``.
    """

    def __init__(self, dim: int, heads: int = 8, *, landmarks: int = 256,
                 pinv_iterations: int = 6, mode: str = "nystrom", dropout: float = 0.0) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_option(owner, "mode", mode, ("nystrom", "full"))
        heads = _check_int(owner, "heads", heads, 1)
        if dim % heads:
            raise ConfigError(f"{owner}(heads={heads}) must divide embed_dim={dim}.")
        self.heads, self.dim_head, self.mode = heads, dim // heads, mode
        self.landmarks = _check_int(owner, "landmarks", landmarks, 1)
        self.pinv_iterations = _check_int(owner, "pinv_iterations", pinv_iterations, 1)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        g = torch.Generator().manual_seed(0)
        self.register_buffer("sort_dir", torch.randn(dim, generator=g), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q = q * self.dim_head ** -0.5  # (B, H, L, dh)
        if self.mode == "full":
            out, cls_att = self._full(q, k, v, mask)
        else:
            out, cls_att = self._nystrom(x, q, k, v, mask)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.out(out), cls_att.mean(dim=1)

    @staticmethod
    def _full(q, k, v, mask):
        keep = mask[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=1.0)
        cls = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf")),
                            dim=-1)
        return out, cls.squeeze(2)

    def _nystrom(self, x, q, k, v, mask):
        b, h, n, dh = q.shape
        n_real = mask.sum(dim=1)  # (B,)
        # landmarks beyond the longest bag would only be identity padding: leave them out
        m = min(self.landmarks, int(n_real.max()))
        m_b = n_real.clamp_max(m)  # landmarks per bag
        # a content-defined order of the real tokens -> segments of (almost) equal size
        key = (x.detach() @ self.sort_dir).masked_fill(~mask, float("inf"))
        order = key.argsort(dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(n, device=x.device).expand(b, n))
        seg = torch.where(mask, rank * m_b[:, None] // n_real[:, None], torch.full_like(rank, m))
        count = torch.zeros(b, m + 1, dtype=q.dtype, device=q.device)
        count.scatter_add_(1, seg, torch.ones_like(seg, dtype=q.dtype))
        idx = seg[:, None, :, None].expand(b, h, n, dh)
        q_l = torch.zeros(b, h, m + 1, dh, dtype=q.dtype, device=q.device).scatter_add_(2, idx, q)
        k_l = torch.zeros(b, h, m + 1, dh, dtype=q.dtype, device=q.device).scatter_add_(2, idx, k)
        denom = count[:, None, :m, None].clamp_min(1.0)
        q_l, k_l = q_l[:, :, :m] / denom, k_l[:, :, :m] / denom  # (B, H, m, dh)
        lm = torch.arange(m, device=x.device)[None, :] < m_b[:, None]  # (B, m) real landmarks

        neg = float("-inf")
        k1 = torch.softmax((q @ k_l.transpose(-1, -2)).masked_fill(~lm[:, None, None, :], neg), -1)
        k1 = k1.masked_fill(~lm[:, None, None, :], 0.0)  # (B, H, L, m)
        k2 = torch.softmax((q_l @ k_l.transpose(-1, -2)).masked_fill(~lm[:, None, None, :], neg),
                           -1)
        pair = lm[:, None, :, None] & lm[:, None, None, :]
        eye = torch.eye(m, dtype=q.dtype, device=q.device).expand(b, 1, m, m)
        k2 = torch.where(pair, k2, eye.masked_fill(lm[:, None, :, None], 0.0))
        k3 = torch.softmax((q_l @ k.transpose(-1, -2)).masked_fill(~mask[:, None, None, :], neg),
                           -1)
        k3 = k3.masked_fill(~lm[:, None, :, None], 0.0)  # (B, H, m, L)
        right = _iterative_pinv(k2, self.pinv_iterations) @ k3  # (B, H, m, L)
        out = k1 @ (right @ v)
        cls = (k1[:, :, :1] @ right).squeeze(2).masked_fill(~mask[:, None, :], 0.0)
        return out, cls


class PPEG(nn.Module):
    """Pyramid position encoding generator on the tiles' grid cells (depthwise 7, 5, 3 convs).

    Cost: O(N * 83 * E) time, O(N * E) memory.

    Shape:
        tile tokens ``(B, N, E)`` -> ``(B, N, E)`` (input + positional term).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(SparseConv2d(dim, dim, k, depthwise=True) for k in (7, 5, 3))

    def forward(self, h: torch.Tensor, grid: SparseGrid) -> torch.Tensor:
        c = grid.tiles_to_cells(h)
        pos = sum(conv(c, grid) for conv in self.convs)
        return h + grid.cells_to_tiles(pos, h.shape[1])


@register_head("transmil")
class TransMIL(MILHead):
    """TransMIL: ``Linear -> ReLU``, class token, attention layer, PPEG, attention layer,
    LayerNorm; the embedding is the class token.

    Cost with ``attention="nystrom"`` (default): O(N * m * E) time and O(N * (E + m * heads))
    memory, linear in ``N`` (a 20k-tile bag fits in CPU memory); ``attention="full"``: O(N^2)
    time. Bags with at most ``landmarks`` tiles are attended exactly up to the pseudo-inverse.

    Args:
        in_dim: tile feature dimension ``D``.
        n_classes: classes of the linear classifier (0 = none).
        embed_dim: token size ``E`` (default 512).
        heads: attention heads (default 8).
        attention: ``"nystrom"`` or ``"full"``.
        landmarks: Nystrom landmarks ``m`` (default 256 = E / 2 as in TransMIL).
        pinv_iterations: Newton-Schulz iterations of the pseudo-inverse.
        dropout: dropout after the projection and the attention output.

    Shape:
        x ``(B, N, D)``, coords ``(B, N, 2)`` optional (PPEG runs only with them) ->
        embedding ``(B, E)``, attention ``(B, N)`` (the class token's attention in the last
        layer, mean over heads, renormalised over the tiles).
    """

    pools_with_attention = True

    def __init__(self, in_dim: int, n_classes: int = 0, *, embed_dim: int = 512, heads: int = 8,
                 attention: str = "nystrom", landmarks: int = 256, pinv_iterations: int = 6,
                 dropout: float = 0.0) -> None:
        super().__init__(in_dim, n_classes)
        owner = type(self).__name__
        dropout = _check_prob(owner, "dropout", dropout)
        _check_option(owner, "attention", attention, ("nystrom", "full"))
        self.proj, self.embed_dim = projection(self.in_dim, embed_dim, dropout, owner=owner)
        e = self.embed_dim
        self.cls_token = nn.Parameter(torch.randn(1, 1, e) / math.sqrt(e))
        kw = dict(landmarks=landmarks, pinv_iterations=pinv_iterations, mode=attention,
                  dropout=dropout)
        self.norm1, self.attn1 = nn.LayerNorm(e), NystromAttention(e, heads, **kw)
        self.ppeg = PPEG(e)
        self.norm2, self.attn2 = nn.LayerNorm(e), NystromAttention(e, heads, **kw)
        self.norm = nn.LayerNorm(e)
        self._build_classifier()

    def _pool(self, x, mask, coords):
        h = self.proj(x)
        b = h.shape[0]
        seq = torch.cat([self.cls_token.expand(b, -1, -1).to(h.dtype), h], dim=1)
        seq_mask = torch.cat([mask.new_ones(b, 1), mask], dim=1)
        seq = seq + self.attn1(self.norm1(seq), seq_mask)[0]
        if coords is not None:
            grid = SparseGrid(coords, mask, radius=3)
            seq = torch.cat([seq[:, :1], self.ppeg(seq[:, 1:], grid)], dim=1)
        delta, att = self.attn2(self.norm2(seq), seq_mask)
        seq = seq + delta
        att = att[:, 1:]  # drop the class token's attention to itself, renormalise over tiles
        att = att / att.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return self.norm(seq[:, 0]), att

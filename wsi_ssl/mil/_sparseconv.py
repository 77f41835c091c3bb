"""Coordinate-aware MIL: tile embeddings on their grid cells, sparse neighbour convolution, pooling.

The sparse grid is plain torch: every occupied cell gets an int64 key ``(bag, x, y)``; the keys
are sorted once (``torch.unique``) and a neighbour at offset ``(dx, dy)`` is found with
``torch.searchsorted`` on the sorted keys. Memory and time scale with the number of occupied
cells (= tiles), never with the slide area. Tiles whose coords round to the same cell are
averaged into that cell.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from wsi_ssl.errors import ConfigError, InputError
from wsi_ssl.mil._base import (
    MILHead,
    _check_int,
    _check_option,
    _check_prob,
    attention_scores,
    projection,
    register_head,
)

__all__ = ["SparseGrid", "SparseConv2d", "SparseConvMIL"]


class SparseGrid:
    """The occupied cells of a padded batch of bags, with neighbour lookups.

    Args:
        coords: tile positions in grid units (rounded to cells).
        mask: True for real tiles.
        radius: largest neighbour offset that will be asked for (kernel size // 2).

    Shape:
        coords ``(B, N, 2)`` float, mask ``(B, N)`` bool. ``n_cells = M``; ``tile_cell`` ``(T,)``
        maps the ``T`` real tiles (in ``mask`` order) to cells; ``cell_bag`` ``(M,)``.
    """

    def __init__(self, coords: torch.Tensor, mask: torch.Tensor, radius: int = 1) -> None:
        if not bool(torch.isfinite(coords[mask]).all()):
            raise InputError("coords contain NaN or inf on real tiles; pass finite grid positions.")
        b = coords.shape[0]
        cell = torch.round(coords.double()).long()  # (B, N, 2)
        big = torch.iinfo(torch.int64).max
        cx, cy = cell[..., 0], cell[..., 1]
        cx = cx - cx.masked_fill(~mask, big).amin(dim=1, keepdim=True) + radius
        cy = cy - cy.masked_fill(~mask, big).amin(dim=1, keepdim=True) + radius
        self.height = int(cy[mask].max()) + radius + 1
        self.width = int(cx[mask].max()) + radius + 1
        if b * self.width * self.height >= 2**62:
            raise InputError(
                f"coords span {self.width} x {self.height} cells; pass coords in grid units "
                "(level-0 px divided by stride_level0), not level-0 pixels."
            )
        bag = torch.arange(b, device=coords.device).unsqueeze(1).expand_as(cx)
        key = (bag * self.width + cx) * self.height + cy
        self.mask = mask
        self.keys, self.tile_cell = torch.unique(key[mask], sorted=True, return_inverse=True)
        self.n_cells = int(self.keys.shape[0])
        self.n_bags = b
        self.cell_bag = self.keys // (self.width * self.height)
        self.tile_count = torch.bincount(self.tile_cell, minlength=self.n_cells)
        self.cell_count = torch.bincount(self.cell_bag, minlength=b)
        self._nbr: dict[tuple, Any] = {}

    def neighbours(self, dx: int, dy: int) -> torch.Tensor:
        """Index of the cell at offset ``(dx, dy)`` of every cell, ``n_cells`` where empty.

        Shape:
            ``(M,)`` int64 (index ``M`` points at an extra zero row).
        """
        if (dx, dy) not in self._nbr:
            target = self.keys + dx * self.height + dy
            pos = torch.searchsorted(self.keys, target).clamp_max(self.n_cells - 1)
            found = self.keys[pos] == target
            self._nbr[(dx, dy)] = torch.where(found, pos, torch.full_like(pos, self.n_cells))
        return self._nbr[(dx, dy)]

    def neighbour_pairs(self, dx: int, dy: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dst, src)`` cell indices where cell ``src`` is at offset ``(dx, dy)`` of ``dst``.

        Shape:
            two ``(P,)`` int64 tensors, ``P`` = number of occupied neighbour pairs.
        """
        if ("pairs", dx, dy) not in self._nbr:
            nb = self.neighbours(dx, dy)
            dst = torch.nonzero(nb < self.n_cells).flatten()
            self._nbr[("pairs", dx, dy)] = (dst, nb[dst])
        return self._nbr[("pairs", dx, dy)]

    def tiles_to_cells(self, h: torch.Tensor) -> torch.Tensor:
        """Mean of the tile features of every cell: ``(B, N, E)`` -> ``(M, E)``."""
        flat = h[self.mask]
        out = torch.zeros(self.n_cells, h.shape[-1], dtype=h.dtype, device=h.device)
        out.index_add_(0, self.tile_cell, flat)
        return out / self.tile_count.unsqueeze(1).to(h.dtype)

    def cells_to_tiles(self, c: torch.Tensor, n: int) -> torch.Tensor:
        """Scatter cell features back onto the tiles: ``(M, E)`` -> ``(B, N, E)`` (0 on padding)."""
        out = torch.zeros(self.n_bags, n, c.shape[-1], dtype=c.dtype, device=c.device)
        out[self.mask] = c[self.tile_cell]
        return out

    def pool_mean(self, c: torch.Tensor) -> torch.Tensor:
        """Mean over the cells of every bag: ``(M, E)`` -> ``(B, E)``."""
        out = torch.zeros(self.n_bags, c.shape[-1], dtype=c.dtype, device=c.device)
        out.index_add_(0, self.cell_bag, c)
        return out / self.cell_count.clamp_min(1).unsqueeze(1).to(c.dtype)

    def softmax(self, scores: torch.Tensor) -> torch.Tensor:
        """Softmax of one score per cell within each bag: ``(M,)`` -> ``(M,)`` weights that sum
        to 1 over the cells of every bag."""
        big = torch.full((self.n_bags,), float("-inf"), dtype=scores.dtype, device=scores.device)
        top = big.scatter_reduce(0, self.cell_bag, scores, reduce="amax", include_self=True)
        e = torch.exp(scores - top[self.cell_bag])
        tot = torch.zeros(self.n_bags, dtype=e.dtype, device=e.device).index_add_(0, self.cell_bag, e)
        return e / tot[self.cell_bag]

    def pool_weighted(self, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Sum of the cells of every bag weighted by ``w``: ``(M, E)``, ``(M,)`` -> ``(B, E)``."""
        out = torch.zeros(self.n_bags, c.shape[-1], dtype=c.dtype, device=c.device)
        return out.index_add_(0, self.cell_bag, c * w.unsqueeze(1))

    def pool_max(self, c: torch.Tensor) -> torch.Tensor:
        """Feature-wise max over the cells of every bag: ``(M, E)`` -> ``(B, E)``."""
        out = torch.full((self.n_bags, c.shape[-1]), float("-inf"), dtype=c.dtype, device=c.device)
        idx = self.cell_bag.unsqueeze(1).expand_as(c)
        return out.scatter_reduce(0, idx, c, reduce="amax", include_self=True)


class SparseConv2d(nn.Module):
    """A ``k x k`` convolution over the occupied cells of a :class:`SparseGrid` only.

    ``out_c = b + sum_{(dx, dy)} W_{dx,dy} h_{c + (dx, dy)}`` over occupied neighbours; empty cells
    contribute nothing and produce nothing. ``depthwise=True`` uses one weight per channel (the
    TransMIL PPEG). Only occupied neighbour pairs are computed: cost O((M + P) * E_in * E_out)
    with ``P <= (k^2 - 1) * M`` the occupied neighbour pairs (depthwise O((M + P) * E)); a bag of
    5 scattered tiles costs about one ``Linear``. Memory O(M * E).

    Shape:
        ``(M, E_in)`` -> ``(M, E_out)``.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3, *,
                 depthwise: bool = False) -> None:
        super().__init__()
        owner = type(self).__name__
        k = _check_int(owner, "kernel_size", kernel_size, 1)
        if k % 2 == 0:
            raise ConfigError(f"{owner}(kernel_size={k}) must be an odd integer (the cell is "
                              "the kernel's centre).")
        self.kernel_size, self.depthwise = k, depthwise
        if depthwise and in_dim != out_dim:
            raise ConfigError("a depthwise SparseConv2d needs in_dim == out_dim.")
        shape = (k * k, in_dim) if depthwise else (k * k, in_dim, out_dim)
        fan_in = k * k if depthwise else k * k * in_dim
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_dim).uniform_(-bound, bound))
        r = k // 2
        self.offsets = [(dx, dy) for dx in range(-r, r + 1) for dy in range(-r, r + 1)]

    def forward(self, c: torch.Tensor, grid: SparseGrid) -> torch.Tensor:
        centre = len(self.offsets) // 2
        w = self.weight
        out = c * w[centre] if self.depthwise else c @ w[centre]
        others = [o for o in self.offsets if o != (0, 0)]
        pairs = [grid.neighbour_pairs(dx, dy) for dx, dy in others]
        sizes = [int(d.numel()) for d, _ in pairs]
        if sum(sizes) == 0:
            return out + self.bias
        # one gather and one scatter for all offsets; one small matmul per offset
        dst = torch.cat([d for d, _ in pairs])
        nb = c.index_select(0, torch.cat([s for _, s in pairs]))
        ks = [k for k in range(len(self.offsets)) if k != centre]
        terms = [part * w[k] if self.depthwise else part @ w[k]
                 for k, part in zip(ks, nb.split(sizes), strict=True) if part.shape[0]]
        return out.index_add(0, dst, torch.cat(terms)) + self.bias


@register_head("sparseconv")
class SparseConvMIL(MILHead):
    """Coordinate-aware MIL head (SparseConvMIL, Lerousseau et al. 2021; the Giga-SSL aggregator).

    Tiles are projected (``Linear -> ReLU``), placed on their grid cells (``coords`` rounded; tiles
    sharing a cell are averaged), passed through ``n_layers`` residual ``3 x 3`` sparse
    convolutions over occupied cells only (``c <- c + ReLU(conv(c))``), then pooled over cells.
    Cost: O(N log N) for sorting the cell keys plus O(N * (D * E + 9 * n_layers * E^2)) time,
    O(N * E) memory; it never allocates anything the size of the slide.

    Args:
        in_dim: tile feature dimension ``D``.
        n_classes: classes of the linear classifier (0 = none).
        embed_dim: size ``E`` of the projection and of the embedding (default 512).
        n_layers: number of sparse convolution layers (default 1).
        kernel_size: convolution size in cells (default 3, the 8 neighbours).
        pooling: ``"attention"`` (gated attention over cells, the default), ``"mean"`` (the
            original SparseConvMIL / Giga-SSL head) or ``"max"``. On slides whose label lives in
            a minority of the tissue, attention pooling gave clearly better slide-SSL embeddings
            than mean pooling (``benchmarks/bench_slide_ssl.py``).
        attn_dim: hidden size of the attention network (``pooling="attention"`` only).
        dropout: dropout after the projection.

    Shape:
        x ``(B, N, D)``, coords ``(B, N, 2)`` (required) -> embedding ``(B, E)``; attention
        ``(B, N)``: each tile's share of the pooled embedding (mean: ``1 / (cells * tiles in its
        cell)``; attention: its cell's weight / tiles in the cell), or None for max pooling.
    """

    uses_coords = True

    @property
    def pools_with_attention(self) -> bool:  # type: ignore[override]
        """True with ``pooling="attention"``."""
        return self.pooling == "attention"

    def __init__(self, in_dim: int, n_classes: int = 0, *, embed_dim: int = 512,
                 n_layers: int = 1, kernel_size: int = 3, pooling: str = "attention",
                 attn_dim: int = 128, dropout: float = 0.0) -> None:
        super().__init__(in_dim, n_classes)
        owner = type(self).__name__
        self.proj, self.embed_dim = projection(self.in_dim, embed_dim,
                                               _check_prob(owner, "dropout", dropout), owner=owner)
        n_layers = _check_int(owner, "n_layers", n_layers, 0)
        self.convs = nn.ModuleList(
            SparseConv2d(self.embed_dim, self.embed_dim, kernel_size) for _ in range(n_layers)
        )
        self.pooling = _check_option(owner, "pooling", pooling, ("mean", "max", "attention"))
        if pooling == "attention":
            attn_dim = _check_int(owner, "attn_dim", attn_dim, 1)
            self.attn_v = nn.Linear(self.embed_dim, attn_dim)
            self.attn_u = nn.Linear(self.embed_dim, attn_dim)
            self.attn_w = nn.Linear(attn_dim, 1)
        self.radius = _check_int(owner, "kernel_size", kernel_size, 1) // 2
        self._build_classifier()

    def _pool(self, x, mask, coords):
        grid = SparseGrid(coords, mask, radius=self.radius)
        c = grid.tiles_to_cells(self.proj(x))
        for conv in self.convs:
            c = c + torch.relu(conv(c, grid))
        if self.pooling == "max":
            return grid.pool_max(c), None
        if self.pooling == "attention":
            w = grid.softmax(attention_scores(c, self.attn_v, self.attn_w, self.attn_u))
            emb = grid.pool_weighted(c, w)
        else:
            w = 1.0 / grid.cell_count.to(c.dtype)[grid.cell_bag]
            emb = grid.pool_mean(c)
        per_tile = (w / grid.tile_count.to(c.dtype))[grid.tile_cell]
        att = torch.zeros(mask.shape, dtype=c.dtype, device=c.device)
        att[mask] = per_tile
        return emb, att

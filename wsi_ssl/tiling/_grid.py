"""MPP-exact tile grids.

A grid lives in *output pixels* (pixels at the target ``mpp``): cell ``(i, j)`` starts at output
pixel ``(j * stride, i * stride)`` with ``stride = tile_size - overlap``; its level-0 top-left is
that times ``scale0 = mpp / slide.slide_mpp`` (level-0 px per output px), rounded. Only whole tiles
inside the slide are kept. Tiles are read from the coarsest pyramid level that is at least as
fine as the target (5 % tolerance) and resized with antialiasing when that level is finer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl.errors import ConfigError, ResolutionError, TissueWarning
from wsi_ssl.tiling._config import EmbedConfig
from wsi_ssl.tiling._tissue import TissueMask, detect_tissue

if TYPE_CHECKING:  # pragma: no cover
    from wsi_ssl.tiling._slide import Slide

__all__ = ["TileGrid", "tile_grid", "choose_level", "MPP_TOLERANCE"]

logger = logging.getLogger(__name__)

#: Relative tolerance when matching a pyramid level to the target MPP.
MPP_TOLERANCE = 0.05


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one slide at one physical resolution.

    Attributes:
        coords: ``int64 (N, 2)`` level-0 top-left ``(x, y)`` of each tile.
        tissue_fraction: ``float32 (N,)`` tissue fraction of each tile (1.0 without a mask).
        mpp: target µm/px of the tiles.
        tile_size: output tile edge in pixels.
        level: pyramid level the pixels are read from.
        read_size: pixels read at ``level`` per tile edge before resizing to ``tile_size``.
        stride_level0: level-0 pixels between neighbouring tiles (float).
        overlap: output pixels shared by neighbouring tiles.
        slide_mpp: the slide's level-0 µm/px used to build the grid.
        level_downsample: downsample of ``level``.
        grid_shape: ``(rows, cols)`` of the full grid before tissue filtering.
        cells: ``int64 (N, 2)`` ``(row, col)`` of each tile in the full grid.
        backend: slide backend name the grid was built with (provenance).
    """

    coords: np.ndarray
    tissue_fraction: np.ndarray
    mpp: float
    tile_size: int
    level: int
    read_size: int
    stride_level0: float
    overlap: int = 0
    slide_mpp: float = 0.0
    level_downsample: float = 1.0
    grid_shape: tuple[int, int] = (0, 0)
    cells: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    backend: str = ""

    def __len__(self) -> int:
        return int(len(self.coords))

    @property
    def scale0(self) -> float:
        """Level-0 pixels per output pixel."""
        return self.stride_level0 / (self.tile_size - self.overlap)

    @property
    def size_level0(self) -> float:
        """Edge of one tile in level-0 pixels."""
        return self.tile_size * self.scale0

    @property
    def needs_resize(self) -> bool:
        return self.read_size != self.tile_size or not math.isclose(
            self.scale0, self.level_downsample, rel_tol=1e-9)

    def subset(self, indices: Any) -> TileGrid:
        """A grid with only ``indices`` (same geometry)."""
        idx = np.asarray(indices, dtype=np.int64)
        return _replace(self, coords=self.coords[idx], tissue_fraction=self.tissue_fraction[idx],
                        cells=self.cells[idx])


def _replace(grid: TileGrid, **kw: Any) -> TileGrid:
    return dataclasses.replace(grid, **kw)


def choose_level(slide: Any, mpp: float) -> tuple[int, float]:
    """The coarsest level at least as fine as ``mpp`` (5 % tolerance) and its µm/px.

    Raises:
        ResolutionError: ``mpp`` is finer than level 0 (beyond the tolerance).
    """
    mpp0 = float(slide.slide_mpp)
    best = None
    for lv, ds in enumerate(slide.level_downsamples):
        lmpp = mpp0 * float(ds)
        if lmpp <= mpp * (1 + MPP_TOLERANCE) and (best is None or lmpp > best[1]):
            best = (lv, lmpp)
    if best is None:
        raise ResolutionError(
            f"mpp={mpp:g} µm/px is finer than level 0 of '{slide.slide_id}' ({mpp0:g} µm/px); "
            f"upsampling invents detail: use mpp >= {mpp0 * (1 - MPP_TOLERANCE):.3g}."
        )
    return best


def tile_grid(slide: Slide, *, mpp: float = EmbedConfig.default("mpp"),
              tile_size: int = EmbedConfig.default("tile_size"),
              overlap: int = EmbedConfig.default("overlap"),
              min_tissue: float = EmbedConfig.default("min_tissue"),
              tissue: TissueMask | None = None) -> TileGrid:
    """The grid of ``tile_size`` tiles at ``mpp`` µm/px covering the slide's tissue.

    Args:
        slide: an open :class:`Slide` (its own ``slide_mpp`` is needed).
        mpp: target resolution, µm/px (defaults: the :class:`EmbedConfig` fields).
        tile_size: output tile edge, pixels.
        overlap: output pixels shared by neighbours (``0 <= overlap < tile_size``).
        min_tissue: keep tiles whose tissue fraction is at least this (0 keeps every tile).
        tissue: a :class:`TissueMask`; ``None`` runs :func:`detect_tissue` (unless
            ``min_tissue == 0``, then no mask is needed and every fraction is 1.0).

    Returns:
        A :class:`TileGrid`; empty (with a :class:`TissueWarning`) when no tile has tissue.

    Raises:
        MissingMPPError: the slide has no MPP and none was given to ``open_slide``.
        ResolutionError: ``mpp`` finer than level 0.
        ConfigError: bad ``mpp``/``tile_size``/``overlap``/``min_tissue``.
    """
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"mpp={mpp!r} must be a positive number of µm/px (e.g. 0.5).")
    if not (isinstance(tile_size, (int, np.integer)) and tile_size >= 8):
        raise ConfigError(f"tile_size={tile_size!r} must be an integer >= 8 pixels (e.g. 224).")
    if not (isinstance(overlap, (int, np.integer)) and 0 <= overlap < tile_size):
        raise ConfigError(f"overlap={overlap!r} must be an integer in [0, tile_size={tile_size}).")
    if not (0.0 <= float(min_tissue) <= 1.0):
        raise ConfigError(f"min_tissue={min_tissue!r} must be a fraction in [0, 1] (e.g. 0.25).")
    if tissue is not None and not isinstance(tissue, TissueMask):
        raise ConfigError(f"tissue= must be a TissueMask from detect_tissue; got {type(tissue).__name__}.")

    mpp0 = float(slide.slide_mpp)
    level, level_mpp = choose_level(slide, float(mpp))
    ds = float(slide.level_downsamples[level])
    if abs(level_mpp / mpp - 1.0) <= MPP_TOLERANCE:
        # close enough: read tile_size pixels at that level, no resizing
        scale0 = ds
        read_size = int(tile_size)
    else:
        scale0 = mpp / mpp0
        read_size = int(round(tile_size * mpp / level_mpp))
    stride = int(tile_size) - int(overlap)
    w0, h0 = slide.dimensions
    w_out, h_out = w0 / scale0, h0 / scale0
    cols = int(math.floor((w_out - tile_size) / stride)) + 1 if w_out >= tile_size else 0
    rows = int(math.floor((h_out - tile_size) / stride)) + 1 if h_out >= tile_size else 0
    rr, cc = np.meshgrid(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64),
                         indexing="ij")
    cells = np.stack([rr.ravel(), cc.ravel()], axis=1)
    xy = np.floor(cells[:, ::-1] * stride * scale0 + 1e-6).astype(np.int64)
    size0 = tile_size * scale0
    if min_tissue > 0 or tissue is not None:
        if tissue is None:
            tissue = detect_tissue(slide)
        boxes = np.concatenate([xy, xy + size0], axis=1).astype(np.float64)
        frac = tissue.region_fractions(boxes)
    else:
        frac = np.ones(len(xy), np.float32)
    keep = frac >= float(min_tissue) if min_tissue > 0 else np.ones(len(xy), bool)
    grid = TileGrid(
        coords=np.ascontiguousarray(xy[keep]), tissue_fraction=frac[keep].astype(np.float32),
        mpp=float(mpp), tile_size=int(tile_size), level=int(level), read_size=read_size,
        stride_level0=float(stride * scale0), overlap=int(overlap), slide_mpp=mpp0,
        level_downsample=ds, grid_shape=(rows, cols), cells=np.ascontiguousarray(cells[keep]),
        backend=str(getattr(slide, "backend", "")),
    )
    if len(grid) == 0:
        why = ("the slide is smaller than one tile" if rows * cols == 0
               else f"no tile has tissue fraction >= min_tissue={min_tissue}")
        warnings.warn(f"'{slide.slide_id}': empty tile grid ({why}); lower min_tissue or check "
                      "the tissue mask with plot_grid.", TissueWarning, stacklevel=2)
    logger.info("%s: %d tiles at %g µm/px from level %d (read %d px)", slide.slide_id, len(grid),
                mpp, level, read_size)
    return grid

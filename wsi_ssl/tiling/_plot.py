"""The QC picture: thumbnail, tissue mask and tile boxes (what to check before GPU hours)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from wsi_ssl.tiling._grid import TileGrid
    from wsi_ssl.tiling._slide import Slide
    from wsi_ssl.tiling._tissue import TissueMask

__all__ = ["plot_grid"]


def plot_grid(slide: Slide, grid: TileGrid, tissue: TissueMask | None = None, *,
              thumbnail_size: int = 1024, title: str | None = None) -> Figure:
    """Draw the slide thumbnail, the tissue mask outline and every tile box.

    Args:
        slide: an open :class:`Slide`.
        grid: a :class:`TileGrid` of that slide (may be empty).
        tissue: a :class:`TissueMask` to overlay (optional).
        thumbnail_size: longer side of the thumbnail, pixels.
        title: figure title (default: slide id, tile count, µm/px, level, backend).

    Returns:
        A :class:`matplotlib.figure.Figure` (not shown; ``fig.savefig(...)`` it). Uses no
        pyplot state, so it is safe in scripts and threads.
    """
    from matplotlib.collections import LineCollection  # lazy: matplotlib only for figures
    from matplotlib.figure import Figure  # lazy: matplotlib only when a figure is drawn

    thumb = slide.thumbnail(thumbnail_size)
    w0, h0 = slide.dimensions
    sx, sy = thumb.shape[1] / w0, thumb.shape[0] / h0
    aspect = thumb.shape[1] / max(1, thumb.shape[0])
    fig = Figure(figsize=(min(12.0, 6.0 * aspect + 0.5), 6.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(thumb, interpolation="nearest")
    if tissue is not None and tissue.mask.any():
        m = tissue.mask.astype(float)
        xs = (np.arange(m.shape[1]) + 0.5) * tissue.downsample[0] * sx - 0.5
        ys = (np.arange(m.shape[0]) + 0.5) * tissue.downsample[1] * sy - 0.5
        ax.contour(xs, ys, m, levels=[0.5], colors=["#00c000"], linewidths=1.0)
    if len(grid):
        size = grid.tile_size * grid.scale0
        xy = np.asarray(grid.coords, dtype=float)
        x0, y0 = xy[:, 0] * sx, xy[:, 1] * sy
        x1, y1 = (xy[:, 0] + size) * sx, (xy[:, 1] + size) * sy
        segs = np.stack([
            np.stack([x0, y0], 1), np.stack([x1, y0], 1), np.stack([x1, y1], 1),
            np.stack([x0, y1], 1), np.stack([x0, y0], 1)], axis=1)
        ax.add_collection(LineCollection(segs, colors="#1f5fff", linewidths=0.4, alpha=0.8))
    ax.set_xlim(-0.5, thumb.shape[1] - 0.5)
    ax.set_ylim(thumb.shape[0] - 0.5, -0.5)
    ax.set_axis_off()
    if title is None:
        title = (f"{slide.slide_id}: {len(grid)} tiles of {grid.tile_size} px at {grid.mpp:g} µm/px\n"
                 f"(level {grid.level}, read {grid.read_size} px, {slide.backend})")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig

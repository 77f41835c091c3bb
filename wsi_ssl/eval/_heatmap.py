"""Where the model looks: per-tile scores of a slide drawn over its thumbnail.

Scores come from a trained model applied to **all** tiles of one slide of a tile store:

- ``"attention"``: the attention weights of the MIL head of a :class:`~wsi_ssl.pretrain.SlideSSL`
  model (``abmil``, ``gated_abmil``, ``dsmil``, ``transmil``, ``sparseconv`` with attention
  pooling) or of a fitted :class:`~wsi_ssl.mil.MILClassifier`, reported relative to uniform
  attention (``n * a_i``: 1 = an average tile, 10 = ten times the average weight);
- ``"tile_logit"``: a fitted :class:`~wsi_ssl.mil.MILClassifier` applied to every tile as a bag
  of one tile: the log-odds of ``target_class`` (default the last class, e.g. ``1``) for that
  tile alone.

Coordinates are level-0 pixels ``(x, y)`` (top-left of each tile), sizes in level-0 pixels.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_ssl._utils import atomic_write_bytes, sanitize_id
from wsi_ssl.errors import ConfigError, InputError

__all__ = ["HeatmapResult", "heatmap", "tile_scores", "plot_tile_values"]

logger = logging.getLogger(__name__)

ScoreKind = Literal["attention", "tile_logit"]



@dataclass(frozen=True, kw_only=True)
class HeatmapResult:
    """Per-tile scores of one slide (and the files drawn from them).

    Attributes:
        slide_id: the slide.
        coords: ``int64 (N, 2)`` level-0 ``(x, y)`` top-left of each tile.
        scores: ``float32 (N,)`` one score per tile.
        kind: ``"attention"`` or ``"tile_logit"``.
        meaning: what a score means, in words (the figure title uses it).
        tile_size_level0: tile edge in level-0 pixels.
        stride_level0: level-0 pixels between neighbouring tiles.
        figure: the PNG written, or None.
        csv: the CSV written (``slide_id, x, y, score``), or None.
    """

    slide_id: str
    coords: np.ndarray
    scores: np.ndarray
    kind: str
    meaning: str
    tile_size_level0: float
    stride_level0: float
    figure: Path | None = None
    csv: Path | None = None

    def __len__(self) -> int:
        return int(len(self.scores))

    def to_frame(self):
        """A DataFrame with columns ``slide_id, x, y, score`` (one row per tile)."""
        import pandas as pd  # lazy: pandas, only for a table

        return pd.DataFrame({"slide_id": self.slide_id, "x": self.coords[:, 0],
                             "y": self.coords[:, 1], "score": self.scores})

    def top_tiles(self, k: int) -> np.ndarray:
        """Indices of the ``k`` highest-scoring tiles, best first."""
        return np.argsort(-self.scores, kind="stable")[: int(k)]


def _open_store(store: Any) -> Any:
    if isinstance(store, (str, os.PathLike)):
        from wsi_ssl.store import TileStore  # lazy: zarr, only for a store path

        return TileStore(store, mode="r")
    return store


def read_slide_tiles(store: Any, slide_id: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Features ``(N, D)`` float32, level-0 coords ``(N, 2)`` int64 and attrs of a store slide."""
    store = _open_store(store)
    if slide_id not in store:
        ids = list(store.slide_ids)
        raise InputError(f"slide_id={slide_id!r} is not a complete slide of tile store "
                         f"'{getattr(store, 'path', store)}'; it has {len(ids)} slides, e.g. "
                         f"{ids[:3]}. Embed the slide first (`wsi-ssl embed`).")
    rec = store[slide_id]
    feats = np.asarray(rec.features, np.float32)
    if len(feats) == 0:
        raise InputError(f"slide {slide_id!r} has no tiles in the store (no tissue found).")
    return feats, np.asarray(rec.coords, np.int64), dict(getattr(rec, "attrs", {}) or {})


def tile_geometry(coords: np.ndarray, attrs: dict[str, Any]) -> tuple[float, float]:
    """``(stride_level0, tile_size_level0)`` of a store slide (estimated from coords if absent)."""
    from wsi_ssl.mil import grid_stride  # lazy: the mil package loads torch

    stride = float(grid_stride(coords, attrs))
    size = float(attrs.get("tile_size_level0") or stride)
    return stride, size


def _load_model(model: Any) -> Any:
    if isinstance(model, (str, os.PathLike)):
        from wsi_ssl.pretrain import SlideSSL  # lazy: torch, only for a saved model directory

        return SlideSSL.load(model)
    return model


def _model_scores(model: Any, feats: np.ndarray, grid: np.ndarray, kind: str,
                  target_class: Any) -> tuple[np.ndarray, str]:
    """Scores ``(N,)`` and their meaning for a SlideSSL or a fitted MILClassifier, from their
    public methods (``attention``, ``tile_scores``)."""
    from wsi_ssl.mil import MILClassifier  # lazy: torch, only when scoring
    from wsi_ssl.pretrain import SlideSSL  # lazy: torch, only when scoring

    if isinstance(model, MILClassifier):
        if kind == "attention":
            att = model.attention(feats, coords=grid)
            return _relative_to_uniform(att), "MIL attention (x uniform)"
        scores = model.tile_scores(feats, coords=grid, target_class=target_class)
        target = model.classes_[-1] if target_class is None else target_class
        return scores, f"tile log-odds of class {target}"
    if isinstance(model, SlideSSL):
        if kind != "attention":
            raise ConfigError("kind='tile_logit' needs a fitted MILClassifier; a SlideSSL model "
                              "has no classifier (use kind='attention').")
        att = model.attention(feats, coords=grid)
        return _relative_to_uniform(att), "slide-SSL attention (x uniform)"
    raise InputError(f"model must be a SlideSSL (or its model directory) or a fitted "
                     f"MILClassifier; got {type(model).__name__}.")


def _relative_to_uniform(att: np.ndarray) -> np.ndarray:
    """Attention weights ``(N,)`` times ``N`` (1 = an average tile), float32."""
    return (att.astype(np.float64) * len(att)).astype(np.float32)


def tile_scores(store: Any, slide_id: str, model: Any, *, kind: ScoreKind = "attention",
                target_class: Any = None) -> HeatmapResult:
    """Score every tile of one slide of ``store`` with ``model`` (no picture).

    Args:
        store: a :class:`~wsi_ssl.store.TileStore` or its path.
        slide_id: the slide.
        model: a :class:`~wsi_ssl.pretrain.SlideSSL` (or its saved directory) or a fitted
            :class:`~wsi_ssl.mil.MILClassifier`, trained on features of the store's encoder.
        kind: ``"attention"`` or ``"tile_logit"`` (MILClassifier only).
        target_class: class whose tile log-odds are mapped (default the last class).

    Returns:
        A :class:`HeatmapResult` with ``figure=None`` and ``csv=None``.

    Raises:
        ConfigError: a head without attention (the message names the heads that have it).
        InputError: unknown slide, wrong model type.
    """
    if kind not in ("attention", "tile_logit"):
        raise ConfigError(f"kind={kind!r} must be 'attention' or 'tile_logit'.")
    model = _load_model(model)
    feats, coords, attrs = read_slide_tiles(store, slide_id)
    n_in = getattr(model, "n_features_in_", feats.shape[1])
    if feats.shape[1] != n_in:
        raise InputError(f"slide {slide_id!r} has {feats.shape[1]}-d features but the model was "
                         f"trained on {n_in}-d ones; use the store of its tile encoder.")
    stride, size = tile_geometry(coords, attrs)
    scores, meaning = _model_scores(model, feats, coords / stride, kind, target_class)
    return HeatmapResult(slide_id=slide_id, coords=coords, scores=scores, kind=kind,
                         meaning=meaning, tile_size_level0=size, stride_level0=stride)


def plot_tile_values(slide: Any, coords: np.ndarray, values: np.ndarray, *, stride: float,
                     tissue: Any = None, title: str = "", label: str = "",
                     cmap: str = "inferno", categorical: bool = False,
                     color_range: tuple[float, float] | None = None,
                     thumbnail_size: int = 1024) -> Any:
    """Per-tile values as a coloured layer over the slide thumbnail (tissue outline in green).

    Args:
        slide: an open slide.
        coords: ``(N, 2)`` level-0 top-left of each tile.
        values: ``(N,)`` one value per tile (integers 0..K-1 when ``categorical``).
        stride: level-0 pixels between neighbouring tiles (one coloured cell per tile).
        tissue: a :class:`~wsi_ssl.tiling.TissueMask` to outline, or None.
        title: figure title; label: colour bar label.
        cmap: matplotlib colour map; categorical: one colour per value with a legend-like bar.
        color_range: ``(low, high)`` of the colour scale (default: the 1st and 99th percentiles
            of ``values``); give several slides the same range to compare them.
        thumbnail_size: longer side of the thumbnail, pixels.

    Returns:
        A :class:`matplotlib.figure.Figure` (no pyplot state).
    """
    from matplotlib import colormaps  # lazy: matplotlib, only when drawing
    from matplotlib.colors import BoundaryNorm, ListedColormap  # lazy: matplotlib

    from wsi_ssl.tiling import TileGrid, plot_grid  # lazy: slide readers and matplotlib

    empty = TileGrid(coords=np.zeros((0, 2), np.int64), tissue_fraction=np.zeros(0, np.float32),
                     mpp=float(slide.slide_mpp), tile_size=1, level=0, read_size=1,
                     stride_level0=float(stride))
    fig = plot_grid(slide, empty, tissue, thumbnail_size=thumbnail_size, title=title)
    ax = fig.axes[0]
    w0, h0 = slide.dimensions
    thumb_h, thumb_w = (round(v) for v in (ax.get_ylim()[0] + 0.5, ax.get_xlim()[1] + 0.5))
    sx, sy = thumb_w / w0, thumb_h / h0
    coords = np.asarray(coords, np.float64)
    origin = coords.min(0)
    cell = np.round((coords - origin) / stride).astype(np.int64)
    cols, rows = cell.max(0) + 1
    layer = np.full((rows, cols), np.nan)
    layer[cell[:, 1], cell[:, 0]] = values
    extent = (origin[0] * sx - 0.5, (origin[0] + cols * stride) * sx - 0.5,
              (origin[1] + rows * stride) * sy - 0.5, origin[1] * sy - 0.5)
    if categorical:
        k = int(np.max(values)) + 1 if len(values) else 1
        cm = ListedColormap(colormaps["tab10" if k <= 10 else "tab20"].colors[:k])
        im = ax.imshow(layer, extent=extent, cmap=cm, norm=BoundaryNorm(np.arange(k + 1) - 0.5, k),
                       interpolation="nearest", alpha=0.6)
        bar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, ticks=np.arange(k))
    else:
        if color_range is not None:
            lo, hi = (float(v) for v in color_range)
        else:
            lo, hi = np.percentile(values, [1, 99]) if len(values) else (0.0, 1.0)
        im = ax.imshow(layer, extent=extent, cmap=cmap, vmin=lo, vmax=max(hi, lo + 1e-9),
                       interpolation="nearest", alpha=0.65)
        bar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(label)
    ax.set_xlim(-0.5, thumb_w - 0.5)
    ax.set_ylim(thumb_h - 0.5, -0.5)
    fig.tight_layout()
    return fig


def save_tile_map(slide_path: str | os.PathLike, slide_id: str, frame: Any, values: np.ndarray,
                  *, stride: float, out_dir: str | os.PathLike, suffix: str, title: str,
                  label: str, categorical: bool = False, slide_mpp: float | None = None,
                  color_range: tuple[float, float] | None = None
                  ) -> tuple[Path, Path]:
    """Write ``{slide_id}_{suffix}.csv`` (``frame``: slide_id, x, y, value) and the picture of
    ``values`` per tile over the slide (tissue outlined) as ``{slide_id}_{suffix}.png``."""
    from wsi_ssl.tiling import detect_tissue, open_slide  # lazy: slide readers

    if not Path(slide_path).exists():
        raise InputError(f"slide '{slide_path}' does not exist; pass the file the store's "
                         f"slide {slide_id!r} was embedded from.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, png = out / f"{slide_id}_{suffix}.csv", out / f"{slide_id}_{suffix}.png"
    atomic_write_bytes(csv, frame.to_csv(index=False).encode("utf-8"))
    coords = frame[["x", "y"]].to_numpy()
    with open_slide(slide_path, slide_mpp=slide_mpp) as slide:
        tissue = detect_tissue(slide)
        fig = plot_tile_values(slide, coords, values, stride=stride, tissue=tissue, title=title,
                               label=label, categorical=categorical, color_range=color_range)
    fig.savefig(png, dpi=100, bbox_inches="tight")
    return png, csv


def heatmap(slide_path: str | os.PathLike, store: Any, model: Any, *,
            slide_id: str | None = None, kind: ScoreKind = "attention",
            target_class: Any = None, out_dir: str | os.PathLike | None = None,
            slide_mpp: float | None = None,
            color_range: tuple[float, float] | None = None) -> HeatmapResult:
    """Per-tile scores of ``model`` over all tiles of one slide, drawn over its thumbnail.

    Args:
        slide_path: the slide file (for the thumbnail and tissue outline).
        store: the :class:`~wsi_ssl.store.TileStore` (or path) holding the slide's tiles.
        model: a :class:`~wsi_ssl.pretrain.SlideSSL`, its saved directory, or a fitted
            :class:`~wsi_ssl.mil.MILClassifier`.
        slide_id: the slide's id in the store (default: the sanitised file stem).
        kind: ``"attention"`` (SlideSSL or MILClassifier attention heads) or ``"tile_logit"``
            (MILClassifier: each tile classified alone; log-odds of ``target_class``).
        target_class: class mapped by ``"tile_logit"`` (default the last class).
        out_dir: where ``{slide_id}_{kind}.png`` and ``.csv`` (``slide_id, x, y, score``) go;
            None = nothing written.
        slide_mpp: the slide's own µm/px when its file has none (``--assume-mpp`` of
            ``embed``).
        color_range: ``(low, high)`` of the colour scale (default: the slide's 1st-99th
            percentiles); pass the same range to compare slides.

    Returns:
        A :class:`HeatmapResult` (``figure`` / ``csv`` set when ``out_dir`` is given).
    """
    sid = slide_id or sanitize_id(Path(slide_path).stem)
    res = tile_scores(store, sid, model, kind=kind, target_class=target_class)
    if out_dir is None:
        return res
    top = res.scores.max() if len(res) else float("nan")
    title = (f"{sid}: {res.meaning}, {len(res)} tiles (max {top:.3g})\n"
             "bright = high score; green line = tissue outline")
    png, csv = save_tile_map(slide_path, sid, res.to_frame(), res.scores,
                             stride=res.stride_level0, out_dir=out_dir, suffix=kind, title=title,
                             label=res.meaning, slide_mpp=slide_mpp, color_range=color_range)
    logger.info("heatmap of %s (%s): %s", sid, kind, png)
    return replace(res, figure=png, csv=csv)

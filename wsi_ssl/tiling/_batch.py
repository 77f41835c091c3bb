"""Tile many slides (what ``wsi-ssl tile`` runs): per slide a coords CSV, a grid JSON and a QC
PNG; failures are recorded and the others go on.

Output layout (``out_dir``)::

    tiling_config.json              the arguments of the run
    tiling_report.csv               one row per slide (status, tiles, backend, error)
    <slide_id>/coords.csv           index,x,y,row,col,tissue_fraction  (level-0 px)
    <slide_id>/grid.json            mpp, tile_size, level, read_size, stride_level0, backend, ...
    <slide_id>/qc.png               plot_grid picture
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl._utils import (
    atomic_write_bytes,
    expand_slide_paths,
    file_fingerprint,
    progress,
    sanitize_id,
)
from wsi_ssl.errors import ConfigError, TissueWarning, WsiSslError
from wsi_ssl.tiling._config import EmbedConfig
from wsi_ssl.tiling._grid import TileGrid, tile_grid
from wsi_ssl.tiling._plot import plot_grid
from wsi_ssl.tiling._slide import BackendName, open_slide
from wsi_ssl.tiling._tissue import detect_tissue

__all__ = ["TilingRow", "TilingReport", "tile_slides", "load_grid", "SavedGrid"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TilingRow:
    """The outcome for one slide (``status`` is ``"ok"``, ``"skipped"`` (done before) or ``"failed"``)."""

    slide_id: str
    path: str
    status: str
    n_tiles: int = 0
    backend: str = ""
    level: int = -1
    read_size: int = 0
    slide_mpp: float = float("nan")
    mpp_assumed: bool = False
    tissue_fraction: float = float("nan")
    seconds: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class TilingReport:
    """All slides of one :func:`tile_slides` run."""

    rows: tuple[TilingRow, ...]
    out_dir: Path
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_slides(self) -> int:
        return len(self.rows)

    @property
    def n_failed(self) -> int:
        return sum(r.status == "failed" for r in self.rows)

    @property
    def n_tiles(self) -> int:
        return sum(r.n_tiles for r in self.rows if r.status != "failed")

    @property
    def failures(self) -> tuple[TilingRow, ...]:
        return tuple(r for r in self.rows if r.status == "failed")

    @property
    def ok(self) -> bool:
        return self.n_failed == 0

    def to_pandas(self) -> Any:
        import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

        return pd.DataFrame([asdict(r) for r in self.rows])

    def format_table(self) -> str:
        """A plain-text table: one line per slide and a totals line."""
        lines = [f"{'slide':32s} {'status':8s} {'tiles':>7s} {'backend':10s} {'lvl':>3s} "
                 f"{'mpp':>7s} note"]
        for r in self.rows:
            mpp = "" if np.isnan(r.slide_mpp) else f"{r.slide_mpp:.3f}" + ("*" if r.mpp_assumed else "")
            note = r.error if r.status == "failed" else ""
            lines.append(f"{r.slide_id[:32]:32s} {r.status:8s} {r.n_tiles:7d} {r.backend:10s} "
                         f"{r.level if r.level >= 0 else '':>3} {mpp:>7s} {note}")
        lines.append(f"{self.n_slides} slides, {self.n_tiles} tiles, {self.n_failed} failed "
                     f"-> {self.out_dir}")
        return "\n".join(lines)


def _grid_params(mpp: float, tile_size: int, min_tissue: float, overlap: int,
                 assume_mpp: float | None, backend: str) -> dict[str, Any]:
    return {"mpp": mpp, "tile_size": tile_size, "min_tissue": min_tissue, "overlap": overlap,
            "assume_mpp": assume_mpp, "backend": backend}


@dataclass(frozen=True)
class SavedGrid:
    """One slide's tiling read back from :func:`tile_slides`' output folder.

    Attributes:
        slide_id: the slide id (the folder name).
        meta: the contents of ``grid.json`` (slide, parameters, backend, provenance).
        grid: the :class:`~wsi_ssl.tiling.TileGrid` (coords, cells, tissue fractions, level...).
    """

    slide_id: str
    meta: dict[str, Any]
    grid: TileGrid

    @property
    def coords(self) -> np.ndarray:
        """``int64 (N, 2)`` level-0 ``(x, y)`` of each tile."""
        return self.grid.coords


def load_grid(slide_dir: str | os.PathLike) -> SavedGrid:
    """Read back ``grid.json`` and ``coords.csv`` of one tiled slide.

    Args:
        slide_dir: ``OUT/<slide_id>`` written by :func:`tile_slides` / ``wsi-ssl tile``.

    Returns:
        A :class:`SavedGrid` (``.meta``, ``.grid``, ``.coords``).
    """
    d = Path(slide_dir)
    meta = json.loads((d / "grid.json").read_text())
    data = np.loadtxt(d / "coords.csv", delimiter=",", skiprows=1, ndmin=2)
    if not data.size:
        data = np.zeros((0, 6))
    grid = TileGrid(
        coords=data[:, 1:3].astype(np.int64), tissue_fraction=data[:, 5].astype(np.float32),
        mpp=float(meta["mpp"]), tile_size=int(meta["tile_size"]), level=int(meta["level"]),
        read_size=int(meta["read_size"]), stride_level0=float(meta["stride_level0"]),
        overlap=int(meta.get("overlap", 0)), slide_mpp=float(meta.get("slide_mpp") or 0.0),
        level_downsample=float(meta.get("level_downsample", 1.0)),
        grid_shape=tuple(int(v) for v in meta.get("grid_shape", (0, 0))),
        cells=data[:, 3:5].astype(np.int64), backend=str(meta.get("backend", "")))
    return SavedGrid(slide_id=str(meta.get("slide_id", d.name)), meta=meta, grid=grid)


def _tile_one(path: Path, out_dir: Path, params: dict[str, Any], plot: bool) -> TilingRow:

    t0 = time.perf_counter()
    slide = open_slide(path, backend=params["backend"])
    try:
        if slide.native_mpp is None and params["assume_mpp"] is not None:
            backend = slide.backend
            slide.close()
            slide = open_slide(path, backend=backend, slide_mpp=params["assume_mpp"])
        tissue = detect_tissue(slide)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TissueWarning)
            grid = tile_grid(slide, mpp=params["mpp"], tile_size=params["tile_size"],
                             overlap=params["overlap"], min_tissue=params["min_tissue"],
                             tissue=tissue)
        for w in caught:
            logger.warning("%s", w.message)
        sdir = out_dir / slide.slide_id
        sdir.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        wr = csv.writer(buf, lineterminator="\n")
        wr.writerow(["index", "x", "y", "row", "col", "tissue_fraction"])
        for i, ((x, y), (r, c), fr) in enumerate(zip(grid.coords, grid.cells, grid.tissue_fraction, strict=False)):
            wr.writerow([i, int(x), int(y), int(r), int(c), f"{float(fr):.4f}"])
        atomic_write_bytes(sdir / "coords.csv", buf.getvalue().encode())
        if plot:

            fig = plot_grid(slide, grid, tissue)
            fig.savefig(sdir / "qc.png", dpi=100)
        meta = {
            "slide_id": slide.slide_id, "path": str(path), "source": file_fingerprint(path),
            "params": params, "backend": slide.backend, "dimensions": list(slide.dimensions),
            "slide_mpp": slide.slide_mpp, "mpp_assumed": slide.mpp_assumed, "mpp": grid.mpp,
            "tile_size": grid.tile_size, "overlap": grid.overlap, "level": grid.level,
            "level_downsample": grid.level_downsample, "read_size": grid.read_size,
            "stride_level0": grid.stride_level0, "grid_shape": list(grid.grid_shape),
            "n_tiles": len(grid), "tissue_fraction": tissue.fraction,
        }
        atomic_write_bytes(sdir / "grid.json", json.dumps(meta, indent=2).encode())
        return TilingRow(slide.slide_id, str(path), "ok", len(grid), slide.backend, grid.level,
                         grid.read_size, slide.slide_mpp, slide.mpp_assumed, tissue.fraction,
                         time.perf_counter() - t0)
    finally:
        slide.close()


def _already_done(path: Path, out_dir: Path, params: dict[str, Any]) -> TilingRow | None:

    sdir = out_dir / sanitize_id(path.stem)
    try:
        meta = json.loads((sdir / "grid.json").read_text())
    except (OSError, ValueError):
        return None
    if (meta.get("params") != params or meta.get("source") != file_fingerprint(path)
            or not (sdir / "coords.csv").exists()):
        return None
    return TilingRow(meta["slide_id"], str(path), "skipped", int(meta["n_tiles"]), meta["backend"],
                     int(meta["level"]), int(meta["read_size"]), float(meta["slide_mpp"]),
                     bool(meta["mpp_assumed"]), float(meta["tissue_fraction"]), 0.0)


def tile_slides(slides: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                *, mpp: float = EmbedConfig.default("mpp"),
                tile_size: int = EmbedConfig.default("tile_size"),
                min_tissue: float = EmbedConfig.default("min_tissue"),
                assume_mpp: float | None = None, backend: BackendName = "auto",
                overlap: int = EmbedConfig.default("overlap"),
                plot: bool = True, overwrite: bool = False) -> TilingReport:
    """Tile every slide: grid + QC picture per slide, failures recorded, the others go on.

    Args:
        slides: files, directories and/or glob patterns.
        out_dir: output folder (see the module docstring for the layout).
        mpp: target µm/px. tile_size: tile edge, pixels. min_tissue: minimal tissue fraction.
        assume_mpp: µm/px used *only* for slides without MPP metadata (never overrides).
        backend: slide backend (``"auto"`` records the one used per slide).
        overlap: output pixels shared by neighbouring tiles.
        plot: write ``qc.png`` per slide.
        overwrite: redo slides already tiled with the same parameters (default: skip them).

    Returns:
        A :class:`TilingReport` (per-slide rows incl. failures); also written as
        ``tiling_report.csv``.
    """
    if assume_mpp is not None and not (float(assume_mpp) > 0 and np.isfinite(float(assume_mpp))):
        raise ConfigError(f"assume_mpp={assume_mpp!r} must be a positive number of µm/px.")
    paths = expand_slide_paths(slides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = _grid_params(float(mpp), int(tile_size), float(min_tissue), int(overlap),
                          None if assume_mpp is None else float(assume_mpp), backend)
    config = {"slides": [str(p) for p in paths], "out_dir": str(out), **params, "plot": plot}
    atomic_write_bytes(out / "tiling_config.json", json.dumps(config, indent=2).encode())
    rows: list[TilingRow] = []
    bar = progress(paths, total=len(paths), desc="tiling", unit="slide")
    for p in bar:
        done = None if overwrite else _already_done(p, out, params)
        if done is not None:
            rows.append(done)
            continue
        t0 = time.perf_counter()
        try:
            rows.append(_tile_one(p, out, params, plot))
        except Exception as err:  # noqa: BLE001 - one bad slide never stops the batch
            if not isinstance(err, (WsiSslError, OSError, ValueError)):
                logger.exception("%s failed unexpectedly", p)
            logger.warning("%s failed: %s", p, err)

            rows.append(TilingRow(sanitize_id(p.stem), str(p), "failed",
                                  seconds=time.perf_counter() - t0,
                                  error=f"{type(err).__name__}: {err}"))
    report = TilingReport(tuple(rows), out, config)
    atomic_write_bytes(out / "tiling_report.csv", report.to_pandas().to_csv(index=False).encode())
    return report

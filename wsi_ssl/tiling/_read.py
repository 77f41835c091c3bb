"""Fast, memory-bounded tile reading.

:func:`read_tiles` never reads one tile at a time: grid cells are grouped into blocks whose
level region is at most ``region_size`` pixels on a side (full-width bands for files whose
compressed chunks span the whole level, e.g. NDPI strips), a thread pool reads and decodes those
regions (OpenSlide and imagecodecs release the GIL), each region is resized once with
antialiasing at the grid's exact scale when it comes from a finer level (OpenCV when installed,
else PIL), and then cut into tiles. At most ``read_threads + 1`` region reads are queued and one
region is being cut, so memory is bounded by the region size, not by the slide size.

Coordinates are level-0 pixels ``(x, y)``; sizes ``(w, h)``.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from wsi_ssl.errors import ConfigError, SlideOpenError
from wsi_ssl.tiling._slide import open_slide

if TYPE_CHECKING:  # pragma: no cover
    import dask.array

    from wsi_ssl.tiling._grid import TileGrid
    from wsi_ssl.tiling._slide import Slide

__all__ = ["TileBatch", "read_tiles", "tiles_as_dask", "plan_regions"]

#: Longest side (level pixels) of one region read.
REGION_SIZE = 4096


class TileBatch(NamedTuple):
    """One batch of tiles.

    Attributes:
        tiles: ``uint8 (B, tile_size, tile_size, 3)``.
        indices: ``int64 (B,)`` positions in the grid.
    """

    tiles: np.ndarray
    indices: np.ndarray


class _Region(NamedTuple):
    r0: int  # first grid row (cell units) of the region
    c0: int
    rows: int
    cols: int
    tiles: np.ndarray  # int64 (k,) grid indices in this region
    cells: np.ndarray  # int64 (k, 2) row, col of each


def _cells(grid: Any) -> np.ndarray:
    cells = getattr(grid, "cells", None)
    if cells is not None and len(cells) == len(grid):
        return np.asarray(cells, dtype=np.int64)
    stride0 = float(grid.stride_level0)
    return np.round(np.asarray(grid.coords)[:, ::-1] / stride0).astype(np.int64)


def plan_regions(slide: Any, grid: Any, indices: np.ndarray, *,
                 region_size: int = REGION_SIZE) -> list[_Region]:
    """Group the selected grid positions into region reads (block by block, row-major)."""
    if len(indices) == 0:
        return []
    cells = _cells(grid)[indices]
    stride = grid.tile_size - grid.overlap
    f = grid.scale0 / grid.level_downsample  # level px per output px
    per_tile = stride * f  # level px per cell step
    bw = bh = max(1, int((region_size / f - grid.tile_size) // stride) + 1)
    chunk = getattr(slide, "chunk_shape", None)
    chunk = chunk(grid.level) if callable(chunk) else None
    if chunk is not None:
        lw = slide.level_dimensions[grid.level][0]
        cw = chunk[0]
        if cw >= lw / 2:  # strips spanning the level: read full-width bands of bounded area
            bw = int(cells[:, 1].max()) + 1
            bh = max(1, int(region_size * region_size / max(1.0, bw * per_tile) / per_tile))
    brow = cells[:, 0] // bh
    bcol = cells[:, 1] // bw
    order = np.lexsort((cells[:, 1], cells[:, 0], bcol, brow))
    key = brow[order] * (int(bcol.max()) + 1) + bcol[order]
    splits = np.flatnonzero(np.diff(key)) + 1
    regions = []
    for part in np.split(order, splits):
        c = cells[part]
        r0, c0 = int(c[:, 0].min()), int(c[:, 1].min())
        regions.append(_Region(r0, c0, int(c[:, 0].max()) - r0 + 1, int(c[:, 1].max()) - c0 + 1,
                               np.asarray(indices)[part], c))
    return regions


def _tile_boxes(reg: _Region, stride: int, t: int, f: float, ix0: int, iy0: int, w: int, h: int,
                margin: int) -> np.ndarray:
    """Region-relative level-pixel boxes ``(k, 4)`` of the region's tiles (plus a margin)."""
    ox = (reg.cells[:, 1] * stride).astype(np.float64)
    oy = (reg.cells[:, 0] * stride).astype(np.float64)
    b = np.stack([np.floor(ox * f) - ix0 - margin, np.floor(oy * f) - iy0 - margin,
                  np.ceil((ox + t) * f) - ix0 + margin, np.ceil((oy + t) * f) - iy0 + margin], 1)
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, w)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, h)
    return b.astype(np.int64)


def _read(slide: Any, xy: tuple[int, int], level: int, size: tuple[int, int],
          boxes: np.ndarray) -> np.ndarray:
    fn = getattr(slide, "read_level_boxes", None)
    if fn is not None:
        return fn(xy, level, size, boxes)
    return slide.read_level(xy, level, size)


def _cv2() -> Any:
    """OpenCV if installed (the fast resampler), else ``None`` (PIL is used)."""
    try:
        import cv2  # lazy: optional dependency (PIL otherwise)
    except ImportError:
        return None
    return cv2


def _read_region_tiles(slide: Any, grid: Any, reg: _Region,
                       engine: Literal["auto", "cv2", "pil"] = "auto") -> np.ndarray:
    """Read one region at output resolution (resized once if it comes from a finer level).

    ``engine="auto"`` resizes with OpenCV when it is installed, else with PIL (see
    :func:`_resize_cv2`, :func:`_resize_pil`); both keep the exact scale of the grid.

    Shape:
        ``uint8 (oh, ow, 3)`` covering cells ``reg.r0..`` / ``reg.c0..``.
    """
    t = grid.tile_size
    stride = t - grid.overlap
    ox0, oy0 = reg.c0 * stride, reg.r0 * stride
    ow, oh = (reg.cols - 1) * stride + t, (reg.rows - 1) * stride + t
    if grid.needs_resize:
        cv2 = _cv2() if engine != "pil" else None
        if engine == "cv2" and cv2 is None:
            raise ConfigError("engine='cv2' needs OpenCV: pip install opencv-python-headless.")
        f = grid.scale0 / grid.level_downsample
        if cv2 is not None:
            return _resize_cv2(cv2, slide, grid, reg, f, ox0, oy0, ow, oh)
        return _resize_pil(slide, grid, reg, f, ox0, oy0, ow, oh)
    ds = grid.level_downsample
    lx0 = int(math.floor(ox0 * grid.scale0 / ds + 1e-6))
    ly0 = int(math.floor(oy0 * grid.scale0 / ds + 1e-6))
    boxes = _tile_boxes(reg, stride, t, 1.0, lx0, ly0, ow, oh, margin=0)
    return _read(slide, (lx0, ly0), grid.level, (ow, oh), boxes)


def _resize_pil(slide: Any, grid: Any, reg: _Region, f: float, ox0: int, oy0: int, ow: int,
                oh: int) -> np.ndarray:
    """Antialiased PIL resize (triangle filter of support ``f``) of the exact level box."""
    from PIL import Image  # lazy: only the PIL resampler needs it

    stride = grid.tile_size - grid.overlap
    lx0, ly0 = ox0 * f, oy0 * f
    lx1, ly1 = (ox0 + ow) * f, (oy0 + oh) * f
    ix0, iy0 = int(math.floor(lx0)), int(math.floor(ly0))
    ix1, iy1 = int(math.ceil(lx1 - 1e-9)), int(math.ceil(ly1 - 1e-9))
    boxes = _tile_boxes(reg, stride, grid.tile_size, f, ix0, iy0, ix1 - ix0, iy1 - iy0, margin=2)
    region = _read(slide, (ix0, iy0), grid.level, (ix1 - ix0, iy1 - iy0), boxes)
    img = Image.fromarray(region).resize(
        (ow, oh), Image.Resampling.BILINEAR, box=(lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0))
    return np.asarray(img)


def _resize_cv2(cv2: Any, slide: Any, grid: Any, reg: _Region, f: float, ox0: int, oy0: int,
                ow: int, oh: int) -> np.ndarray:
    """OpenCV resample at the exact scale ``1 / f``, 3-6x cheaper than PIL's antialiased resize.

    A downsample by ``f >= 1.5`` first averages ``k x k`` blocks (``k = round(f)``, exact
    ``INTER_AREA``, the antialiasing) on a block grid anchored at level pixel 0, so the blocks
    are the same whichever region a tile is read in. The remaining factor ``s = f / k``
    (0.67-1.5) is resampled bilinearly by ``cv2.warpAffine`` with the exact affine map from
    global output pixels to block pixels (output pixel centre ``o + 0.5`` lies at level
    coordinate ``(o + 0.5) * f``), so a tile's pixels depend on its own position only, never on
    the batch or region it is read with (up to OpenCV's 1/32-pixel interpolation weights), and
    the output keeps the grid's µm/px to float precision.
    """
    stride = grid.tile_size - grid.overlap
    k = max(1, int(round(f)))
    s = f / k
    # block range covering the region's samples, with one block of margin for the bilinear taps
    bx0 = max(0, int(math.floor(ox0 * f / k)) - 1)
    by0 = max(0, int(math.floor(oy0 * f / k)) - 1)
    bw = int(math.ceil((ox0 + ow) * f / k)) + 2 - bx0
    bh = int(math.ceil((oy0 + oh) * f / k)) + 2 - by0
    ix0, iy0 = bx0 * k, by0 * k
    boxes = _tile_boxes(reg, stride, grid.tile_size, f, ix0, iy0, bw * k, bh * k, margin=2 * k + 1)
    region = _read(slide, (ix0, iy0), grid.level, (bw * k, bh * k), boxes)
    if k > 1:
        region = cv2.resize(region, (bw, bh), interpolation=cv2.INTER_AREA)
    # block-pixel coordinate (centres at integers) of output pixel i of this region
    m = np.array([[s, 0.0, s * (ox0 + 0.5) - 0.5 - bx0],
                  [0.0, s, s * (oy0 + 0.5) - 0.5 - by0]])
    return cv2.warpAffine(region, m, (ow, oh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _check(slide: Any, grid: Any, batch_size: int, read_threads: int | None) -> int:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1.")
    if read_threads is None:
        read_threads = min(8, os.cpu_count() or 1)
    if not isinstance(read_threads, (int, np.integer)) or read_threads < 1:
        raise ConfigError(f"read_threads={read_threads!r} must be an integer >= 1 (or None).")
    if grid.level >= slide.level_count:
        raise ConfigError(f"the grid reads level {grid.level} but '{slide.slide_id}' has "
                          f"{slide.level_count} levels; build the grid from this slide.")
    return int(read_threads)


def read_tiles(slide: Slide, grid: TileGrid, *, batch_size: int = 64, read_threads: int | None = None,
               indices: Any = None, region_size: int = REGION_SIZE) -> Iterator[TileBatch]:
    """Read the grid's tiles in batches, fast and with bounded memory.

    Args:
        slide: the open :class:`Slide` the grid was built from.
        grid: a :class:`TileGrid`.
        batch_size: tiles per batch (the last batch may be smaller).
        read_threads: reader threads (default ``min(8, cpu_count)``).
        indices: only these grid positions (any order; each read once).
        region_size: longest side in level pixels of one region read (memory per worker is about
            ``3 * region_size**2`` bytes).

    Yields:
        :class:`TileBatch` ``(tiles uint8 (B, T, T, 3), indices int64 (B,))``. Tiles come block by
        block (not necessarily in grid order); every requested index appears exactly once.
    """
    threads = _check(slide, grid, batch_size, read_threads)
    if indices is None:
        sel = np.arange(len(grid), dtype=np.int64)
    else:
        sel = np.unique(np.asarray(indices, dtype=np.int64).ravel())
        if len(sel) and (sel[0] < 0 or sel[-1] >= len(grid)):
            raise ConfigError(f"indices= must lie in [0, {len(grid)}); got {int(sel[0])}..{int(sel[-1])}.")
    # small jobs: shrink regions so that every worker gets at least one
    level_px = (grid.tile_size - grid.overlap) * grid.scale0 / grid.level_downsample
    area = len(sel) * level_px * level_px
    fair = int(math.sqrt(area / threads)) if len(sel) else region_size
    region_size = max(min(int(region_size), fair), int(2 * grid.tile_size * grid.scale0 / grid.level_downsample))
    regions = plan_regions(slide, grid, sel, region_size=region_size)
    return _iterate(slide, grid, regions, int(batch_size), threads)


def _iterate(slide: Any, grid: Any, regions: list[_Region], batch_size: int,
             threads: int) -> Iterator[TileBatch]:
    t = grid.tile_size
    stride = t - grid.overlap
    if not regions:
        return
    buf = np.empty((batch_size, t, t, 3), np.uint8)
    ibuf = np.empty(batch_size, np.int64)
    fill = 0
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsi-ssl-read")
    pending: deque[tuple[_Region, Future]] = deque()
    it = iter(regions)
    try:
        for reg in it:
            pending.append((reg, pool.submit(_read_region_tiles, slide, grid, reg)))
            if len(pending) >= threads + 1:
                break
        while pending:
            reg, fut = pending.popleft()
            try:
                region = fut.result()
            except Exception as err:  # noqa: BLE001 - backend errors become SlideOpenError
                raise SlideOpenError(
                    f"reading '{getattr(slide, 'path', None) or slide.slide_id}' failed at level "
                    f"{grid.level}, grid rows {reg.r0}-{reg.r0 + reg.rows - 1}: "
                    f"{type(err).__name__}: {err}. The file may be truncated or corrupt."
                ) from err
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_read_region_tiles, slide, grid, nxt)))
            for k, (r, c) in enumerate(reg.cells):  # cut straight into the batch (one copy)
                y, x = (int(r) - reg.r0) * stride, (int(c) - reg.c0) * stride
                buf[fill] = region[y: y + t, x: x + t]
                ibuf[fill] = reg.tiles[k]
                fill += 1
                if fill == batch_size:
                    yield TileBatch(buf, ibuf)
                    buf = np.empty((batch_size, t, t, 3), np.uint8)  # fresh: the consumer keeps its batch
                    ibuf = np.empty(batch_size, np.int64)
                    fill = 0
            del region
        if fill:
            yield TileBatch(buf[:fill], ibuf[:fill])
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


# -- dask -------------------------------------------------------------------------------------
_OPEN_CACHE: dict[tuple[str, str, float | None], Any] = {}
_OPEN_LOCK = threading.Lock()


class _SlideRef:
    """A picklable handle that reopens the slide once per process (for distributed workers)."""

    def __init__(self, slide: Any) -> None:
        self.path = str(slide.path) if getattr(slide, "path", None) is not None else None
        self.backend = slide.backend
        self.slide_mpp = slide.slide_mpp if getattr(slide, "mpp_assumed", False) else None
        self._slide = slide if self.path is None else None

    def get(self) -> Any:
        if self._slide is not None:
            return self._slide
        key = (self.path, self.backend, self.slide_mpp)
        with _OPEN_LOCK:
            if key not in _OPEN_CACHE:
                _OPEN_CACHE[key] = open_slide(self.path, backend=self.backend,
                                              slide_mpp=self.slide_mpp)
            return _OPEN_CACHE[key]

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "backend": self.backend, "slide_mpp": self.slide_mpp,
                "_slide": self._slide if self.path is None else None}


def _read_block(ref: _SlideRef, grid: Any, start: int, stop: int) -> np.ndarray:
    slide = ref.get()
    out = np.empty((stop - start, grid.tile_size, grid.tile_size, 3), np.uint8)
    for batch in read_tiles(slide, grid, batch_size=max(1, stop - start), read_threads=1,
                            indices=np.arange(start, stop)):
        out[batch.indices - start] = batch.tiles
    return out


def tiles_as_dask(slide: Slide, grid: TileGrid, *, chunk_size: int = 256) -> dask.array.Array:
    """The grid's tiles as a lazy dask array (for notebooks); nothing is read until computed.

    Args:
        slide: the open :class:`Slide` the grid was built from.
        grid: a :class:`TileGrid`.
        chunk_size: tiles per dask chunk (one region-batched read per chunk).

    Shape:
        ``uint8 (N, tile_size, tile_size, 3)`` in grid order, chunked along N.
    """
    import dask  # lazy: import wsi_ssl.tiling stays numpy-only
    import dask.array as da  # lazy: as above

    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size!r} must be an integer >= 1.")
    t = grid.tile_size
    ref = _SlideRef(slide)
    parts = []
    for start in range(0, len(grid), chunk_size):
        stop = min(len(grid), start + chunk_size)
        d = dask.delayed(_read_block, pure=False)(ref, grid, start, stop)
        parts.append(da.from_delayed(d, shape=(stop - start, t, t, 3), dtype=np.uint8))
    if not parts:
        return da.zeros((0, t, t, 3), dtype=np.uint8)
    return da.concatenate(parts, axis=0)

"""Write pyramidal, tiled, JPEG-compressed TIFF slides that OpenSlide, tiffslide and tifffile open.

The file is laid out like an Aperio SVS (an ``ImageDescription`` starting with ``Aperio`` and
``MPP = ...``) so that OpenSlide reports ``openslide.mpp-x``; resolution tags (pixels per
centimetre) carry the same MPP for readers that use them.

Coordinates are level-0 pixels ``(x, y)``; sizes are ``(w, h)``; MPP in µm/px.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl._utils import atomic_path
from wsi_ssl.errors import ConfigError

__all__ = ["write_pyramidal_tiff", "Renderer"]

#: ``render(x, y, w, h, downsample) -> uint8 (h, w, 3)``: the region whose top-left is level-0
#: ``(x, y)``, ``w x h`` pixels at ``downsample`` (level-0 pixels per output pixel).
Renderer = Callable[[int, int, int, int, float], np.ndarray]


def _array_renderer(image: np.ndarray) -> Renderer:
    from PIL import Image  # lazy: Pillow only when images are read or written

    def render(x: int, y: int, w: int, h: int, ds: float) -> np.ndarray:
        x1 = min(int(round(x + w * ds)), image.shape[1])
        y1 = min(int(round(y + h * ds)), image.shape[0])
        crop = image[y:y1, x:x1]
        out = np.full((h, w, 3), 255, np.uint8)
        if crop.size == 0:
            return out
        if ds != 1:
            tw = max(1, min(w, int(round(crop.shape[1] / ds))))
            th = max(1, min(h, int(round(crop.shape[0] / ds))))
            crop = np.asarray(Image.fromarray(crop).resize((tw, th), Image.BOX))
        out[: crop.shape[0], : crop.shape[1]] = crop[:h, :w]
        return out

    return render


def write_pyramidal_tiff(
    path: str | os.PathLike,
    source: np.ndarray | Renderer,
    *,
    size: tuple[int, int] | None = None,
    mpp: float | None = 0.5,
    tile_size: int = 256,
    n_levels: int | None = None,
    downsample: int = 4,
    quality: int = 90,
    magnification: float | None = None,
) -> Path:
    """Write a pyramidal tiled JPEG TIFF (SVS layout) and return its path.

    Args:
        path: output file (``.svs`` or ``.tif``; both open in OpenSlide as Aperio).
        source: an RGB uint8 array ``(H, W, 3)``, or a :data:`Renderer` with ``size=(W, H)``; a
            renderer lets you write slides far larger than memory (tiles are rendered on demand).
        size: level-0 ``(w, h)`` in pixels; required with a renderer.
        mpp: microns per pixel at level 0; ``None`` writes a slide *without* MPP metadata.
        tile_size: TIFF tile edge in pixels (multiple of 16).
        n_levels: number of pyramid levels; default: until the level is under 1024 px.
        downsample: factor between consecutive levels.
        quality: JPEG quality.
        magnification: ``AppMag`` to record; default ``10 / mpp``.
    """
    import tifffile  # the writer only; readers never import it from here  # lazy: tifffile only when a TIFF is written

    path = Path(path)
    if tile_size % 16:
        raise ConfigError(f"tile_size={tile_size} must be a multiple of 16 (a TIFF requirement).")
    render, (w0, h0) = _renderer_and_size(source, size)
    dims = _level_dims(w0, h0, n_levels, downsample)
    mag = magnification if magnification is not None else (10.0 / mpp if mpp else 20.0)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=w0 * h0 * 3 > 2**31) as tif:
        for lv, (lw, lh, ds) in enumerate(dims):
            desc = (
                f"Aperio Image Library v12.0.0 wsi-ssl\r\n{w0}x{h0} [0,0 {w0}x{h0}] "
                f"({tile_size}x{tile_size}) JPEG/RGB Q={quality}|AppMag = {mag:g}"
            )
            kw = {}
            if mpp is not None:
                desc += f"|MPP = {mpp * ds:.6f}"
                ppcm = 1e4 / (mpp * ds)
                kw = {"resolution": (ppcm, ppcm), "resolutionunit": "CENTIMETER"}
            tif.write(
                _level_tiles(render, lw, lh, ds, tile_size),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile_size, tile_size),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                description=desc if lv == 0 else desc.split("\r\n")[0],
                subfiletype=0,  # Aperio: pyramid levels are not "reduced" pages
                metadata=None,
                **kw,
            )
            if lv == 0:
                _write_thumbnail(tif, render, w0, h0, quality, desc.split("\r\n")[0])
    return path


def _renderer_and_size(source: np.ndarray | Renderer,
                       size: tuple[int, int] | None) -> tuple[Renderer, tuple[int, int]]:
    """A renderer for ``source`` and the level-0 ``(w, h)`` it covers."""
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise ConfigError(f"source must be uint8 (H, W, 3); got {source.dtype} {source.shape}.")
        return _array_renderer(source), (source.shape[1], source.shape[0])
    if size is None:
        raise ConfigError("size=(w, h) is required when source is a renderer.")
    return source, (int(size[0]), int(size[1]))


def _level_dims(w0: int, h0: int, n_levels: int | None,
                downsample: int) -> list[tuple[int, int, int]]:
    """``(w, h, downsample)`` of each pyramid level; by default until a level is under 1024 px."""
    if n_levels is None:
        n_levels = 1
        while max(w0, h0) / downsample ** n_levels >= 1024:
            n_levels += 1
    dims = []
    for lv in range(n_levels):
        ds = downsample**lv
        dims.append((max(1, int(np.ceil(w0 / ds))), max(1, int(np.ceil(h0 / ds))), ds))
    return dims


def _level_tiles(render: Renderer, lw: int, lh: int, ds: int,
                 tile_size: int) -> Iterator[np.ndarray]:
    """The tiles of one level in TIFF order, edge tiles padded with white."""
    for ty in range(0, lh, tile_size):
        for tx in range(0, lw, tile_size):
            tw, th = min(tile_size, lw - tx), min(tile_size, lh - ty)
            t = np.asarray(render(tx * ds, ty * ds, tw, th, float(ds)), dtype=np.uint8)
            if t.shape != (th, tw, 3):
                raise ConfigError(f"renderer returned {t.shape}, expected {(th, tw, 3)}.")
            if (tw, th) != (tile_size, tile_size):
                pad = np.full((tile_size, tile_size, 3), 255, np.uint8)
                pad[:th, :tw] = t
                t = pad
            yield t


def _write_thumbnail(tif: Any, render: Renderer, w0: int, h0: int, quality: int,
                     desc: str) -> None:
    """Aperio layout: page 1 is a small stripped thumbnail (tiffslide and OpenSlide both expect
    it; without it tiffslide would take level 1 for the thumbnail)."""
    tw = max(1, min(w0, 768))
    th = max(1, int(round(h0 * tw / w0)))
    thumb = np.asarray(render(0, 0, tw, th, w0 / tw), dtype=np.uint8)
    tif.write(thumb, photometric="rgb", compression="jpeg", compressionargs={"level": quality},
              rowsperstrip=16, description=desc, subfiletype=0, metadata=None)

"""Slide backends behind :class:`~wsi_ssl.tiling._slide_base._BaseSlide` (see ``_slide`` for the
protocol and :func:`open_slide`). Level-0 ``(x, y)``, sizes ``(w, h)``, µm/px.

- ``_TiffSlideSlide``: tiffslide metadata; pixels decoded straight from the TIFF tile index with
  tifffile + imagecodecs (GIL released, so reader threads scale), tiffslide's reader otherwise.
- ``_OpenSlideSlide``: OpenSlide (RGBA composited on white).
- ``_TiatoolboxSlide``: the optional tiatoolbox ``WSIReader`` (files and numpy arrays).
- ``_NumpySlide``: an in-memory ``uint8 (H, W, 3)`` array, one level.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl._utils import sanitize_id
from wsi_ssl.tiling._slide_base import _BaseSlide, _to_rgb

__all__: list[str] = []

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
class _OpenSlideSlide(_BaseSlide):
    backend = "openslide"

    def __init__(self, path: Path, mpp: float | None) -> None:
        import openslide  # lazy: the OpenSlide library loads only when a slide is opened

        self._osr = openslide.OpenSlide(str(path))
        props = self._osr.properties
        native = None
        try:
            mx = props.get(openslide.PROPERTY_NAME_MPP_X)
            my = props.get(openslide.PROPERTY_NAME_MPP_Y)
            vals = [float(v) for v in (mx, my) if v not in (None, "")]
            native = float(np.mean(vals)) if vals else None
        except ValueError:
            native = None
        super().__init__(path, sanitize_id(path.stem), mpp, native)
        self.dimensions = tuple(int(v) for v in self._osr.dimensions)
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        img = self._osr.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
        return _to_rgb(np.asarray(img))

    def close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None


# ---------------------------------------------------------------------------------------------
class _TiffSlideSlide(_BaseSlide):
    backend = "tiffslide"

    def __init__(self, path: Path, mpp: float | None) -> None:
        import tiffslide  # lazy: tiffslide only when that backend opens a slide

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "hamamatsu-format metadata parsing only partially..."
            self._ts = tiffslide.TiffSlide(str(path))
            props = dict(self._ts.properties)
        native = None
        vals = [props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y")]
        vals = [float(v) for v in vals if v not in (None, "")]
        if vals:
            native = float(np.mean(vals))
        super().__init__(path, sanitize_id(path.stem), mpp, native)
        self.dimensions = tuple(int(v) for v in self._ts.dimensions)
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._ts.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._ts.level_downsamples)
        self._lock = threading.Lock()
        self._pages: list[Any] = []
        try:
            tf = self._ts.ts_tifffile
            series = tf.series[int(props.get("tiffslide.series-index", 0) or 0)]
            for lv in range(self.level_count):
                lvl = series.levels[lv]
                page = lvl.pages[0] if len(lvl.pages) == 1 else None
                ok = (page is not None and hasattr(page, "decode") and page.dtype == np.uint8
                      and page.planarconfig == 1 and len(page.dataoffsets) > 0
                      and (page.imagewidth, page.imagelength) == self.level_dimensions[lv]
                      and page.samplesperpixel in (1, 3, 4))
                self._pages.append(page if ok else None)
            self._fh = tf.filehandle
        except Exception as err:  # noqa: BLE001 - fast path unavailable, tiffslide still reads
            logger.debug("tile-index reads unavailable for %s: %s", path, err)
            self._pages = [None] * self.level_count

    def read_level_boxes(self, xy_level: tuple[int, int], level: int, size: tuple[int, int],
                         boxes: np.ndarray) -> np.ndarray:
        page = self._pages[level] if level < len(self._pages) else None
        x, y = int(xy_level[0]), int(xy_level[1])
        w, h = int(size[0]), int(size[1])
        lw, lh = self.level_dimensions[level]
        if page is None or x < 0 or y < 0 or x + w > lw or y + h > lh:
            return self.read_level(xy_level, level, size)
        ch, cw = int(page.chunks[-3]), int(page.chunks[-2])
        nx = int(page.chunked[-2])
        b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4) + np.array([x, y, x, y])
        need: set[int] = set()
        for bx0, by0, bx1, by1 in b:
            for ty in range(int(by0) // ch, (int(by1) - 1) // ch + 1):
                for tx in range(int(bx0) // cw, (int(bx1) - 1) // cw + 1):
                    need.add(ty * nx + tx)
        return self._read_chunks(page, x, y, w, h, need)

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        page = self._pages[level] if level < len(self._pages) else None
        if page is None:
            ds = self.level_downsamples[level]
            arr = self._ts.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h),
                                       as_array=True)
            return _to_rgb(arr)
        return self._read_chunks(page, x, y, w, h)

    def chunk_shape(self, level: int) -> tuple[int, int] | None:
        """``(w, h)`` of the compressed chunks (tiles/strips) of ``level``, or ``None``."""
        page = self._pages[level] if level < len(self._pages) else None
        return None if page is None else (int(page.chunks[-2]), int(page.chunks[-3]))

    def _read_chunks(self, page: Any, x: int, y: int, w: int, h: int,
                     need: set[int] | None = None) -> np.ndarray:
        """Decode exactly the TIFF tiles/strips the box covers (or only ``need``) and paste them."""
        ch, cw = int(page.chunks[-3]), int(page.chunks[-2])
        ny, nx = int(page.chunked[-3]), int(page.chunked[-2])
        ty0, ty1 = y // ch, min(ny - 1, (y + h - 1) // ch)
        tx0, tx1 = x // cw, min(nx - 1, (x + w - 1) // cw)
        idx = [ty * nx + tx for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]
        spp = int(page.samplesperpixel)
        out = np.empty((h, w, spp), np.uint8)
        if need is not None:
            # skipped chunks are white: fill only their part of the box (filling the whole box
            # first cost ~15 % of a native-resolution read)
            for i in idx:
                if i not in need:
                    ty, tx = divmod(i, nx)
                    ax0, ay0 = max(x, tx * cw), max(y, ty * ch)
                    out[ay0 - y: min(y + h, ty * ch + ch) - y,
                        ax0 - x: min(x + w, tx * cw + cw) - x] = 255
            idx = [i for i in idx if i in need]
        offsets = [page.dataoffsets[i] for i in idx]
        counts = [page.databytecounts[i] for i in idx]
        jpegheader = getattr(page, "jpegheader", None)
        for data, i in self._fh.read_segments(offsets, counts, indices=idx, lock=self._lock,
                                               sort=True):
            if data is None or len(data) == 0:  # sparse tile: white
                seg = np.full((ch, cw, spp), 255, np.uint8)
            else:
                seg = page.decode(data, i, jpegtables=page.jpegtables, jpegheader=jpegheader)[0]
                seg = seg.reshape(seg.shape[-3], seg.shape[-2], -1)
            ty, tx = divmod(i, nx)
            sx, sy = tx * cw, ty * ch
            ax0, ay0 = max(x, sx), max(y, sy)
            ax1, ay1 = min(x + w, sx + seg.shape[1]), min(y + h, sy + seg.shape[0])
            if ax1 > ax0 and ay1 > ay0:
                out[ay0 - y: ay1 - y, ax0 - x: ax1 - x] = seg[ay0 - sy: ay1 - sy, ax0 - sx: ax1 - sx]
        return _to_rgb(out)

    def close(self) -> None:
        ts = getattr(self, "_ts", None)
        if ts is not None:
            ts.close()
            self._ts = None


# ---------------------------------------------------------------------------------------------
class _TiatoolboxSlide(_BaseSlide):
    backend = "tiatoolbox"

    def __init__(self, source: Path | np.ndarray, mpp: float | None, slide_id: str) -> None:
        from tiatoolbox.wsicore.wsireader import WSIReader  # lazy: optional extra `tiatoolbox`

        kw: dict[str, Any] = {}
        if mpp is not None:
            kw["mpp"] = (mpp, mpp)
        arg = source if isinstance(source, np.ndarray) else str(source)
        self._reader = WSIReader.open(arg, **kw)
        info = self._reader.info
        native = None
        if info.mpp is not None and not isinstance(source, np.ndarray):
            native = float(np.mean(np.asarray(info.mpp, dtype=float)))
        super().__init__(source if isinstance(source, Path) else None, slide_id, mpp, native)
        self.dimensions = tuple(int(v) for v in info.slide_dimensions)
        self.level_dimensions = tuple((int(w), int(h)) for w, h in info.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in info.level_downsamples)

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        arr = self._reader.read_rect((int(round(x * ds)), int(round(y * ds))), (w, h),
                                     resolution=level, units="level", pad_mode="constant",
                                     pad_constant_values=255)
        arr = _to_rgb(arr)
        if arr.shape[:2] != (h, w):
            from PIL import Image  # lazy: Pillow only when images are read or written

            arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR))
        return arr

    def close(self) -> None:
        self._reader = None


# ---------------------------------------------------------------------------------------------
class _NumpySlide(_BaseSlide):
    backend = "numpy"

    def __init__(self, image: np.ndarray, mpp: float | None, slide_id: str) -> None:
        super().__init__(None, slide_id, mpp, None)
        self._image = image
        self.dimensions = (int(image.shape[1]), int(image.shape[0]))
        self.level_dimensions = (self.dimensions,)
        self.level_downsamples = (1.0,)

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        return np.ascontiguousarray(self._image[y: y + h, x: x + w])

    def close(self) -> None:
        pass

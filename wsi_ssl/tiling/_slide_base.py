"""The slide protocol and the base class every backend builds on (see ``_slide`` for
:func:`open_slide` and ``_backends`` for the readers). Level-0 ``(x, y)``, ``(w, h)``, µm/px."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from wsi_ssl.errors import ConfigError, MissingMPPError

__all__ = ["Slide"]


@runtime_checkable
class Slide(Protocol):
    """What every backend provides (OpenSlide-shaped). Level-0 ``(x, y)``, ``(w, h)``, µm/px."""

    path: Path | None
    slide_id: str
    backend: str
    dimensions: tuple[int, int]
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]

    if TYPE_CHECKING:  # typed, but not probed by isinstance (slide_mpp may raise MissingMPPError)
        @property
        def slide_mpp(self) -> float: ...

        @property
        def mpp_assumed(self) -> bool: ...

    def read_region(self, xy_level0: tuple[int, int], level: int,
                    size: tuple[int, int]) -> np.ndarray: ...

    def thumbnail(self, max_size: int = 1024) -> np.ndarray: ...

    def close(self) -> None: ...

    def __enter__(self) -> Slide: ...

    def __exit__(self, *exc: object) -> None: ...


class _BaseSlide:
    """Shared logic: MPP handling, bounds/white padding, thumbnails, context manager.

    Subclasses set the level metadata and implement ``_read_level(x, y, w, h, level)`` in
    *level* coordinates, returning ``uint8 (h, w, 3)`` for an in-bounds box.
    """

    backend: str = "?"

    def __init__(self, path: Path | None, slide_id: str, mpp_override: float | None,
                 native_mpp: float | None) -> None:
        self.path = path
        self.slide_id = slide_id
        self._mpp_override = mpp_override
        self._native_mpp = native_mpp if native_mpp and math.isfinite(native_mpp) and native_mpp > 0 else None
        self.dimensions: tuple[int, int] = (0, 0)
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.level_downsamples: tuple[float, ...] = ()

    # -- metadata ------------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def slide_mpp(self) -> float:
        """The slide's own µm/px at level 0 (``slide_mpp=`` of ``open_slide`` first, then the
        file's metadata); the target resolution of tiles is ``mpp`` of ``tile_grid``.

        Raises:
            MissingMPPError: neither the metadata nor ``slide_mpp=`` gives it.
        """
        if self._mpp_override is not None:
            return self._mpp_override
        if self._native_mpp is None:
            name = self.path.name if self.path is not None else self.slide_id
            raise MissingMPPError(
                f"'{name}' has no microns-per-pixel in its metadata; pass slide_mpp= to open_slide "
                "(or --assume-mpp on the command line) if you know it."
            )
        return self._native_mpp

    @property
    def mpp_assumed(self) -> bool:
        """True when the slide's MPP was given by ``slide_mpp=`` rather than read from the file."""
        return self._mpp_override is not None

    @property
    def native_mpp(self) -> float | None:
        """The MPP stored in the file, or ``None``."""
        return self._native_mpp

    # -- pixels --------------------------------------------------------------------------------
    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        raise NotImplementedError

    def read_level(self, xy_level: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Like :meth:`read_region` but ``xy_level`` is in *level* pixels (used by the tile reader)."""
        x, y = int(xy_level[0]), int(xy_level[1])
        w, h = int(size[0]), int(size[1])
        if not 0 <= level < self.level_count:
            raise ConfigError(
                f"level={level} is out of range for '{self.slide_id}' ({self.level_count} levels)."
            )
        if w <= 0 or h <= 0:
            raise ConfigError(f"size={size!r} must be positive (w, h) in pixels.")
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x0 == x and y0 == y and x1 == x + w and y1 == y + h:
            return self._read_level(x, y, w, h, level)
        out = np.full((h, w, 3), 255, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y: y1 - y, x0 - x: x1 - x] = self._read_level(x0, y0, x1 - x0, y1 - y0, level)
        return out

    def read_level_boxes(self, xy_level: tuple[int, int], level: int, size: tuple[int, int],
                         boxes: np.ndarray) -> np.ndarray:
        """Read a region of which only ``boxes`` (``(k, 4)`` level px ``x0, y0, x1, y1``, region
        relative) are needed; backends may leave the rest undecoded (white)."""
        return self.read_level(xy_level, level, size)

    def read_region(self, xy_level0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size=(w, h)`` pixels of ``level`` whose top-left is level-0 ``xy_level0``.

        Shape:
            ``uint8 (h, w, 3)`` RGB; pixels outside the slide are white.
        """
        if not 0 <= int(level) < self.level_count:
            raise ConfigError(
                f"level={level} is out of range for '{self.slide_id}' ({self.level_count} levels)."
            )
        ds = self.level_downsamples[int(level)]
        x = int(math.floor(xy_level0[0] / ds + 1e-9))
        y = int(math.floor(xy_level0[1] / ds + 1e-9))
        return self.read_level((x, y), int(level), size)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide, its longer side ``max_size`` pixels (never upscaled), antialiased.

        Reads the coarsest level that is still at least ``max_size`` on its longer side, in bands,
        so memory stays bounded even for single-level slides.

        Shape:
            ``uint8 (h, w, 3)``.
        """
        from PIL import Image  # lazy: Pillow only when images are read or written

        if max_size < 1:
            raise ConfigError(f"max_size={max_size} must be >= 1 pixel.")
        w0, h0 = self.dimensions
        scale = min(1.0, max_size / max(w0, h0))
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        level = 0
        for lv in range(self.level_count):
            lw, lh = self.level_dimensions[lv]
            if lw >= tw and lh >= th:
                level = lv
        lw, lh = self.level_dimensions[level]
        out = np.empty((th, tw, 3), np.uint8)
        band = max(1, int(2**22 // max(lw, 1)))  # ~12 MB of level pixels per band
        fy = lh / th
        oy = 0
        while oy < th:
            oy1 = min(th, oy + max(1, int(band / fy)))
            sy0, sy1 = oy * fy, oy1 * fy
            iy0, iy1 = int(math.floor(sy0)), min(lh, int(math.ceil(sy1)))
            region = self.read_level((0, iy0), level, (lw, iy1 - iy0))
            img = Image.fromarray(region).resize(
                (tw, oy1 - oy), Image.Resampling.BOX if (lw > 2 * tw) else Image.Resampling.BILINEAR,
                box=(0.0, sy0 - iy0, float(lw), sy1 - iy0))
            out[oy:oy1] = np.asarray(img)
            oy = oy1
        return out

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def __enter__(self) -> _BaseSlide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def __repr__(self) -> str:
        mpp = self._mpp_override if self._mpp_override is not None else self._native_mpp
        return (f"<{type(self).__name__} {self.slide_id!r} backend={self.backend} "
                f"dimensions={self.dimensions} levels={self.level_count} slide_mpp={mpp}>")


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """Any decoded array -> ``uint8 (h, w, 3)`` (grey expanded, alpha composited on white).

    Wider integer types (16-bit slides) are scaled by their dtype's range (``uint16``: x 255 /
    65535), one fixed scale for every region of every slide: scaling each region by its own
    maximum gave tiles of one slide different intensity scales. (Data using fewer bits than its
    container, e.g. 12-bit in ``uint16``, comes out darker but on one scale.)
    """
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer):
            top = float(np.iinfo(a.dtype).max)
            a = np.rint(np.clip(a, 0, None).astype(np.float32) * (255.0 / top)).astype(np.uint8)
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        if a[..., 3].min(initial=255) == 255:  # opaque (the usual case): no compositing
            return np.ascontiguousarray(a[..., :3])
        alpha = a[..., 3:4].astype(np.uint16)
        rgb = (a[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha)) // 255
        return rgb.astype(np.uint8)
    return np.ascontiguousarray(a[..., :3])

"""Open whole-slide images behind one small OpenSlide-shaped protocol.

Coordinates are level-0 pixels ``(x, y)`` (top-left), sizes ``(w, h)``, resolutions µm/px (MPP).
Pixels come back as ``uint8 (h, w, 3)`` RGB; anything outside the slide reads as white glass.

Backends (``backend=``):

- ``"tiffslide"``: TIFF-family files (svs, generic tiled/strip TIFF, ndpi). Metadata comes from
  tiffslide; regions are decoded straight from the TIFF tile index with tifffile + imagecodecs
  (the codecs release the GIL, so threads scale), falling back to tiffslide's own reader where a
  level is not a plain chunked RGB/grey page.
- ``"openslide"``: everything OpenSlide reads (svs, ndpi, mrxs, scn, bif, tiled TIFF, DICOM).
- ``"tiatoolbox"``: optional extra (``pip install "wsi-ssl[tiatoolbox]"``): OME-TIFF, JP2, plain
  TIFF, DICOM and in-memory numpy arrays as virtual slides.
- ``"numpy"``: in-memory ``uint8 (H, W, 3)`` arrays without any extra (one level).

``"auto"`` tries ``tiffslide`` (TIFF-family extensions only), then ``openslide``, then
``tiatoolbox`` if installed; the first that opens the file *and* decodes a probe region wins and is
recorded as ``slide.backend``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np

from wsi_ssl._utils import sanitize_id
from wsi_ssl.errors import BackendUnavailableError, ConfigError, MissingMPPError, SlideOpenError

__all__ = ["Slide", "open_slide", "BackendName", "BACKENDS"]

logger = logging.getLogger(__name__)

BackendName = Literal["auto", "tiffslide", "openslide", "tiatoolbox", "numpy"]
#: Backends tried by ``backend="auto"`` for files, fastest first.
AUTO_ORDER: tuple[str, ...] = ("tiffslide", "openslide", "tiatoolbox")
BACKENDS: tuple[str, ...] = ("auto", "tiffslide", "openslide", "tiatoolbox", "numpy")
_TIFF_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".qptiff", ".svslide")


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

    if TYPE_CHECKING:  # typed, but not probed by isinstance (mpp may raise MissingMPPError)
        @property
        def mpp(self) -> float: ...

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
    def mpp(self) -> float:
        """µm/px at level 0 (``mpp=`` override first, then the file's metadata).

        Raises:
            MissingMPPError: neither the metadata nor ``mpp=`` gives it.
        """
        if self._mpp_override is not None:
            return self._mpp_override
        if self._native_mpp is None:
            name = self.path.name if self.path is not None else self.slide_id
            raise MissingMPPError(
                f"'{name}' has no microns-per-pixel in its metadata; pass mpp= to open_slide "
                "(or --assume-mpp on the command line) if you know it."
            )
        return self._native_mpp

    @property
    def mpp_assumed(self) -> bool:
        """True when the MPP was given by ``mpp=`` rather than read from the file."""
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
        from PIL import Image

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
                f"dimensions={self.dimensions} levels={self.level_count} mpp={mpp}>")


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


# ---------------------------------------------------------------------------------------------
def _probe(slide: _BaseSlide) -> None:
    """Decode a little of the coarsest level and of level 0: catches files whose header opens
    but whose pixels do not (unknown compression, corrupt JPEG)."""
    last = slide.level_count - 1
    lw, lh = slide.level_dimensions[last]
    slide.read_level((0, 0), last, (min(lw, 64), min(lh, 64)))
    w0, h0 = slide.dimensions
    slide.read_level((w0 // 2, h0 // 2), 0, (min(w0 - w0 // 2, 16), min(h0 - h0 // 2, 16)))


def _reason(err: BaseException) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {msg}"[:160]


def open_slide(path: str | os.PathLike | np.ndarray, *, backend: BackendName = "auto",
               mpp: float | None = None) -> Slide:
    """Open a whole-slide image (or wrap an in-memory RGB array) as a :class:`Slide`.

    Args:
        path: a slide file, or a ``uint8 (H, W, 3)`` numpy array (a one-level virtual slide).
        backend: ``"auto"`` (fastest that opens the file: tiffslide for TIFF-family files, then
            openslide, then tiatoolbox if installed), or one of ``"tiffslide"``, ``"openslide"``,
            ``"tiatoolbox"``, ``"numpy"`` (arrays only). The one used is ``slide.backend``.
        mpp: µm/px at level 0; overrides the metadata (``slide.mpp_assumed`` becomes True).
            Needed for slides without MPP before :func:`tile_grid`.

    Raises:
        SlideOpenError: the file is missing or no backend could open *and* decode it; the message
            names the path and each backend tried with its reason.
        BackendUnavailableError: an explicitly requested optional backend is not installed.
        ConfigError: a bad ``backend`` or ``mpp`` value.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is unknown; use one of {', '.join(BACKENDS)}.")
    if mpp is not None:
        try:
            mpp = float(mpp)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"mpp={mpp!r} must be a positive number of µm/px.") from err
        if not (math.isfinite(mpp) and mpp > 0):
            raise ConfigError(f"mpp={mpp!r} must be a positive, finite number of µm/px (e.g. 0.25).")

    if isinstance(path, np.ndarray):
        return _open_array(path, backend, mpp)

    p = Path(path).expanduser()
    if not p.exists():
        raise SlideOpenError(f"'{p}' does not exist; check the path (slides are files such as .svs).")
    if p.is_dir() and not p.name.lower().endswith(".mrxs"):
        raise SlideOpenError(f"'{p}' is a directory, not a slide file; use expand_slide_paths or "
                             "the CLI to tile a folder.")
    if backend == "numpy":
        raise ConfigError("backend='numpy' is for in-memory arrays; pass an array or use backend='auto'.")
    order = AUTO_ORDER if backend == "auto" else (backend,)
    reasons: list[str] = []
    for name in order:
        if backend == "auto" and name == "tiffslide" and not p.name.lower().endswith(_TIFF_SUFFIXES):
            reasons.append("tiffslide: skipped (not a TIFF-family file)")
            continue
        try:
            slide = _open_backend(name, p, mpp)
        except BackendUnavailableError:
            if backend != "auto":
                raise
            reasons.append(f"{name}: not installed")
            continue
        except Exception as err:  # noqa: BLE001 - every backend error becomes one reason
            reasons.append(f"{name}: {_reason(err)}")
            logger.debug("backend %s cannot open %s", name, p, exc_info=True)
            continue
        try:
            if slide.level_count == 0 or min(slide.dimensions) <= 0:
                raise ValueError("no image levels")
            _probe(slide)
        except Exception as err:  # noqa: BLE001
            reasons.append(f"{name}: opens but cannot decode pixels ({_reason(err)})")
            slide.close()
            continue
        logger.info("opened %s with backend %s", p, name)
        return slide
    raise SlideOpenError(
        f"cannot open '{p}' as a slide; tried {'; '.join(reasons)}. Check that the file is a "
        "complete whole-slide image (not truncated) or try another backend= ."
    )


def _open_backend(name: str, p: Path, mpp: float | None) -> _BaseSlide:
    from wsi_ssl.tiling._backends import _OpenSlideSlide, _TiatoolboxSlide, _TiffSlideSlide

    if name == "openslide":
        return _OpenSlideSlide(p, mpp)
    if name == "tiffslide":
        return _TiffSlideSlide(p, mpp)
    if name == "tiatoolbox":
        _require_tiatoolbox()
        return _TiatoolboxSlide(p, mpp, sanitize_id(p.stem))
    raise ConfigError(f"backend={name!r} is unknown.")  # pragma: no cover


def _require_tiatoolbox() -> None:
    try:
        import tiatoolbox.wsicore.wsireader  # noqa: F401
    except ImportError as err:
        raise BackendUnavailableError(
            "backend='tiatoolbox' needs the optional extra: pip install \"wsi-ssl[tiatoolbox]\" "
            f"({_reason(err)})."
        ) from err


def _open_array(image: np.ndarray, backend: str, mpp: float | None) -> _BaseSlide:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise ConfigError(
            f"an in-memory slide must be a uint8 (H, W, 3) RGB array; got {image.dtype} {image.shape}."
        )
    if backend in ("openslide", "tiffslide"):
        raise ConfigError(f"backend={backend!r} reads files; use backend='numpy' (or 'tiatoolbox') "
                          "for an in-memory array.")
    from wsi_ssl.tiling._backends import _NumpySlide, _TiatoolboxSlide

    if backend == "tiatoolbox":
        _require_tiatoolbox()
        return _TiatoolboxSlide(image, mpp, "array")
    return _NumpySlide(image, mpp, "array")

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
from typing import Literal

import numpy as np

from wsi_ssl._utils import sanitize_id
from wsi_ssl.errors import BackendUnavailableError, ConfigError, SlideOpenError
from wsi_ssl.tiling._backends import (
    _NumpySlide,
    _OpenSlideSlide,
    _TiatoolboxSlide,
    _TiffSlideSlide,
)
from wsi_ssl.tiling._slide_base import Slide, _BaseSlide

__all__ = ["Slide", "open_slide", "BackendName", "BACKENDS"]

logger = logging.getLogger(__name__)

BackendName = Literal["auto", "tiffslide", "openslide", "tiatoolbox", "numpy"]
#: Backends tried by ``backend="auto"`` for files, fastest first.
AUTO_ORDER: tuple[str, ...] = ("tiffslide", "openslide", "tiatoolbox")
BACKENDS: tuple[str, ...] = ("auto", "tiffslide", "openslide", "tiatoolbox", "numpy")
_TIFF_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".qptiff", ".svslide")


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
               slide_mpp: float | None = None) -> Slide:
    """Open a whole-slide image (or wrap an in-memory RGB array) as a :class:`Slide`.

    Args:
        path: a slide file, or a ``uint8 (H, W, 3)`` numpy array (a one-level virtual slide).
        backend: ``"auto"`` (fastest that opens the file: tiffslide for TIFF-family files, then
            openslide, then tiatoolbox if installed), or one of ``"tiffslide"``, ``"openslide"``,
            ``"tiatoolbox"``, ``"numpy"`` (arrays only). The one used is ``slide.backend``.
        slide_mpp: the slide's own µm/px at level 0; overrides the metadata
            (``slide.mpp_assumed`` becomes True). Needed for slides without MPP before
            :func:`tile_grid`.

    Raises:
        SlideOpenError: the file is missing or no backend could open *and* decode it; the message
            names the path and each backend tried with its reason.
        BackendUnavailableError: an explicitly requested optional backend is not installed.
        ConfigError: a bad ``backend`` or ``slide_mpp`` value.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is unknown; use one of {', '.join(BACKENDS)}.")
    mpp = slide_mpp
    if mpp is not None:
        try:
            mpp = float(mpp)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"slide_mpp={mpp!r} must be a positive number of µm/px.") from err
        if not (math.isfinite(mpp) and mpp > 0):
            raise ConfigError(f"slide_mpp={mpp!r} must be a positive, finite number of µm/px "
                              "(e.g. 0.25).")

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
        import tiatoolbox.wsicore.wsireader  # noqa: F401  # lazy: optional extra `tiatoolbox`
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

    if backend == "tiatoolbox":
        _require_tiatoolbox()
        return _TiatoolboxSlide(image, mpp, "array")
    return _NumpySlide(image, mpp, "array")

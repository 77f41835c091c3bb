"""Tissue detection on a slide thumbnail.

Assumptions (brightfield, the default): glass is bright and unsaturated, stained tissue (H&E,
IHC) is coloured. The mask is an Otsu threshold on the saturation of a lightly blurred thumbnail
(clamped to a sane range so an empty slide does not turn its noise into "tissue"), minus
pen marks (green/cyan/blue ink, saturated red ink, near-black marker) and minus near-white glass,
followed by morphological opening/closing, hole filling and removal of specks.

A dark background (the median brightness of the thumbnail's border under 0.35, i.e. a
fluorescence scan) is detected and thresholded on brightness instead (Otsu on the value channel);
it is logged, never silent, and never crashes.

Masks live at thumbnail scale; ``TissueMask.downsample`` maps them to level-0 pixels.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from wsi_ssl.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from wsi_ssl.tiling._slide import Slide

__all__ = ["TissueMask", "detect_tissue", "tissue_mask_from_rgb"]

logger = logging.getLogger(__name__)

SAT_FLOOR = 0.07  # Otsu on saturation is clamped to [SAT_FLOOR, 0.3]
DARK_VALUE = 0.8  # unsaturated but dark (dense nuclei, black-ish stain) is tissue unless pen
TissueMethod = Literal["otsu", "fluorescence", "all"]


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask at thumbnail scale.

    Attributes:
        mask: ``bool (h, w)``; True = tissue.
        downsample: level-0 pixels per mask pixel ``(sx, sy)``.
        method: the method used (``"otsu"``, ``"fluorescence"``, ``"all"``).
        threshold: the threshold applied (saturation, or brightness for dark backgrounds).
        background: ``"bright"`` or ``"dark"`` (the background polarity that was used).
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    method: str
    threshold: float
    background: str = "bright"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape)  # type: ignore[return-value]

    @property
    def fraction(self) -> float:
        """Fraction of the slide area covered by tissue (0..1)."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def region_fractions(self, boxes: np.ndarray) -> np.ndarray:
        """Tissue fraction inside each level-0 box.

        Args:
            boxes: ``(N, 4)`` level-0 ``x0, y0, x1, y1``.

        Returns:
            ``float32 (N,)`` in [0, 1]; a box smaller than a mask pixel takes the pixel under
            its centre.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros(0, np.float32)
        h, w = self.mask.shape
        sx, sy = self.downsample
        integral = np.zeros((h + 1, w + 1), np.int64)
        integral[1:, 1:] = np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.int64), axis=1)
        cx0 = np.clip(np.round(boxes[:, 0] / sx), 0, w - 1).astype(np.int64)
        cy0 = np.clip(np.round(boxes[:, 1] / sy), 0, h - 1).astype(np.int64)
        cx1 = np.clip(np.round(boxes[:, 2] / sx), 0, w).astype(np.int64)
        cy1 = np.clip(np.round(boxes[:, 3] / sy), 0, h).astype(np.int64)
        cx1 = np.maximum(cx1, cx0 + 1)
        cy1 = np.maximum(cy1, cy0 + 1)
        s = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
        area = (cx1 - cx0) * (cy1 - cy0)
        return (s / area).astype(np.float32)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu  # lazy: scikit-image only when tissue is detected

    v = values[np.isfinite(values)]
    if v.size == 0 or float(v.max()) - float(v.min()) < 1e-6:
        return float(v.max()) if v.size else 0.0
    return float(threshold_otsu(v, nbins=256))


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] (``skimage.color.rgb2hsv``)."""
    from skimage.color import rgb2hsv  # lazy: scikit-image only when tissue is detected

    hsv = rgb2hsv(rgb).astype(np.float32)
    return hsv[..., 0] * np.float32(360.0), hsv[..., 1], hsv[..., 2]


def _pen_mask(hue: np.ndarray, sat: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Pen/marker ink: green/cyan (hue 60-200), saturated blue (200-255), saturated red
    (>= 340 or <= 12, redder than eosin) and near-black marker."""
    green = (hue >= 60) & (hue < 200) & (sat > 0.15)
    blue = (hue >= 200) & (hue < 255) & (sat > 0.45) & (val < 0.85)
    red = ((hue >= 340) | (hue <= 12)) & (sat > 0.3)
    black = val < 0.15
    return green | blue | red | black


def _clean(mask: np.ndarray, min_area: int, open_iter: int = 1, close_iter: int = 2) -> np.ndarray:
    from scipy import ndimage as ndi  # lazy: scipy loads on first use, not on import

    st = ndi.generate_binary_structure(2, 1)
    if open_iter:
        mask = ndi.binary_opening(mask, structure=st, iterations=open_iter)
    if close_iter:
        mask = ndi.binary_closing(mask, structure=st, iterations=close_iter, border_value=0)
    mask = ndi.binary_fill_holes(mask)
    if min_area > 1 and mask.any():
        lab, n = ndi.label(mask)
        sizes = np.bincount(lab.ravel())
        keep = sizes >= min_area
        keep[0] = False
        mask = keep[lab]
    return mask


def tissue_mask_from_rgb(rgb: np.ndarray, *, method: TissueMethod = "otsu",
                         min_area_fraction: float = 1e-4, remove_pen: bool = True,
                         white_value: float = 0.92, blur_sigma: float = 1.0,
                         ) -> TissueMask:
    """The pure tissue-detection function behind :func:`detect_tissue`.

    Args:
        rgb: a thumbnail, ``uint8 (h, w, 3)``.
        method: ``"otsu"`` (brightfield, auto-switching to brightness for dark backgrounds),
            ``"fluorescence"`` (bright objects on a dark background), ``"all"`` (everything).
        min_area_fraction: connected components smaller than this fraction of the image go.
        remove_pen: drop pen-mark colours.
        white_value: pixels brighter than this with saturation < 0.1 are glass.
        blur_sigma: Gaussian blur (thumbnail pixels) before thresholding.

    Returns:
        A :class:`TissueMask` at the image's scale (``downsample=(1.0, 1.0)``) with the
        ``threshold`` applied and the ``background`` (``"bright"``/``"dark"``) used.
    """
    from scipy import ndimage as ndi  # lazy: scipy loads on first use, not on import

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise ConfigError(f"tissue detection needs a uint8 (h, w, 3) image; got {rgb.dtype} {rgb.shape}.")
    rgb = rgb[..., :3]
    h, w = rgb.shape[:2]
    if method == "all":
        return TissueMask(mask=np.ones((h, w), bool), downsample=(1.0, 1.0), method=method,
                          threshold=0.0)
    if blur_sigma > 0:
        rgb = ndi.gaussian_filter(rgb.astype(np.float32), sigma=(blur_sigma, blur_sigma, 0))
        rgb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    hue, sat, val = _hsv(rgb)
    min_area = max(2, int(min_area_fraction * h * w))

    border = np.concatenate([val[0], val[-1], val[:, 0], val[:, -1]])
    dark = method == "fluorescence" or (method == "otsu" and float(np.median(border)) < 0.35)
    if dark:
        if method == "otsu":
            logger.info("dark background (median border brightness %.2f): thresholding on "
                        "brightness as for fluorescence", float(np.median(border)))
        t = float(np.clip(_otsu(val), 0.05, 0.9))
        return TissueMask(mask=_clean(val > t, min_area), downsample=(1.0, 1.0), method=method,
                          threshold=t, background="dark")
    if method != "otsu":
        raise ConfigError(f"method={method!r} is unknown; use 'otsu', 'fluorescence' or 'all'.")
    t = float(np.clip(_otsu(sat), SAT_FLOOR, 0.3))
    mask = (sat > t) | (val < DARK_VALUE)
    mask &= ~((val > white_value) & (sat < 0.1))
    if remove_pen:
        pen = ndi.binary_dilation(_pen_mask(hue, sat, val), iterations=1)
        mask &= ~pen
    return TissueMask(mask=_clean(mask, min_area), downsample=(1.0, 1.0), method=method,
                      threshold=t)


def detect_tissue(slide: Slide | np.ndarray, *, method: TissueMethod = "otsu", thumbnail_size: int = 1024,
                  min_area_fraction: float = 1e-4, remove_pen: bool = True) -> TissueMask:
    """Find tissue on a thumbnail of ``slide``.

    Args:
        slide: a :class:`Slide` (or a ``uint8 (h, w, 3)`` thumbnail array, then ``downsample=1``).
        method: ``"otsu"`` (brightfield default; a dark background switches to brightness),
            ``"fluorescence"``, or ``"all"`` (every pixel is tissue, e.g. for TMA cores).
        thumbnail_size: longer side of the thumbnail in pixels.
        min_area_fraction: drop tissue pieces smaller than this fraction of the thumbnail.
        remove_pen: drop pen-mark colours (green/blue/red/black ink).

    Returns:
        A :class:`TissueMask` at thumbnail scale. Does not need the slide's MPP.
    """
    if method not in ("otsu", "fluorescence", "all"):
        raise ConfigError(f"method={method!r} is unknown; use 'otsu', 'fluorescence' or 'all'.")
    if int(thumbnail_size) < 16:
        raise ConfigError(f"thumbnail_size={thumbnail_size} is too small; use >= 16 (default 1024).")
    if isinstance(slide, np.ndarray):
        thumb = slide
        dims = (thumb.shape[1], thumb.shape[0])
    else:
        thumb = slide.thumbnail(int(thumbnail_size))
        dims = slide.dimensions
    found = tissue_mask_from_rgb(thumb, method=method, min_area_fraction=min_area_fraction,
                                 remove_pen=remove_pen)
    h, w = found.mask.shape
    return dataclasses.replace(found, downsample=(dims[0] / w, dims[1] / h))

"""A generated cohort with a known answer: pyramidal H&E-like slides, a slide label that lives in a
minority of the tissue, and survival times that depend on it.

Each slide is a procedural :class:`~wsi_ssl.datasets._render.SlideModel` (tissue on glass, stroma,
glands, per-slide stain variation) written as a pyramidal tiled JPEG TIFF that OpenSlide opens at
0.5 µm/px. **Positive** slides (``label = 1``) carry a tumour region (dense, large, pleomorphic,
vesicular nuclei) over a few to ~15 % of the tissue; every slide, positive or not, may carry a
**decoy** (lymphoid aggregate: dense, small, very dark nuclei) that is as purple as tumour, so colour
alone does not give the label away and mean pooling of tile features is diluted by the 85-97 %
normal tissue. Survival: an exponential time whose log-hazard grows with the tumour extent, plus
noise and uniform censoring.

Layout of ``out_dir``::

    slides/slide_000.tif ...   the slides (0.5 µm/px, 2+ pyramid levels)
    masks/slide_000.png ...    region maps (0 glass, 1 normal, 2 tumour, 3 decoy) at 1/16 scale
    labels.csv                 slide_id, patient_id, label, time, event, tumor_fraction, ...
    cohort.json                the settings (a rerun with the same settings reuses the files)

Coordinates are level-0 pixels ``(x, y)``; sizes ``(w, h)``; MPP in µm/px.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl._utils import progress
from wsi_ssl.datasets._render import REGION_CODES, SlideModel
from wsi_ssl.datasets._tiff import write_pyramidal_tiff
from wsi_ssl.errors import ConfigError, InputError

__all__ = ["SlideInfo", "CohortInfo", "make_slide", "make_cohort", "region_fractions",
           "MASK_DOWNSAMPLE", "REGION_CODES"]

logger = logging.getLogger(__name__)

#: level-0 pixels per region-map pixel
MASK_DOWNSAMPLE = 16
_FORMAT = "wsi-ssl-cohort-1"


@dataclass(frozen=True)
class SlideInfo:
    """What :func:`make_slide` wrote.

    Attributes:
        path: the slide file.
        slide_id: its id (the file stem).
        size: level-0 ``(w, h)`` in pixels.
        mpp: µm/px at level 0.
        seed: the seed that determines every pixel.
        tissue_fraction: fraction of the slide area that is tissue.
        tumor_fraction: fraction of the tissue area that is tumour (the label region).
        decoy_fraction: fraction of the tissue area that is decoy (lymphoid aggregate).
        mask_path: the region map PNG, or None.
    """

    path: Path
    slide_id: str
    size: tuple[int, int]
    mpp: float
    seed: int
    tissue_fraction: float
    tumor_fraction: float
    decoy_fraction: float
    mask_path: Path | None = None


@dataclass(frozen=True, eq=False)
class CohortInfo:
    """What :func:`make_cohort` wrote.

    Attributes:
        out_dir: the cohort folder.
        paths: the slide files, in ``labels`` row order.
        labels: one row per slide: ``slide_id, patient_id, label, time, event, tumor_fraction,
            decoy_fraction, tissue_fraction`` (``time`` in months, ``event`` 1 = death observed).
        labels_csv: ``out_dir / "labels.csv"`` (the same table).
        slides_dir: the folder of slides (what ``embed`` / ``tile_slides`` take).
        masks_dir: the folder of region maps (``MASK_DOWNSAMPLE`` level-0 px per map pixel).
        config: the settings that made the cohort.
    """

    out_dir: Path
    paths: tuple[Path, ...]
    labels: Any  # pandas.DataFrame
    labels_csv: Path
    slides_dir: Path
    masks_dir: Path
    config: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def slide_ids(self) -> list[str]:
        return [str(s) for s in self.labels["slide_id"]]

    def region_map(self, slide_id: str) -> np.ndarray:
        """Region codes of one slide (0 glass, 1 normal, 2 tumour, 3 decoy).

        Shape:
            ``(ceil(h / 16), ceil(w / 16))`` uint8, one value per 16 x 16 level-0 block.
        """
        from PIL import Image  # lazy: Pillow only when images are read or written

        path = self.masks_dir / f"{slide_id}.png"
        if not path.is_file():
            raise InputError(
                f"no region map for slide_id={slide_id!r} at '{path}'; use one of {self.slide_ids[:3]}..."
            )
        return np.asarray(Image.open(path))

    def tile_fractions(self, slide_id: str, coords: np.ndarray, size: int) -> np.ndarray:
        """Fraction of each region code inside square tiles (ground truth for tile-level checks).

        Args:
            slide_id: a slide of the cohort.
            coords: level-0 ``(x, y)`` top-left corners, ``(N, 2)``.
            size: tile edge in level-0 pixels (``tile_size * target_mpp / slide_mpp``).

        Shape:
            returns ``(N, 4)`` float32, columns = codes 0 glass, 1 normal, 2 tumour, 3 decoy.
        """
        return region_fractions(self.region_map(slide_id), coords, size)


def region_fractions(region_map: np.ndarray, coords: np.ndarray, size: int,
                     downsample: int = MASK_DOWNSAMPLE) -> np.ndarray:
    """Per-tile fractions of each region code (see :meth:`CohortInfo.tile_fractions`)."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    h, w = region_map.shape
    onehot = np.stack([region_map == c for c in range(4)], axis=-1).astype(np.float64)
    integral = np.zeros((h + 1, w + 1, 4))
    integral[1:, 1:] = onehot.cumsum(0).cumsum(1)
    x0 = np.clip(np.round(coords[:, 0] / downsample).astype(int), 0, w)
    y0 = np.clip(np.round(coords[:, 1] / downsample).astype(int), 0, h)
    x1 = np.clip(np.round((coords[:, 0] + size) / downsample).astype(int), 0, w)
    y1 = np.clip(np.round((coords[:, 1] + size) / downsample).astype(int), 0, h)
    x1, y1 = np.maximum(x1, np.minimum(x0 + 1, w)), np.maximum(y1, np.minimum(y0 + 1, h))
    tot = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum(tot.sum(axis=1, keepdims=True), 1e-9)
    return (tot / area).astype(np.float32)


def _check_range(name: str, value: float | tuple[float, float], lo: float, hi: float
                 ) -> tuple[float, float]:
    pair = (float(value), float(value)) if np.isscalar(value) else tuple(map(float, value))
    if len(pair) != 2 or not (lo <= pair[0] <= pair[1] <= hi):
        raise ConfigError(
            f"{name}={value!r} must be a number or a (low, high) pair with {lo} <= low <= high <= {hi}."
        )
    return pair  # type: ignore[return-value]


def _check_size_mpp(size: tuple[int, int], mpp: float) -> tuple[int, int]:
    try:
        w0, h0 = (int(size[0]), int(size[1]))
    except (TypeError, ValueError, IndexError) as err:
        raise ConfigError(f"size={size!r} must be a (width, height) pair of pixels.") from err
    if w0 < 512 or h0 < 512:
        raise ConfigError(f"size={tuple(size)!r} is too small; use at least (512, 512) pixels.")
    if not (isinstance(mpp, (int, float)) and mpp > 0):
        raise ConfigError(f"mpp={mpp!r} must be a positive number of µm/px (0.5 = 20x).")
    return w0, h0


def make_slide(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    size: tuple[int, int] = (3072, 3072),
    mpp: float = 0.5,
    tumor_fraction: float = 0.1,
    decoy_fraction: float = 0.05,
    tissue_fraction: float = 0.6,
    stain_jitter: float = 1.0,
    quality: int = 90,
    mask_path: str | os.PathLike | None = None,
) -> SlideInfo:
    """Write one generated H&E-like slide (pyramidal tiled JPEG TIFF, SVS layout).

    Rendering is vectorised and tile by tile (memory stays small for any ``size``); a 3072 x 3072
    slide takes about a second on one core.

    Args:
        path: output file (``.tif`` or ``.svs``).
        seed: determines every pixel (same seed and settings -> the same file bytes).
        size: level-0 ``(w, h)`` in pixels (at least 512 x 512).
        mpp: µm/px at level 0 (the textures are drawn for 0.5 µm/px, i.e. 20x).
        tumor_fraction: fraction of the tissue covered by the label region (0 for a negative).
        decoy_fraction: fraction of the tissue covered by decoy lymphoid aggregates.
        tissue_fraction: fraction of the slide covered by tissue.
        stain_jitter: strength of the per-slide stain variation (0 = reference stain).
        quality: JPEG quality.
        mask_path: where to write the region map PNG (codes 0-3, 1/16 scale); None = not written.
    """
    w0, h0 = _check_size_mpp(size, mpp)
    _check_range("tumor_fraction", tumor_fraction, 0.0, 0.9)
    _check_range("decoy_fraction", decoy_fraction, 0.0, 0.9)
    _check_range("tissue_fraction", tissue_fraction, 0.05, 0.95)
    if tumor_fraction + decoy_fraction > 0.95:
        raise ConfigError(
            f"tumor_fraction + decoy_fraction = {tumor_fraction + decoy_fraction:.2f} leaves no "
            "normal tissue; keep the sum under 0.95."
        )
    path = Path(path)
    model = SlideModel((w0, h0), seed=int(seed), tumor_fraction=float(tumor_fraction),
                       decoy_fraction=float(decoy_fraction),
                       tissue_fraction=float(tissue_fraction), stain_jitter=float(stain_jitter))
    with _one_blas_thread():
        n_levels = 1
        while max(w0, h0) / 4**n_levels >= 256:  # down to a few hundred pixels: 2+ levels
            n_levels += 1
        write_pyramidal_tiff(path, model, size=(w0, h0), mpp=mpp, tile_size=256,
                             n_levels=n_levels, downsample=4, quality=quality)
        if mask_path is not None:
            from PIL import Image  # lazy: Pillow only when images are read or written

            mask_path = Path(mask_path)
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(model.region_map(MASK_DOWNSAMPLE)).save(mask_path)
    return SlideInfo(path=path, slide_id=path.stem, size=(w0, h0), mpp=float(mpp), seed=int(seed),
                     tissue_fraction=model.tissue_fraction, tumor_fraction=model.tumor_fraction,
                     decoy_fraction=model.decoy_fraction,
                     mask_path=Path(mask_path) if mask_path is not None else None)


@contextlib.contextmanager
def _one_blas_thread():
    """Tiny matrix products run fastest (and do not fight other processes) on one BLAS thread."""
    try:
        from threadpoolctl import threadpool_limits  # lazy: threadpoolctl around BLAS
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _make_one(kwargs: dict[str, Any]) -> SlideInfo:
    return make_slide(**{k: v for k, v in kwargs.items() if k != "label"})


def make_cohort(
    out_dir: str | os.PathLike,
    *,
    n_slides: int = 40,
    seed: int = 0,
    size: tuple[int, int] = (3072, 3072),
    mpp: float = 0.5,
    positive_fraction: float = 0.5,
    tumor_fraction: tuple[float, float] = (0.03, 0.15),
    decoy_fraction: tuple[float, float] = (0.02, 0.15),
    decoy_probability: float = 0.75,
    tissue_fraction: tuple[float, float] = (0.5, 0.7),
    stain_jitter: float = 1.0,
    median_survival: float = 60.0,
    survival_effect: float = 2.0,
    censoring: tuple[float, float] = (24.0, 120.0),
    quality: int = 90,
    n_workers: int = 1,
    overwrite: bool = False,
) -> CohortInfo:
    """Generate a labelled cohort of slides (see the module docstring for the layout).

    Args:
        out_dir: folder to write into (created).
        n_slides: number of slides (one patient each).
        seed: determines the whole cohort.
        size: level-0 ``(w, h)`` of every slide. The default 3072 x 3072 at 0.5 µm/px gives
            ~100-150 tissue tiles of 224 px (~400-600 of 112 px).
        mpp: µm/px at level 0.
        positive_fraction: share of slides with ``label = 1`` (exactly ``round(n * share)``).
        tumor_fraction: ``(low, high)`` uniform range of the tumour share of the tissue in
            positive slides (negatives have none).
        decoy_fraction: ``(low, high)`` range of the decoy share, for slides drawn to have one.
        decoy_probability: chance that a slide (of either label) has decoy regions.
        tissue_fraction: ``(low, high)`` range of the tissue share of the slide area.
        stain_jitter: strength of the per-slide stain variation.
        median_survival: median survival time (months) of a slide without tumour.
        survival_effect: log hazard ratio per 10 % of tumour (``time`` depends on the extent).
        censoring: ``(low, high)`` uniform censoring times in months.
        quality: JPEG quality of the slides.
        n_workers: worker processes for writing slides (1 = in this process).
        overwrite: rewrite even when ``out_dir`` holds a cohort made with the same settings.

    Returns:
        A :class:`CohortInfo`; ``labels.csv`` and ``cohort.json`` are written next to the slides.
    """
    if int(n_workers) < 1:
        raise ConfigError(f"n_workers={n_workers!r} must be at least 1.")
    config = _cohort_config(
        n_slides=n_slides, seed=seed, size=size, mpp=mpp, positive_fraction=positive_fraction,
        tumor_fraction=tumor_fraction, decoy_fraction=decoy_fraction,
        decoy_probability=decoy_probability, tissue_fraction=tissue_fraction,
        stain_jitter=stain_jitter, median_survival=median_survival,
        survival_effect=survival_effect, censoring=censoring, quality=quality)
    n = config["n_slides"]
    out_dir = Path(out_dir)
    width = max(3, len(str(n - 1)))
    ids = [f"slide_{i:0{width}d}" for i in range(n)]
    info = CohortInfo(out_dir, tuple(out_dir / "slides" / f"{s}.tif" for s in ids), None,
                      out_dir / "labels.csv", out_dir / "slides", out_dir / "masks", config)
    if not overwrite:
        reused = _reuse_cohort(info)
        if reused is not None:
            return reused

    rng = np.random.default_rng(seed)
    jobs = _slide_jobs(info, rng)
    info.slides_dir.mkdir(parents=True, exist_ok=True)
    config_json = out_dir / "cohort.json"
    config_json.unlink(missing_ok=True)  # written last: its presence means "complete"
    if n_workers > 1 and n > 1:
        with ProcessPoolExecutor(max_workers=min(int(n_workers), n)) as pool:
            infos = list(progress(pool.map(_make_one, jobs), total=n, desc="slides", unit="slide"))
    else:
        infos = [_make_one(j) for j in progress(jobs, desc="slides", unit="slide")]
    labels = _labels_table(ids, [j["label"] for j in jobs], infos, rng, config, width)
    labels.to_csv(info.labels_csv, index=False)
    config_json.write_text(json.dumps(config, indent=2))
    logger.info("wrote %d slides (%d positive) to '%s'", n, int(labels["label"].sum()),
                info.slides_dir)
    return dataclasses.replace(info, labels=labels)


def _cohort_config(*, n_slides: int, seed: int, size: tuple[int, int], mpp: float,
                   positive_fraction: float, tumor_fraction: tuple[float, float],
                   decoy_fraction: tuple[float, float], decoy_probability: float,
                   tissue_fraction: tuple[float, float], stain_jitter: float,
                   median_survival: float, survival_effect: float,
                   censoring: tuple[float, float], quality: int) -> dict[str, Any]:
    """The validated settings of a cohort, as stored in ``cohort.json``."""
    if int(n_slides) < 1:
        raise ConfigError(f"n_slides={n_slides!r} must be at least 1.")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ConfigError(f"positive_fraction={positive_fraction!r} must be in [0, 1].")
    if not 0.0 <= decoy_probability <= 1.0:
        raise ConfigError(f"decoy_probability={decoy_probability!r} must be in [0, 1].")
    if not median_survival > 0:
        raise ConfigError(f"median_survival={median_survival!r} must be a positive number of months.")
    _check_size_mpp(size, mpp)
    return {
        "format": _FORMAT, "n_slides": int(n_slides), "seed": int(seed),
        "size": [int(size[0]), int(size[1])], "mpp": float(mpp),
        "positive_fraction": float(positive_fraction),
        "tumor_fraction": list(_check_range("tumor_fraction", tumor_fraction, 0.0, 0.6)),
        "decoy_fraction": list(_check_range("decoy_fraction", decoy_fraction, 0.0, 0.3)),
        "decoy_probability": float(decoy_probability),
        "tissue_fraction": list(_check_range("tissue_fraction", tissue_fraction, 0.05, 0.95)),
        "stain_jitter": float(stain_jitter), "median_survival": float(median_survival),
        "survival_effect": float(survival_effect),
        "censoring": list(_check_range("censoring", censoring, 0.0, 1e6)), "quality": int(quality),
        "mask_downsample": MASK_DOWNSAMPLE,
    }


def _reuse_cohort(info: CohortInfo) -> CohortInfo | None:
    """The cohort already in ``info.out_dir`` when it was made with the same settings; None when
    there is none (or it is incomplete); a :class:`ConfigError` when it has other settings."""
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    config_json = info.out_dir / "cohort.json"
    if not config_json.is_file():
        return None
    try:
        old = json.loads(config_json.read_text())
    except (OSError, ValueError):
        return None
    if old == info.config and info.labels_csv.is_file() and all(p.is_file() for p in info.paths):
        logger.info("reusing the cohort in '%s' (same settings)", info.out_dir)
        labels = pd.read_csv(info.labels_csv, dtype={"slide_id": str, "patient_id": str})
        return dataclasses.replace(info, labels=labels)
    if old != info.config:
        diff = sorted(k for k in set(info.config) | set(old)
                      if info.config.get(k) != old.get(k))
        raise ConfigError(
            f"'{info.out_dir}' already holds a cohort made with other settings "
            f"({', '.join(diff)}); pass overwrite=True (--overwrite) or choose another out_dir."
        )
    return None


def _slide_jobs(info: CohortInfo, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Per slide: its label and the keyword arguments of :func:`make_slide` (drawn from ``rng``
    in a fixed order, so a seed gives the same cohort)."""
    cfg = info.config
    n = cfg["n_slides"]
    tum, dec, tis = cfg["tumor_fraction"], cfg["decoy_fraction"], cfg["tissue_fraction"]
    n_pos = int(round(n * cfg["positive_fraction"]))
    label = rng.permutation(np.r_[np.ones(n_pos, int), np.zeros(n - n_pos, int)])
    tumor = np.where(label == 1, rng.uniform(tum[0], tum[1], n), 0.0)
    has_decoy = rng.uniform(size=n) < cfg["decoy_probability"]
    decoy = np.where(has_decoy, rng.uniform(dec[0], dec[1], n), 0.0)
    tissue = rng.uniform(tis[0], tis[1], n)
    slide_seeds = [int(s.generate_state(1)[0])
                   for s in np.random.SeedSequence(cfg["seed"]).spawn(n)]
    return [
        dict(path=p, seed=sd, size=tuple(cfg["size"]), mpp=cfg["mpp"], tumor_fraction=float(t),
             decoy_fraction=float(d), tissue_fraction=float(ti),
             stain_jitter=cfg["stain_jitter"], quality=cfg["quality"],
             mask_path=info.masks_dir / f"{p.stem}.png", label=int(lab))
        for p, sd, t, d, ti, lab in zip(info.paths, slide_seeds, tumor, decoy, tissue, label,
                                        strict=True)
    ]


def _labels_table(ids: list[str], label: list[int], infos: list[SlideInfo],
                  rng: np.random.Generator, cfg: dict[str, Any], width: int):
    """``labels.csv``: label, survival (exponential times, log-hazard linear in the measured
    tumour extent, plus noise; uniform censoring) and the measured fractions of each slide."""
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    n = len(ids)
    cen = cfg["censoring"]
    t_frac = np.array([i.tumor_fraction for i in infos])
    log_hazard = cfg["survival_effect"] * t_frac / 0.1 + rng.normal(0.0, 0.25, n)
    rate = np.log(2.0) / cfg["median_survival"] * np.exp(log_hazard)
    t_true = rng.exponential(1.0 / rate)
    t_cens = rng.uniform(cen[0], cen[1], n) if cen[1] > 0 else np.full(n, np.inf)
    event = (t_true <= t_cens).astype(int)
    times = np.round(np.maximum(np.minimum(t_true, t_cens), 0.1), 2)
    return pd.DataFrame({
        "slide_id": ids,
        "patient_id": [f"patient_{i:0{width}d}" for i in range(n)],
        "label": np.asarray(label, dtype=int),
        "time": times,
        "event": event,
        "tumor_fraction": np.round(t_frac, 5),
        "decoy_fraction": np.round([i.decoy_fraction for i in infos], 5),
        "tissue_fraction": np.round([i.tissue_fraction for i in infos], 5),
    })


"""Shared fixtures: the real test data folder and small generated pyramidal slides."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("WSI_SSL_TEST_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``$WSI_SSL_TEST_DATA`` or ``../shared/data`` (the real slides, tiles, MIL sets, features)."""
    d = _data_dir()
    if not (d / "slides").is_dir():
        pytest.fail(
            f"test data not found at '{d}'; set WSI_SSL_TEST_DATA to the shared/data folder."
        )
    return d


@pytest.fixture(scope="session")
def slides_dir(data_dir: Path) -> Path:
    return data_dir / "slides"


def tissue_image(w: int, h: int, seed: int = 0) -> np.ndarray:
    """An H&E-ish RGB image: pink/purple blobs with nuclei-like dots on near-white glass."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros((h, w), np.float32)
    for _ in range(6):
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        r = rng.uniform(0.08, 0.2) * min(w, h)
        field += np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
    tissue = field > 0.5
    img = np.empty((h, w, 3), np.uint8)
    img[...] = (242, 240, 244)
    noise = rng.normal(0, 12, (h, w, 1))
    pink = np.clip(np.array([225, 150, 190])[None, None] + noise, 0, 255)
    img[tissue] = pink[tissue].astype(np.uint8)
    n_nuc = int(tissue.sum() / 900)
    ys, xs = np.nonzero(tissue)
    pick = rng.integers(0, len(ys), n_nuc) if len(ys) else []
    for i in pick:
        y, x = ys[i], xs[i]
        img[max(0, y - 3): y + 4, max(0, x - 3): x + 4] = (90, 60, 140)
    return img


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory) -> Path:
    """A 4096 x 3072 pyramidal JPEG TIFF at 0.5 µm/px with tissue blobs (3 levels)."""
    from wsi_ssl.datasets import write_pyramidal_tiff

    path = tmp_path_factory.mktemp("slides") / "synthetic.svs"
    return write_pyramidal_tiff(path, tissue_image(4096, 3072), mpp=0.5, n_levels=3, downsample=2)

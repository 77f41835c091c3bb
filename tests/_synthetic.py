"""Synthetic test images shared by the test folders (``from tests._synthetic import ...``)."""

from __future__ import annotations

import numpy as np


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

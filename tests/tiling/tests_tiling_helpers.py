"""Helpers shared by the tiling tests (importable because pytest puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np


def tissue_image(w: int, h: int, seed: int = 0) -> np.ndarray:
    """H&E-ish blobs with nuclei on near-white glass (same recipe as tests/conftest.py)."""
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
    ys, xs = np.nonzero(tissue)
    for i in (rng.integers(0, len(ys), int(tissue.sum() / 900)) if len(ys) else []):
        img[max(0, ys[i] - 3): ys[i] + 4, max(0, xs[i] - 3): xs[i] + 4] = (90, 60, 140)
    return img


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))

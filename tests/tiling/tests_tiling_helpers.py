"""Helpers shared by the tiling tests (importable because pytest puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np
from _synthetic import tissue_image  # noqa: F401  (one recipe for every test folder)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))

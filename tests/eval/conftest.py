"""Seeded synthetic cohorts with a known signal for the evaluation tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from wsi_ssl.store import SlideEmbeddings


def make_cohort(n_patients: int = 70, dim: int = 16, *, n_classes: int = 2, seed: int = 0,
                signal: float = 1.0, max_slides: int = 2):
    """TCGA-style slide ids (1..max_slides slides per patient), embeddings ``x = z A + noise``
    with a 4-d patient latent ``z``; the label depends on ``z[:, 0]`` (and ``z[:, 2]`` for
    3 classes), the hazard on ``z[:, 1]``."""
    rng = np.random.default_rng(seed)
    ids, pats = [], []
    for p in range(n_patients):
        for s in range(int(rng.integers(1, max_slides + 1))):
            ids.append(f"TCGA-A{p % 7}-{p:04d}-01Z-00-DX{s + 1}")
            pats.append(p)
    pats = np.asarray(pats)
    n = len(ids)
    z = rng.normal(size=(n_patients, 4))[pats]
    x = z @ rng.normal(size=(4, dim)) + 0.5 * rng.normal(size=(n, dim))
    score = signal * z[:, 0] + 0.5 * rng.normal(size=n)
    if n_classes == 2:
        label = np.where(score > 0, "tumor", "normal")
    else:
        score2 = signal * z[:, 2] + 0.5 * rng.normal(size=n)
        label = np.where(score > 0.4, "A", np.where(score2 > 0, "B", "C"))
    t_event = rng.exponential(1.0 / np.exp(1.2 * z[:, 1]))
    t_cens = rng.exponential(2.0, size=n)
    emb = SlideEmbeddings(tuple(ids), x.astype(np.float32), {"source": "synthetic"})
    table = pd.DataFrame({"slide_id": ids, "label": label,
                          "time": np.minimum(t_event, t_cens),
                          "event": (t_event <= t_cens).astype(int)})
    return emb, table


@pytest.fixture(scope="session")
def cohort():
    return make_cohort()


@pytest.fixture(scope="session")
def cohort3():
    return make_cohort(n_patients=90, n_classes=3, seed=1)

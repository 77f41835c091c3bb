"""float16 features in the store give the same linear-probe result as float32 (within noise)."""

from __future__ import annotations

import numpy as np
import pytest


def _crops(data_dir, per_class=30, size=64, seed=0):
    """Random crops (with flips) of the real NCT-CRC-HE tiles; label = tissue class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = sorted((data_dir / "tiles" / "nct_crc_he_100k").glob("*.*"))
    def cls(f):  # "ADI-AAQEFMRI.tif" -> ADI; "CRC-VAL-HE-7K-NORM-...tif" -> NORM
        parts = f.stem.split("-")
        return parts[4] if f.stem.startswith("CRC-VAL-HE-7K-") else parts[0]

    classes = sorted({cls(f) for f in files})
    assert len(classes) >= 5, classes
    x, y = [], []
    for f in files:
        label = classes.index(cls(f))
        img = np.asarray(Image.open(f).convert("RGB"))
        for _ in range(per_class):
            r, c = rng.integers(0, img.shape[0] - size, 2)
            crop = img[r:r + size, c:c + size]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            x.append(np.ascontiguousarray(crop))
            y.append(label)
    return np.stack(x), np.asarray(y)


def test_float16_store_matches_float32_linear_probe(data_dir, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from wsi_ssl.encoders import create_encoder
    from wsi_ssl.store import TileStore

    tiles, labels = _crops(data_dir)
    enc = create_encoder("tiny-cnn", device="cpu")
    feats = np.concatenate([enc.embed(tiles[i:i + 64]).numpy() for i in range(0, len(tiles), 64)])
    coords = np.stack([np.arange(len(feats)), np.zeros(len(feats), int)], 1) * 64
    preds, accs, stored = {}, {}, {}
    for dtype in ("float16", "float32"):
        store = TileStore(tmp_path / f"{dtype}.zarr")
        store.bind_encoder(enc.name, enc.fingerprint, enc.embed_dim)
        store.write_slide("crops", feats, coords, dtype=dtype)
        x = store["crops"].features
        assert x.dtype == np.dtype(dtype)
        stored[dtype] = x
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500))
        cv = StratifiedKFold(5, shuffle=True, random_state=0)
        with threadpool_limits(1):  # BLAS threads fight over shared CPUs for a 300 x 64 problem
            preds[dtype] = cross_val_predict(clf, x.astype(np.float32), labels, cv=cv)
        accs[dtype] = float((preds[dtype] == labels).mean())
    chance = 1 / len(np.unique(labels))
    assert accs["float32"] > chance + 0.3, accs  # the probe learns something real
    assert abs(accs["float16"] - accs["float32"]) <= 0.02, accs
    assert (preds["float16"] == preds["float32"]).mean() >= 0.97
    # and the stored values themselves: float16 rounding only (relative error < 1e-3)
    np.testing.assert_allclose(stored["float16"], feats, rtol=1e-3, atol=1e-4)
    assert stored["float16"].nbytes * 2 == pytest.approx(stored["float32"].nbytes)

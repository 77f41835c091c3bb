"""MILClassifier: learning on seeded bags, determinism, the TileStore path and input errors."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_ssl.errors import ConfigError, InputError, LabelError, NotFittedError
from wsi_ssl.mil import MILClassifier

pytestmark = pytest.mark.usefixtures("single_thread_torch")

D = 8


def make_bags(n_bags: int, n_classes: int = 2, seed: int = 0):
    """Class c > 0 bags hide 1-2 'key' tiles shifted along axis c-1; class 0 has none.
    Returns bags, labels and the key-tile index of every bag (-1 when none)."""
    rng = np.random.default_rng(seed)
    bags, y, keys = [], [], []
    for i in range(n_bags):
        c = i % n_classes
        n = int(rng.integers(5, 15))
        b = rng.normal(0, 1, (n, D)).astype(np.float32)
        k = -1
        if c > 0:
            k = int(rng.integers(0, n))
            b[k, c - 1] += 4.0
        bags.append(b)
        y.append(c)
        keys.append(k)
    return bags, np.array(y), np.array(keys)


FAST = dict(embed_dim=16, epochs=25, lr=5e-3, batch_size=8, device="cpu")


def test_binary_learns_and_attends_to_the_key_tile():
    bags, y, keys = make_bags(120, seed=0)
    labels = np.where(y == 1, "tumour", "normal")
    clf = MILClassifier(head="abmil", **FAST).fit(bags[:80], labels[:80])
    assert list(clf.classes_) == ["normal", "tumour"]
    proba = clf.predict_proba(bags[80:])
    assert proba.shape == (40, 2) and np.allclose(proba.sum(1), 1, atol=1e-5)
    acc = (clf.predict(bags[80:]) == labels[80:]).mean()
    assert acc > 0.85, acc
    pos = [i for i in range(80, 120) if keys[i] >= 0]
    hits = [int(np.argmax(clf.attention(bags[i])) == keys[i]) for i in pos]
    assert np.mean(hits) > 0.8
    att = clf.attention(bags[pos[0]])
    assert att.shape == (len(bags[pos[0]]),) and abs(att.sum() - 1) < 1e-4


@pytest.mark.parametrize("head", ["gated_abmil", "dsmil", "mean"])
def test_multiclass(head: str):
    bags, y, _ = make_bags(150, n_classes=3, seed=1)
    clf = MILClassifier(head=head, **FAST).fit(bags[:105], y[:105])
    assert clf.predict_proba(bags[105:]).shape == (45, 3)
    acc = (clf.predict(bags[105:]) == y[105:]).mean()
    # chance is 1/3; mean pooling dilutes the key tile, so its bar is lower
    assert acc > (0.6 if head == "mean" else 0.8), acc


def test_deterministic_with_a_seed():
    bags, y, _ = make_bags(40, seed=2)
    kw = dict(FAST, epochs=5, dropout=0.2)
    p1 = MILClassifier(seed=3, **kw).fit(bags, y).predict_proba(bags)
    p2 = MILClassifier(seed=3, **kw).fit(bags, y).predict_proba(bags)
    p3 = MILClassifier(seed=4, **kw).fit(bags, y).predict_proba(bags)
    np.testing.assert_array_equal(p1, p2)
    assert not np.allclose(p1, p3)


def test_early_stopping_stops_after_patience_and_restores_the_best_weights():
    """Random labels: the validation loss bottoms out early and then rises as the head memorises
    the training bags, so training stops ``patience`` epochs after its best epoch and the kept
    weights give exactly the best validation loss."""
    import torch

    bags, _, _ = make_bags(60, seed=3)
    y = np.random.default_rng(0).integers(0, 2, len(bags))
    patience = 3
    clf = MILClassifier(early_stopping=patience, **dict(FAST, epochs=60, lr=2e-2)).fit(bags, y)
    val = clf.validation_indices_
    assert len(val) == 12 and all("val_loss" in h for h in clf.history_)
    losses = [h["val_loss"] for h in clf.history_]
    assert clf.n_epochs_ < 60  # it stopped early
    assert clf.best_epoch_ == int(np.argmin(losses)) + 1
    assert clf.n_epochs_ == clf.best_epoch_ + patience
    assert min(losses) < losses[-1] - 1e-3  # the last epoch is worse than the best one
    # the fitted head is the best epoch's, not the last one's: recompute its validation loss
    p = clf.predict_proba([bags[i] for i in val])
    train = np.setdiff1d(np.arange(len(y)), val)
    w = torch.tensor(len(train) / (2 * np.bincount(y[train], minlength=2)), dtype=torch.float32)
    vl = torch.nn.functional.cross_entropy(torch.log(torch.from_numpy(p).clamp_min(1e-12)),
                                           torch.as_tensor(y[val]), weight=w)
    assert float(vl) == pytest.approx(min(losses), abs=1e-5)
    assert float(vl) < losses[-1] - 1e-3


def test_without_early_stopping_every_epoch_runs():
    bags, y, _ = make_bags(30, seed=3)
    clf = MILClassifier(**dict(FAST, epochs=7)).fit(bags, y)
    assert clf.n_epochs_ == 7 == clf.best_epoch_ and len(clf.validation_indices_) == 0
    assert all("val_loss" not in h for h in clf.history_)


def test_tilestore_and_coordinate_aware_head(tmp_path):
    """A real zarr TileStore (level-0 coords -> grid units) with the sparseconv head."""
    from wsi_ssl.store import TileStore

    bags, y, _ = make_bags(40, seed=4)
    store = TileStore(tmp_path / "tiles.zarr", mode="a")
    store.bind_encoder("synthetic", "synthetic-fp", D)
    ids = []
    for i, b in enumerate(bags):
        sid = f"slide-{i:02d}"
        coords = np.stack([np.arange(len(b)) % 4, np.arange(len(b)) // 4], 1) * 448 + 1000
        store.write_slide(sid, b, coords.astype(np.int64), attrs={"stride_level0": 448})
        ids.append(sid)
    clf = MILClassifier(head="sparseconv", **FAST).fit(store, y, slide_ids=ids)
    acc = (clf.predict(store, slide_ids=ids) == y).mean()
    assert acc > 0.8, acc
    with pytest.raises(InputError, match="slide_ids: .*'slide-99'"):
        clf.predict(store, slide_ids=["slide-99"])
    with pytest.raises(InputError, match="pass slide_ids"):
        clf.predict(store)
    with pytest.raises(InputError, match="coordinate-aware"):
        MILClassifier(head="sparseconv", **FAST).fit(bags, y)


def test_not_fitted_and_bad_input():
    bags, y, _ = make_bags(10, seed=5)
    clf = MILClassifier(**FAST)
    with pytest.raises(NotFittedError, match="not fitted"):
        clf.predict(bags)
    with pytest.raises(InputError, match=r"bag 1 is empty"):
        clf.fit([bags[0], np.zeros((0, D))] + bags[2:], y)
    with pytest.raises(InputError, match=r"bag 2 has feature dim 5, expected 8"):
        clf.fit(bags[:2] + [np.ones((3, 5))] + bags[3:], y)
    bad = [b.copy() for b in bags]
    bad[3][1, 2] = np.nan
    with pytest.raises(InputError, match=r"bag 3 contains NaN or inf"):
        clf.fit(bad, y)
    with pytest.raises(LabelError, match="one class only"):
        clf.fit(bags, np.zeros(len(bags)))
    with pytest.raises(LabelError, match="9 bags"):
        clf.fit(bags[:9], y)
    with pytest.raises(ConfigError, match="epochs=0"):
        MILClassifier(epochs=0).fit(bags, y)
    clf.fit(bags, y)
    with pytest.raises(InputError, match="feature dim 3, expected 8"):
        clf.predict([np.ones((2, 3))])


def test_save_load_round_trip_with_string_labels(tmp_path):
    from wsi_ssl.errors import WeightsError

    bags, y, _ = make_bags(30, seed=6)
    labels = np.where(y == 1, "tumour", "normal")
    clf = MILClassifier("gated_abmil", **dict(FAST, epochs=3), early_stopping=2).fit(bags, labels)
    out = clf.save(tmp_path / "clf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = MILClassifier.load(out)
    assert loaded.get_params() == clf.get_params() and loaded.classes_.tolist() == [
        "normal", "tumour"]
    np.testing.assert_array_equal(loaded.predict_proba(bags), clf.predict_proba(bags))
    assert (loaded.predict(bags) == clf.predict(bags)).all()
    np.testing.assert_array_equal(loaded.validation_indices_, clf.validation_indices_)
    assert loaded.history_ == clf.history_ and loaded.best_epoch_ == clf.best_epoch_
    with pytest.raises(WeightsError, match="not a MILClassifier directory"):
        MILClassifier.load(tmp_path)
    with pytest.raises(NotFittedError):
        MILClassifier().save(tmp_path / "nothing")

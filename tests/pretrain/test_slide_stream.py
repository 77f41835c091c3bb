"""The streaming data path of SlideSSL on real format-2 zarr stores: setup from slide statistics
only, each step reading only the bank versions its views use, readers that do not change the
results, a bounded coordinate cache, read-only stores left untouched, and the ``"auto"``
settings resolved inside ``fit``."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone

from tests.pretrain.test_slide_ssl import DIM, small, write_store
from wsi_ssl.errors import ConfigError, StoreFormatError
from wsi_ssl.pretrain import SlideSSL, mean_pool_embeddings
from wsi_ssl.pretrain._slide_data import load_cohort, ordered_map
from wsi_ssl.store import TileStore

pytestmark = pytest.mark.usefixtures("single_thread_torch")

N, TILES, V, T = 10, 40, 6, 12


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("stream") / "s.zarr", n=N, tiles=TILES, views=V,
                       view_tiles=T)[0]


def _shard_files(path: Path, array: str) -> list[Path]:
    """The data files (not zarr.json) of ``array`` in every slide group."""
    return [p for p in (path / "slides").glob(f"*/{array}/**/*")
            if p.is_file() and p.name != "zarr.json"]


@pytest.fixture(scope="module")
def no_features(store, tmp_path_factory):
    """A copy of ``store`` whose clean-feature shards are deleted: reading them raises."""
    path = tmp_path_factory.mktemp("planted") / "s.zarr"
    shutil.copytree(store.path, path)
    lost = _shard_files(path, "features")
    assert lost, "the store layout changed: no features shard found to delete"
    for p in lost:
        p.unlink()
    return TileStore(path, mode="r")


def _kw(**kw):
    return dict(dict(tiles_per_view=8, batch_size=4, epochs=2, embed_dim=16, proj_dims=(16, 8)),
                **kw)


def test_training_reads_only_the_versions_its_views_use(no_features):
    st = no_features
    with pytest.raises(StoreFormatError, match="damaged|unreadable"):  # the plant works
        st.read_features(st.slide_ids[0])
    calls: list[tuple[str, list[int]]] = []
    read_views = st.read_views

    def counted(sid, versions):
        calls.append((sid, list(versions)))
        return read_views(sid, versions)

    def refuse(*a, **k):
        raise AssertionError("training read clean features")

    st.read_views, st.read_features = counted, refuse
    try:
        m = small("sparseconv", **_kw()).fit(st)  # coordinate-aware: reads coords, not features
    finally:
        del st.read_views, st.read_features
    steps = 2 * (N // 4)
    assert len(calls) == steps * 4  # one call per slide of each batch
    assert all(1 <= len(v) <= 2 and len(set(v)) == len(v) for _, v in calls)
    rs = m.read_stats_
    assert rs.view_reads == len(calls) and rs.versions_read == sum(len(v) for _, v in calls)
    assert rs.view_bytes == rs.versions_read * T * (DIM * 4 + 8)  # float32 bank + int64 index
    assert rs.coords_reads == N and rs.coords_bytes == N * TILES * 16  # cached after the 1st
    assert np.isfinite(m.history_).all() and len(m.history_) == 2
    m2 = small("abmil", **_kw()).fit(st)  # a head that ignores coordinates reads none
    assert m2.read_stats_.coords_reads == 0


def test_setup_and_mean_pooling_use_statistics_only(store, no_features):
    """load_cohort and mean_pool_embeddings work without the features shards, and give the
    mean/std and means of the data."""
    cohort = load_cohort(no_features)
    feats = [store[s].features.astype(np.float64) for s in store.slide_ids]
    allf = np.concatenate(feats)
    np.testing.assert_allclose(cohort.mean, allf.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cohort.std, np.sqrt(allf.var(0) + 1e-6), rtol=1e-5)
    assert cohort.bank_tiles == T and list(cohort.n_versions) == [V] * N
    emb = mean_pool_embeddings(no_features)
    np.testing.assert_allclose(emb.embeddings, np.stack([f.mean(0) for f in feats]), rtol=1e-5,
                               atol=1e-6)


def test_same_results_with_0_1_and_4_readers(store):
    runs = [small("sparseconv", **_kw(readers=r, epochs=3)).fit(store) for r in (0, 1, 4)]
    for m in runs[1:]:
        assert m.history_ == runs[0].history_  # bit-identical
    embs = [m.transform(store, dtype="float32").embeddings for m in runs]
    for e in embs[1:]:
        np.testing.assert_array_equal(e, embs[0])


def test_coordinate_cache_is_bounded_and_does_not_change_results(store):
    one = TILES * 2 * 4  # grid-unit float32 coordinates of one slide
    big = small("sparseconv", **_kw()).fit(store)
    tight = small("sparseconv", **_kw(cache_bytes=3 * one)).fit(store)
    assert tight.history_ == big.history_
    assert 0 < tight.read_stats_.coords_cache_peak <= 3 * one
    assert tight.read_stats_.coords_reads > N  # evicted and read again
    assert big.read_stats_.coords_reads == N and big.read_stats_.coords_cache_peak == N * one


def test_ordered_map_keeps_order_bounds_lookahead_and_raises_in_order():
    started: list[int] = []

    def fn(i):
        started.append(i)
        return i * i

    it = ordered_map(fn, range(50), readers=3)
    assert next(it) == 0
    assert len(started) <= 3 + 2  # readers + 1 in flight, plus the one submitted after item 0
    assert list(it) == [i * i for i in range(1, 50)]

    def boom(i):
        if i == 3:
            raise ValueError("bad item 3")
        return i

    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for v in ordered_map(boom, range(10), readers=2):
            got.append(v)
    assert got == [0, 1, 2]
    with pytest.raises(ConfigError, match="readers=-1"):
        list(ordered_map(boom, range(3), readers=-1))


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in [path, *path.rglob("*")]}


def test_training_on_a_read_only_store_writes_nothing(store, tmp_path):
    """Training and encoding on a read-only copy (one slide without stored statistics, so they
    are computed in memory) leave every file and folder as it was and create none (we may run
    as root, for whom chmod does not block writes: the snapshot is the check)."""
    path = tmp_path / "ro.zarr"
    shutil.copytree(store.path, path)
    sid = sorted(os.listdir(path / "slides"))[0]
    meta_path = path / "slides" / sid / "features" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    assert meta["attributes"].pop("stats")  # the layout changed if this fails
    meta_path.write_text(json.dumps(meta))
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = _snapshot(path)
    try:
        ro = TileStore(path, mode="r")
        m = small("sparseconv", **_kw()).fit(ro)
        e = m.transform(ro)
        assert len(e) == N and sid in m.slide_ids_
    finally:
        after = _snapshot(path)
        for p in [path, *path.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert after == before


# -- "auto" settings ------------------------------------------------------------------------------
def test_auto_settings_small_cohort_and_capped_k(store, caplog, tmp_path):
    """10 slides, a bank of 12 tiles per version: the small-cohort branch, k capped at 12."""
    import logging

    m = SlideSSL("abmil", tiles_per_view="auto", batch_size="auto", epochs=1, lr="auto",
                 temperature="auto", embed_dim=16, proj_dims=(16, 8), device="cpu")
    twin = clone(m)
    assert twin.get_params() == m.get_params()
    with caplog.at_level(logging.INFO, logger="wsi_ssl.pretrain._slide_ssl"):
        m.fit(store)
    assert (m.tiles_per_view_, m.batch_size_, m.epochs_, m.lr_, m.temperature_) == \
        (12, 8, 1, 1e-3, 0.1)
    assert m.tiles_per_view == "auto" and m.get_params() == twin.get_params()
    assert "capped at the bank's 12 tiles" in m.settings_reason_
    assert "tiles_per_view=12 (auto)" in caplog.text and "epochs=1 (given)" in caplog.text
    loaded = SlideSSL.load(m.save(tmp_path / "auto_model"))
    assert (loaded.tiles_per_view, loaded.tiles_per_view_) == ("auto", 12)
    np.testing.assert_array_equal(loaded.transform(store).embeddings,
                                  m.transform(store).embeddings)


def test_auto_k_is_64_when_the_bank_is_larger(tmp_path):
    st, _ = write_store(tmp_path / "big_bank.zarr", n=3, tiles=30, views=2, view_tiles=80)
    m = small("abmil", tiles_per_view="auto", epochs=1).fit(st)
    assert m.tiles_per_view_ == 64 and "capped" not in m.settings_reason_
    assert m.batch_size_ == 3  # given 16, clamped to the cohort


@pytest.mark.slow
def test_auto_large_cohort_keeps_the_paper_settings(tmp_path):
    """1,001 slides (> SMALL_COHORT): the paper's batch, lr and temperature, k capped at T."""
    from wsi_ssl.pretrain._presets import SMALL_COHORT

    n = SMALL_COHORT + 1
    rng = np.random.default_rng(0)
    st = TileStore(tmp_path / "many.zarr", mode="a")
    st.bind_encoder("e", "fp-e", 4)
    with st.lock():
        for i in range(n):
            f = rng.normal(size=(3, 4)).astype(np.float32)
            st.write_slide(f"s{i:04d}", f, np.array([[0, 0], [1, 0], [0, 1]]) * 224,
                           views=f[None, [0, 2]], view_index=np.array([[0, 2]]),
                           dtype="float32")
    m = SlideSSL("abmil", tiles_per_view="auto", batch_size="auto", epochs=1, lr="auto",
                 temperature="auto", embed_dim=8, proj_dims=(8, 4), device="cpu",
                 warmup_epochs=0).fit(st)
    assert (m.tiles_per_view_, m.batch_size_, m.lr_, m.temperature_) == (2, 256, 0.03, 0.05)
    assert "beyond the measured cohorts" in m.settings_reason_ and len(m.history_) == 1


def test_explicit_k_above_the_bank_and_bad_auto_values_are_refused(store):
    with pytest.raises(ConfigError, match=r"tiles_per_view=13 is larger than the view bank.*"
                                          r"\(12 tiles per augmented version\).*'auto'"):
        small(tiles_per_view=13).fit(store)
    with pytest.raises(ConfigError, match=r"^SlideSSL\(tiles_per_view='Auto'\) must be an "
                                          r"integer >= 1 or 'auto'\.$"):
        small(tiles_per_view="Auto").fit(store)
    with pytest.raises(ConfigError, match=r"^SlideSSL\(lr=-1\) must be a number > 0 or 'auto'"):
        small(lr=-1).fit(store)

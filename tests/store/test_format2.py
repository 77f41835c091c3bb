"""Format 2: sharded arrays (a handful of files per slide), statistics at write time and the
partial reads slide SSL and transform are built on (read_views / read_features / read_coords)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zarr

from wsi_ssl.errors import InputError
from wsi_ssl.store import SlideStats, TileStore


def _bank(rng, n=30, d=8, v=5, t=6, dtype=np.float32):
    feats = rng.normal(size=(n, d)).astype(dtype)
    coords = rng.integers(0, 50_000, (n, 2))
    vidx = rng.integers(0, n, (v, t))
    views = (feats[vidx] + 0.1 * rng.normal(size=(v, t, d))).astype(dtype)
    return feats, coords, views, vidx


@pytest.fixture()
def store(tmp_path) -> TileStore:
    s = TileStore(tmp_path / "s.zarr")
    s.bind_encoder("enc", "fp", 8)
    return s


def _entries(path) -> int:
    return 1 + sum(len(d) + len(f) for _, d, f in os.walk(path))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_every_array_and_empty_cases_plain_zarr_reads_it(store, dtype):
    rng = np.random.default_rng(0)
    feats, coords, views, vidx = _bank(rng)
    store.write_slide("full", feats, coords, views=views, view_index=vidx, dtype=dtype)
    store.write_slide("noviews", feats[:7], coords[:7], dtype=dtype)
    store.write_slide("empty", np.zeros((0, 8)), np.zeros((0, 2)), dtype=dtype)
    for sid, n, v in (("full", 30, 5), ("noviews", 7, 0), ("empty", 0, 0)):
        rec = store[sid]
        assert rec.features.dtype == np.dtype(dtype) and rec.features.shape == (n, 8)
        np.testing.assert_array_equal(rec.features, feats[:n].astype(dtype))
        np.testing.assert_array_equal(rec.coords, coords[:n])
        assert rec.coords.dtype == rec.view_index.dtype == np.int64
        assert rec.views.shape == ((5, 6, 8) if v else (0, 0, 8))
        assert rec.view_index.shape == ((5, 6) if v else (0, 0))
    np.testing.assert_array_equal(store["full"].views, views.astype(dtype))
    np.testing.assert_array_equal(store["full"].view_index, vidx)
    # <= 12 files and folders per slide, the group folder and every zarr.json included
    assert _entries(store.path / "slides" / "full") == 11
    assert _entries(store.path / "slides" / "empty") <= 8
    # plain zarr reads everything, as documented in docs/store-format.md
    root = zarr.open_group(str(store.path), mode="r")
    g = root["slides/full"]
    assert g.attrs["complete"] is True and g.attrs["format_version"] == 2
    np.testing.assert_array_equal(g["features"][:], feats.astype(dtype))
    np.testing.assert_array_equal(g["views"][:], views.astype(dtype))
    assert g["views"].chunks == (1, 6, 8) and g["views"].shards == (5, 6, 8)
    idx = g["index"][:]
    n, (a, b, shape) = g.attrs["n_tiles"], g["index"].attrs["view_index"]
    np.testing.assert_array_equal(idx[: 2 * n].reshape(n, 2), coords)
    np.testing.assert_array_equal(idx[a:b].reshape(shape), vidx)
    assert sorted(k for k, _ in root["slides"].groups()) == ["empty", "full", "noviews"]


def test_partial_reads(store):
    rng = np.random.default_rng(1)
    feats, coords, views, vidx = _bank(rng)
    store.write_slide("s", feats, coords, views=views, view_index=vidx, dtype="float32")
    got, gidx = store.read_views("s", [4, 0, 4])
    np.testing.assert_array_equal(got, views[[4, 0, 4]])
    np.testing.assert_array_equal(gidx, vidx[[4, 0, 4]])
    assert gidx.dtype == np.int64
    e, ei = store.read_views("s", [])
    assert e.shape == (0, 6, 8) and ei.shape == (0, 6)
    np.testing.assert_array_equal(store.read_features("s"), feats)
    np.testing.assert_array_equal(store.read_features("s", np.array([29, 3, 3])), feats[[29, 3, 3]])
    np.testing.assert_array_equal(store.read_coords("s"), coords)
    with pytest.raises(InputError, match=r"has 5 bank versions; versions must be in \[0, 5\)"):
        store.read_views("s", [5])
    with pytest.raises(InputError, match=r"rows must be in \[0, 30\)"):
        store.read_features("s", [30])
    with pytest.raises(KeyError, match="'nope' is not a complete slide"):
        store.read_views("nope", [0])


def test_read_views_touches_only_its_inner_chunks(store):
    """A planted slide: clean features and the other versions are garbage on disk, so any read
    of them fails; read_views of versions 1 and 3 must still work."""
    rng = np.random.default_rng(2)
    feats, coords, views, vidx = _bank(rng, n=12, v=5, t=4)
    store.write_slide("s", feats, coords, views=views, view_index=vidx, dtype="float32")
    d = store.path / "slides" / "s"
    # zero every byte of the views shard except the inner chunks of versions 1 and 3 and the
    # shard index (the last 16 * 5 + 4 bytes); overwrite the features shard with garbage
    raw = bytearray((d / "views" / "c.0.0.0").read_bytes())
    chunk = 4 * 8 * 4
    keep = {1, 3}
    for v in range(5):
        if v not in keep:
            raw[v * chunk:(v + 1) * chunk] = b"\xff" * chunk  # NaN patterns, same size
    (d / "views" / "c.0.0.0").write_bytes(bytes(raw))
    size = (d / "features" / "c.0.0").stat().st_size
    (d / "features" / "c.0.0").write_bytes(b"\x00" * size)
    got, gidx = store.read_views("s", [3, 1])
    np.testing.assert_array_equal(got, views[[3, 1]])
    np.testing.assert_array_equal(gidx, vidx[[3, 1]])
    assert np.isnan(store.array("s", "views")[0]).all()  # the rest really is garbage
    with pytest.raises(Exception, match="unreadable"):
        store.read_features("s")


def test_stats_recorded_at_write_time(store):
    rng = np.random.default_rng(3)
    feats, coords, views, vidx = _bank(rng, dtype=np.float16)
    store.write_slide("s", feats, coords, views=views, view_index=vidx)
    st = store.slide_stats("s")
    assert isinstance(st, SlideStats) and st.all_finite
    assert (st.n_tiles, st.n_views, st.view_tiles, st.dim) == (30, 5, 6, 8)
    f64, v64 = feats.astype(np.float64), views.reshape(-1, 8).astype(np.float64)
    for got, want in ((st.features_sum, f64.sum(0)), (st.features_sumsq, (f64 ** 2).sum(0)),
                      (st.views_sum, v64.sum(0)), (st.views_sumsq, (v64 ** 2).sum(0))):
        assert got.dtype == np.float64 and got.shape == (8,)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # metadata only: the stats survive the arrays being unreadable
    (store.path / "slides" / "s" / "views" / "c.0.0.0").write_bytes(b"x")
    assert TileStore(store.path, mode="r").slide_stats("s") == st
    # stats are small: the JSON read by a run's setup
    assert (store.path / "slides" / "s" / "features" / "zarr.json").stat().st_size < 8000
    bad = feats.copy()
    bad[3, 2] = np.nan
    store.write_slide("nan", bad, coords)
    assert not store.slide_stats("nan").all_finite
    assert store.slide_attrs("nan")["all_finite"] is False


def test_stats_of_a_slide_without_them_computed_once_and_cached(store, tmp_path):
    rng = np.random.default_rng(4)
    feats, coords, views, vidx = _bank(rng)
    store.write_slide("s", feats, coords, views=views, view_index=vidx)
    want = store.slide_stats("s")
    meta_path = store.path / "slides" / "s" / "features" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["stats"]
    meta_path.write_text(json.dumps(meta))
    # read-only store: computed in memory, nothing written
    ro = TileStore(store.path, mode="r")
    got = ro.slide_stats("s")
    np.testing.assert_array_equal(got.views_sumsq, want.views_sumsq)
    assert "stats" not in json.loads(meta_path.read_text())["attributes"]
    # read-only filesystem, store opened for writing: computed in memory, never fails
    with _read_only(store.path):
        np.testing.assert_array_equal(TileStore(store.path).slide_stats("s").features_sum,
                                      want.features_sum)
    assert "stats" not in json.loads(meta_path.read_text())["attributes"]


@contextlib.contextmanager
def _read_only(path):
    """``path`` on a read-only file system: a read-only bind mount as root (root ignores
    permission bits), else the write permission removed from every folder."""
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot bind-mount as root here: {done.stderr.decode().strip()}")
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
            assert not os.access(path, os.W_OK) or _cannot_write(path)
            yield
        finally:
            subprocess.run(["umount", str(path)], check=True)
        return
    dirs = [p for p in [path, *path.rglob("*")] if p.is_dir()]
    for d in dirs:
        os.chmod(d, stat.S_IRUSR | stat.S_IXUSR)
    try:
        yield
    finally:
        for d in dirs:
            os.chmod(d, stat.S_IRWXU)


def _cannot_write(path) -> bool:
    try:
        (path / ".probe").write_text("x")
    except OSError:
        return True
    (path / ".probe").unlink()
    return False


def test_stats_cached_under_the_lock_when_writable(store):
    rng = np.random.default_rng(5)
    feats, coords, views, vidx = _bank(rng)
    store.write_slide("s", feats, coords, views=views, view_index=vidx)
    want = store.slide_stats("s")
    meta_path = store.path / "slides" / "s" / "features" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["stats"]
    meta_path.write_text(json.dumps(meta))
    got = TileStore(store.path).slide_stats("s")
    np.testing.assert_array_equal(got.features_sumsq, want.features_sumsq)
    assert json.loads(meta_path.read_text())["attributes"]["stats"]["n_tiles"] == 30
    assert not (store.path / ".lock").exists()


def test_reads_from_many_threads(store):
    rng = np.random.default_rng(6)
    data = {}
    for i in range(80):  # more slides than the open-slide cache holds
        feats, coords, views, vidx = _bank(rng, n=10, v=3, t=4)
        store.write_slide(f"s{i}", feats, coords, views=views, view_index=vidx, dtype="float32")
        data[f"s{i}"] = (views, vidx)
    reader = TileStore(store.path, mode="r")

    def work(k):
        sid = f"s{k % 80}"
        v, i = reader.read_views(sid, [k % 3])
        st = reader.slide_stats(sid)
        return (np.array_equal(v[0], data[sid][0][k % 3]) and np.array_equal(i[0], data[sid][1][k % 3])
                and st.n_tiles == 10)

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(400)))
    assert len(reader._handles) <= 64


def test_shards_are_byte_identical_to_what_zarr_writes(store):
    """write_slide writes shard files and metadata directly (no zarr call per commit): they are
    the bytes and the metadata zarr-python writes for the same array."""
    rng = np.random.default_rng(7)
    feats, coords, views, vidx = _bank(rng, n=1000, d=8, v=3, t=5, dtype=np.float16)
    store.write_slide("s", feats, coords, views=views, view_index=vidx)
    d = store.path / "slides" / "s"
    ref = zarr.open_group(str(store.path.parent / "ref.zarr"), mode="w")
    for name in ("features", "views", "index"):
        mine = zarr.open_array(str(d / name), mode="r")
        data = mine[...]
        other = ref.create_array(name, shape=mine.shape, dtype=mine.dtype, chunks=mine.chunks,
                                 shards=mine.shards, compressors=None,
                                 chunk_key_encoding={"name": "default", "separator": "."},
                                 config={"write_empty_chunks": True})
        other[...] = data
        key = "c." + ".".join("0" * mine.ndim)
        assert (d / name / key).read_bytes() == (store.path.parent / "ref.zarr" / name / key
                                                 ).read_bytes()
        want = json.loads((store.path.parent / "ref.zarr" / name / "zarr.json").read_text())
        got = json.loads((d / name / "zarr.json").read_text())
        got.pop("attributes"), want.pop("attributes")
        assert got == want


def test_stats_in_memory_while_another_process_writes(store, tmp_path):
    import subprocess
    import sys
    import textwrap

    rng = np.random.default_rng(8)
    feats, coords, views, vidx = _bank(rng)
    store.write_slide("s", feats, coords, views=views, view_index=vidx)
    want = store.slide_stats("s")
    meta_path = store.path / "slides" / "s" / "features" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["stats"]
    meta_path.write_text(json.dumps(meta))
    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent("""
        import sys
        from wsi_ssl.store import TileStore
        with TileStore(sys.argv[1]).lock(command="holder"):
            print("HELD", flush=True)
            sys.stdin.readline()
    """))
    proc = subprocess.Popen([sys.executable, str(script), str(store.path)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "HELD"
        got = TileStore(store.path).slide_stats("s")  # a whole run holds the lock: no wait
        np.testing.assert_array_equal(got.views_sum, want.views_sum)
        assert "stats" not in json.loads(meta_path.read_text())["attributes"]
    finally:
        proc.communicate("\n", timeout=60)


def test_info_verify_subset_from_a_file_in_threads(store, tmp_path, capsys):
    from wsi_ssl.cli import main

    rng = np.random.default_rng(9)
    for sid in ("a", "b", "c"):
        feats, coords, views, vidx = _bank(rng)
        store.write_slide(sid, feats, coords, views=views, view_index=vidx)
    (store.path / "slides" / "c" / "views" / "c.0.0.0").unlink()
    ids = tmp_path / "ids.txt"
    ids.write_text("# slides to check\na\nb\n")
    assert main(["info", str(store.path), "--verify", "--slides", str(ids), "--threads",
                 "2"]) == 0
    assert "verify         2 slides checked, 0 damaged" in capsys.readouterr().out
    assert main(["info", str(store.path), "--verify", "--slides", "b", "c"]) == 1
    out = capsys.readouterr().out
    assert "2 slides checked, 1 damaged" in out and "damaged: c" in out
    assert "views: shard file views/c.0.0.0 missing" in out
    assert main(["info", str(store.path), "--slides", "a"]) == 0
    out = capsys.readouterr().out
    assert "\na " in out and "\nb " not in out


def test_other_layouts_are_read_through_zarr(store):
    """The direct reader handles what write_slide writes; an array rewritten by another tool
    (here: zarr with zstd-compressed inner chunks) is still read correctly, through zarr."""
    from zarr.codecs import ZstdCodec

    rng = np.random.default_rng(10)
    feats, coords, views, vidx = _bank(rng, n=50, v=4, t=3)
    store.write_slide("s", feats, coords, views=views, view_index=vidx, dtype="float32")
    d = store.path / "slides" / "s"
    g = zarr.open_group(str(d), mode="r+")
    old = g["views"]
    del g["views"]
    new = g.create_array("views", shape=old.shape, dtype=old.dtype, chunks=(1, 3, 8),
                         shards=(4, 3, 8), compressors=ZstdCodec(level=3),
                         chunk_key_encoding={"name": "default", "separator": "."})
    new[...] = views
    attrs = dict(g.attrs)
    attrs["shards"]["views/c.0.0.0"] = (d / "views" / "c.0.0.0").stat().st_size
    g.attrs.update(attrs)
    fresh = TileStore(store.path, mode="r")
    got, gidx = fresh.read_views("s", [2, 0])
    np.testing.assert_array_equal(got, views[[2, 0]])
    np.testing.assert_array_equal(gidx, vidx[[2, 0]])
    assert fresh._handle("s").raw("views") is None and fresh._handle("s").raw("features")
    assert fresh.verify().ok

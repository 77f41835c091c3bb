"""TileStore: the zarr v3 format, atomic writes, encoder binding, failures, h5 import/export."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import zarr

from wsi_ssl.errors import EncoderMismatchError, InputError, StoreError, StoreFormatError
from wsi_ssl.store import STORE_FORMAT_VERSION, SlideRecord, StoreSummary, TileStore

STAMP_H5 = "features/TCGA-AD-6964-01Z-00-DX1/features.h5"


def _slide(rng, n=20, d=8, v=3, t=5):
    feats = rng.normal(size=(n, d)).astype(np.float32)
    coords = rng.integers(0, 10_000, (n, 2))
    vidx = rng.integers(0, n, (v, t))
    views = rng.normal(size=(v, t, d)).astype(np.float32)
    return feats, coords, views, vidx


@pytest.fixture()
def store(tmp_path) -> TileStore:
    s = TileStore(tmp_path / "s.zarr")
    s.bind_encoder("enc-a", "fp-a", 8)
    return s


def test_write_read_roundtrip_and_format(store, tmp_path):
    rng = np.random.default_rng(0)
    feats, coords, views, vidx = _slide(rng)
    store.write_slide("s1", feats, coords, views=views, view_index=vidx,
                      attrs={"mpp": 0.5, "tile_size": 224})
    store.write_slide("s0", feats[:3], coords[:3])
    assert store.slide_ids == ["s0", "s1"] and len(store) == 2 and "s1" in store
    rec = store["s1"]
    assert isinstance(rec, SlideRecord) and len(rec) == 20 and rec.n_views == 3
    assert rec.features.dtype == np.float16 and rec.coords.dtype == np.int64
    np.testing.assert_allclose(rec.features, feats, atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(rec.coords, coords)
    np.testing.assert_array_equal(rec.view_index, vidx)
    np.testing.assert_allclose(rec.views, views, atol=2e-3, rtol=2e-3)
    assert rec.attrs["complete"] is True and rec.attrs["mpp"] == 0.5
    assert rec.attrs["encoder_fingerprint"] == "fp-a" and rec.attrs["n_tiles"] == 20
    empty = store["s0"]
    assert empty.views.shape == (0, 0, 8) and empty.view_index.shape == (0, 0)
    # plain zarr reads the same thing: the format is documented, not private
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert g.attrs["format"] == "wsi-ssl-tile-store"
    assert g.attrs["format_version"] == STORE_FORMAT_VERSION
    assert g["slides/s1/features"].shape == (20, 8)
    assert g["slides/s1/views"].chunks == (1, 5, 8)  # one version per chunk
    # reopen read-only
    ro = TileStore(tmp_path / "s.zarr", mode="r")
    assert ro.slide_ids == ["s0", "s1"] and ro.encoder["name"] == "enc-a"
    with pytest.raises(StoreError, match="read-only"):
        ro.write_slide("s2", feats, coords)
    assert ro.fingerprint == store.fingerprint and len(ro.fingerprint) == 16
    assert store.array("s1", "features").shape == (20, 8)


def test_incomplete_groups_are_invisible_and_cleaned(store, tmp_path):
    rng = np.random.default_rng(1)
    feats, coords, *_ = _slide(rng)
    store.write_slide("good", feats, coords)
    # a half-written slide from a crashed run: arrays but no `complete` attr
    g = zarr.open_group(str(tmp_path / "s.zarr" / "slides" / "half"), mode="w")
    g.create_array("features", shape=(2, 8), dtype="float16")
    # and a leftover temporary write of a dead process
    dead = tmp_path / "s.zarr" / ".tmp" / "other.999999999.abcd"
    dead.mkdir(parents=True)
    assert store.slide_ids == ["good"] and "half" not in store
    with pytest.raises(KeyError, match="'half' is not a complete slide"):
        store["half"]
    assert store.cleanup() == 2
    assert not (tmp_path / "s.zarr" / "slides" / "half").exists() and not dead.exists()


def test_replace_is_atomic_and_keeps_one_version(store, tmp_path):
    rng = np.random.default_rng(2)
    feats, coords, *_ = _slide(rng)
    store.write_slide("a", feats, coords, attrs={"run": 1})
    store.write_slide("a", feats[:5], coords[:5], attrs={"run": 2})
    assert store["a"].attrs["run"] == 2 and len(store["a"]) == 5
    assert list((tmp_path / "s.zarr" / ".tmp").iterdir()) == []


def test_encoder_binding_refuses_mixing(store):
    rng = np.random.default_rng(3)
    feats, coords, *_ = _slide(rng)
    store.bind_encoder("enc-b", "fp-b", 8)  # empty store: simply re-bound
    store.write_slide("a", feats, coords)
    with pytest.raises(EncoderMismatchError, match=r"embedded with encoder 'enc-b'.*'enc-c'"):
        store.bind_encoder("enc-c", "fp-c", 8)
    with pytest.raises(InputError, match=r"features must be \(N, 8\)"):
        store.write_slide("b", feats[:, :4], coords)
    with pytest.raises(InputError, match="slide_id='../evil'"):
        store.write_slide("../evil", feats, coords)
    with pytest.raises(InputError, match="view_index has rows outside"):
        store.write_slide("c", feats, coords, views=np.zeros((1, 2, 8)),
                          view_index=np.array([[0, 99]]))


def test_failures_recorded_in_root_and_cleared_on_success(store):
    store.record_failure("bad", "/x/bad.svs", "SlideOpenError: corrupt")
    assert store.failures == {"bad": {"path": "/x/bad.svs", "error": "SlideOpenError: corrupt"}}
    assert TileStore(store.path, mode="r").failures["bad"]["path"] == "/x/bad.svs"
    rng = np.random.default_rng(4)
    feats, coords, *_ = _slide(rng)
    store.write_slide("bad", feats, coords)
    assert store.failures == {}


def test_not_a_store_and_version_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        TileStore(tmp_path / "nope.zarr", mode="r")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "file.txt").write_text("x")
    with pytest.raises(StoreFormatError, match="is not a tile store"):
        TileStore(tmp_path / "dir")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(StoreFormatError, match="not a wsi-ssl tile store"):
        TileStore(tmp_path / "other.zarr")
    s = TileStore(tmp_path / "new.zarr")
    meta = json.loads((s.path / "zarr.json").read_text())
    meta["attributes"]["format_version"] = STORE_FORMAT_VERSION + 1
    (s.path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match="upgrade wsi-ssl"):
        TileStore(s.path)
    with pytest.raises(StoreError, match="no encoder bound"):
        TileStore(tmp_path / "fresh.zarr").write_slide("a", np.zeros((1, 2)), np.zeros((1, 2)))


def test_import_real_stamp_features_and_export_roundtrip(tmp_path, data_dir):
    src = data_dir / STAMP_H5
    with h5py.File(src, "r") as fh:
        ref_feats, ref_coords = fh["feats"][...], fh["coords"][...]
    store = TileStore(tmp_path / "imp.zarr")
    ids = store.import_h5(src, encoder="stamp-ctranspath", dtype="float32")
    assert ids == ["TCGA-AD-6964-01Z-00-DX1"]
    rec = store[ids[0]]
    assert rec.features.shape == (777, 512) and rec.attrs["source_format"] == "stamp"
    np.testing.assert_array_equal(rec.features, ref_feats)
    np.testing.assert_array_equal(rec.coords, ref_coords)
    assert store.encoder["name"] == "stamp-ctranspath" and store.encoder["embed_dim"] == 512
    assert store.import_h5(src, encoder="stamp-ctranspath") == []  # already there: skipped
    with pytest.raises(EncoderMismatchError, match="refusing to add features from 'uni'"):
        store.import_h5(src, encoder="uni", slide_ids=["x"])

    for layout, key in (("clam", "features"), ("stamp", "feats")):
        out = store.export_h5(tmp_path / layout, layout=layout)
        with h5py.File(out[0], "r") as fh:
            np.testing.assert_array_equal(fh[key][...], ref_feats)
            np.testing.assert_array_equal(fh["coords"][...], ref_coords)
        back = TileStore(tmp_path / f"back-{layout}.zarr")
        back.import_h5(out, encoder="x", dtype="float16")
        np.testing.assert_allclose(back[ids[0]].features, ref_feats, rtol=1e-3, atol=1e-3)


def test_import_errors(tmp_path):
    with h5py.File(tmp_path / "nofeat.h5", "w") as fh:
        fh["coords"] = np.zeros((3, 2))
    store = TileStore(tmp_path / "s.zarr")
    with pytest.raises(StoreFormatError, match=r"expected 'features' \(CLAM/TRIDENT\) or 'feats'"):
        store.import_h5(tmp_path / "nofeat.h5")
    with h5py.File(tmp_path / "nan.h5", "w") as fh:
        fh["features"] = np.full((3, 4), np.nan, np.float32)
        fh["coords"] = np.zeros((3, 2))
    with pytest.raises(InputError, match="NaN/inf"):
        store.import_h5(tmp_path / "nan.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(StoreFormatError, match="not a readable HDF5"):
        store.import_h5(tmp_path / "junk.h5")
    # CLAM layout with a leading batch dimension (TRIDENT) is squeezed
    with h5py.File(tmp_path / "trident.h5", "w") as fh:
        fh["features"] = np.ones((1, 5, 4), np.float32)
        fh["coords"] = np.arange(10).reshape(5, 2)
        fh["coords"].attrs["patch_size"] = 256
    assert store.import_h5(tmp_path / "trident.h5") == ["trident"]
    assert store["trident"].attrs["tile_size_level0"] == 256


def test_summary_sizes(store):
    rng = np.random.default_rng(5)
    for i in range(3):
        feats, coords, views, vidx = _slide(rng, n=100)
        store.write_slide(f"s{i}", feats, coords, views=views, view_index=vidx)
    s = store.summary()
    assert isinstance(s, StoreSummary)
    assert s.slides == 3 and s.tiles == 300 and s.views == 9
    assert 0 < s.bytes_per_tile < s.bytes_per_slide <= s.bytes
    assert json.loads(json.dumps(s.to_dict()))["tiles"] == 300
    with pytest.warns(DeprecationWarning, match=r"\(\.slides\) instead"):
        assert s["slides"] == 3  # the former dict return keeps working, with a warning

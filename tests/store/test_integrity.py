"""What the store records about each slide and what it finds when the files change behind it:
checksums and shard sizes, missing or truncated shards as errors (not zeros), verify (threads,
subsets), unreadable metadata kept (never deleted) and back once restored, cleanup of provable
garbage only."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zarr

from wsi_ssl.cli._repair import repair_command
from wsi_ssl.errors import StoreFormatError
from wsi_ssl.store import TileStore
from wsi_ssl.store._integrity import array_checksum
from wsi_ssl.store._maintenance import find_damaged


def _store(tmp_path) -> TileStore:
    s = TileStore(tmp_path / "s.zarr")
    s.bind_encoder("enc-a", "fp-a", 8)
    rng = np.random.default_rng(0)
    for sid, n in (("a", 20), ("b", 9), ("c", 1)):
        s.write_slide(sid, rng.normal(size=(n, 8)), rng.integers(0, 999, (n, 2)),
                      views=rng.normal(size=(3, 4, 8)), view_index=rng.integers(0, n, (3, 4)))
    return s


def test_checksums_and_shard_sizes_are_recorded(tmp_path):
    s = _store(tmp_path)
    attrs = s.slide_attrs("a")
    sums, shards = attrs["checksums"], attrs["shards"]
    rec = s["a"]
    for name in ("features", "coords", "views", "view_index"):
        assert sums[name] == {"sha256": array_checksum(getattr(rec, name))}
    # one shard file per stored array, its size recorded
    assert set(shards) == {"features/c.0.0", "views/c.0.0.0", "index/c.0"}
    for key, size in shards.items():
        assert (s.path / "slides" / "a" / key).stat().st_size == size > 0
    # slide c: 1 tile, view_index all 0: still stored (write_empty_chunks)
    assert not s["c"].view_index.any() and (s.path / "slides" / "c" / "index" / "c.0").exists()
    rep = s.verify(threads=3)
    assert rep.ok and rep.checked == ("a", "b", "c") and rep.damaged == {} and rep.repair is None


@pytest.mark.parametrize("how", ["deleted", "emptied", "truncated"])
def test_missing_or_truncated_shard_raises_never_zeros(tmp_path, how):
    s = _store(tmp_path)
    before = s["a"]
    shard = s.path / "slides" / "a" / "views" / "c.0.0.0"
    if how == "deleted":
        shard.unlink()
    else:
        shard.write_bytes(b"" if how == "emptied" else shard.read_bytes()[:-7])
    # plain zarr would give zeros for a missing or empty shard: the store refuses
    with pytest.raises(StoreFormatError, match=r"slide 'a' of '.*' is damaged \(views: shard "
                       r"file views/c\.0\.0\.0 .*\); .*wsi-ssl info .* --verify"):
        s["a"]
    with pytest.raises(StoreFormatError, match="damaged"):
        s.read_views("a", [1])
    with pytest.raises(StoreFormatError, match="damaged"):
        s.array("a", "views")
    # the intact arrays stay readable
    np.testing.assert_array_equal(s.read_features("a"), before.features)
    np.testing.assert_array_equal(s.read_coords("a"), before.coords)
    rep = s.verify()
    assert set(rep.damaged) == {"a"} and rep.damaged["a"].startswith("views: shard file")


def test_corrupt_and_altered_chunks(tmp_path):
    s = _store(tmp_path)
    before_b = s["b"]
    shard = s.path / "slides" / "b" / "features" / "c.0.0"
    raw = shard.read_bytes()
    shard.write_bytes(raw[::-1])  # same size, garbage (the shard index checksum fails)
    with pytest.raises(StoreFormatError, match="slide 'b' .* is unreadable"):
        s["b"]
    rep = s.verify()
    assert set(rep.damaged) == {"b"} and not rep.ok
    assert rep.damaged["b"].startswith("features: unreadable chunk")
    assert rep.repair.slide_ids == ("b",) and rep.repair.encoder == "enc-a"
    assert repair_command(rep.repair).startswith(
        f"wsi-ssl embed --store {s.path} --repair --encoder enc-a")
    # re-writing the slide repairs it; altering decodable bytes is caught by the checksum
    s.write_slide("b", before_b.features, before_b.coords, views=before_b.views,
                  view_index=before_b.view_index)
    arr = zarr.open_array(str(s.path / "slides" / "c" / "index"), mode="r+")
    arr[0] = arr[0] + 1
    attrs = s.slide_attrs("c")
    attrs["shards"]["index/c.0"] = (s.path / "slides" / "c" / "index" / "c.0").stat().st_size
    zarr.open_group(str(s.path / "slides" / "c"), mode="r+").attrs.update(attrs)
    rep = s.verify(["a", "b", "c"])
    assert set(rep.damaged) == {"c"}
    assert rep.damaged["c"] == "coords: bytes differ from the recorded checksum (altered)"
    # a subset: only those slides are read, without the lock (a writer may hold it)
    with s.lock():
        sub = find_damaged(TileStore(s.path, mode="r"), ["a", "c", "nope"])
    assert sub.checked == ("a", "c") and set(sub.damaged) == {"c"}


def test_unreadable_metadata_is_kept_reported_and_back_when_restored(tmp_path, caplog):
    s = _store(tmp_path)
    meta = s.path / "slides" / "a" / "zarr.json"
    good = meta.read_bytes()
    before = s["a"]
    meta.write_bytes(good[: len(good) // 2])  # truncated: a half-synced copy, an NFS hiccup
    # the index still lists the committed slide; reading it says what is wrong
    assert s.slide_ids == ["a", "b", "c"]
    fresh = TileStore(s.path)
    with pytest.raises(KeyError, match="slide 'a' of .* is unreadable: zarr.json is not valid"):
        fresh["a"]
    assert s.unreadable == {"a": s.unreadable["a"]} and "not valid JSON" in s.unreadable["a"]
    # a rescan (`wsi-ssl info --rescan`) rebuilds the index: left out, warned once
    with caplog.at_level(logging.WARNING, logger="wsi_ssl.store._tilestore"):
        assert s.rescan() == ["b", "c"]
        assert s.slide_ids == ["b", "c"]
        assert s.slide_ids == ["b", "c"]
    assert caplog.text.count("slide 'a' of tile store") == 1  # warned once, not per call
    # cleanup deletes the provable garbage and nothing else
    (s.path / ".tmp" / "x.123.abcd").mkdir(parents=True)
    (s.path / "slides" / "half").mkdir()
    (s.path / "slides" / "half" / "zarr.json").write_text(
        '{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    (s.path / "slides" / "nometa").mkdir()
    assert s.cleanup() == 2
    assert not (s.path / "slides" / "half").exists() and not any((s.path / ".tmp").iterdir())
    assert (s.path / "slides" / "a" / "features").is_dir() and (s.path / "slides" / "nometa").is_dir()
    assert s.unreadable["nometa"] == "zarr.json is missing"
    assert set(s.verify().unreadable) == {"a", "nometa"}
    meta.write_bytes(good)
    after = fresh["a"]
    assert s.slide_ids == ["a", "b", "c"] and after.attrs == before.attrs
    for name in ("features", "coords", "views", "view_index"):
        np.testing.assert_array_equal(getattr(after, name), getattr(before, name))

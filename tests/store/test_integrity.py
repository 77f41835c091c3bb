"""What the store records about each slide and what it finds when the files change behind it:
checksums and chunk counts, missing chunks as errors (not zeros), verify, unreadable metadata
kept (never deleted) and back once restored, cleanup of provable garbage only."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from wsi_ssl.errors import StoreFormatError
from wsi_ssl.store import TileStore
from wsi_ssl.store._integrity import array_checksum


def _store(tmp_path) -> TileStore:
    s = TileStore(tmp_path / "s.zarr")
    s.bind_encoder("enc-a", "fp-a", 8)
    rng = np.random.default_rng(0)
    for sid, n in (("a", 20), ("b", 9), ("c", 1)):
        s.write_slide(sid, rng.normal(size=(n, 8)), rng.integers(0, 999, (n, 2)),
                      views=rng.normal(size=(3, 4, 8)), view_index=rng.integers(0, n, (3, 4)))
    return s


def test_checksums_and_chunk_counts_are_recorded(tmp_path):
    s = _store(tmp_path)
    sums = s.slide_attrs("a")["checksums"]
    rec = s["a"]
    assert sums["features"]["sha256"] == array_checksum(rec.features)
    assert sums["views"] == {"sha256": array_checksum(rec.views), "chunks": 3}
    assert sums["features"]["chunks"] == sums["coords"]["chunks"] == 1
    # every chunk has a file, even all-zero ones (slide c: 1 tile, view_index all 0)
    vi = s.path / "slides" / "c" / "view_index" / "c"
    assert not s["c"].view_index.any() and len(list(vi.rglob("*"))) - len(
        [p for p in vi.rglob("*") if p.is_dir()]) == 3
    rep = s.verify()
    assert rep.ok and rep.checked == ("a", "b", "c") and rep.damaged == {} and rep.repair == ""


def test_missing_corrupt_and_altered_chunks(tmp_path):
    s = _store(tmp_path)
    before_b = s["b"]
    (s.path / "slides" / "a" / "views" / "c" / "1" / "0" / "0").unlink()          # missing
    (s.path / "slides" / "b" / "features" / "c" / "0" / "0").write_bytes(b"garbage")  # corrupt
    with pytest.raises(StoreFormatError, match=r"slide 'a' of '.*' is damaged \(views: 1 of 3 "
                       r"chunk files missing\); .*wsi-ssl info .* --verify"):
        s["a"]
    with pytest.raises(StoreFormatError, match="damaged"):
        s.array("a", "views")
    assert s.array("a", "features").shape == (20, 8)  # the intact arrays stay readable
    with pytest.raises(StoreFormatError, match="slide 'b' .* is unreadable"):
        s["b"]
    rep = s.verify()
    assert set(rep.damaged) == {"a", "b"} and not rep.ok
    assert rep.damaged["a"] == "views: 1 of 3 chunk files missing"
    assert rep.damaged["b"].startswith("features: unreadable chunk")
    assert rep.repair.startswith(f"wsi-ssl embed --store {s.path} --repair --encoder enc-a")
    # re-writing the slide repairs it; altering decodable bytes is caught by the checksum
    s.write_slide("b", before_b.features, before_b.coords, views=before_b.views,
                  view_index=before_b.view_index)
    import zarr

    arr = zarr.open_array(str(s.path / "slides" / "c" / "coords"), mode="r+")
    arr[0, 0] = arr[0, 0] + 1
    rep = s.verify()
    assert set(rep.damaged) == {"a", "c"}
    assert rep.damaged["c"] == "coords: bytes differ from the recorded checksum (altered)"


def test_unreadable_metadata_is_kept_reported_and_back_when_restored(tmp_path, caplog):
    s = _store(tmp_path)
    meta = s.path / "slides" / "a" / "zarr.json"
    good = meta.read_bytes()
    before = s["a"]
    meta.write_bytes(good[: len(good) // 2])  # truncated: a half-synced copy, an NFS hiccup
    with caplog.at_level(logging.WARNING, logger="wsi_ssl.store._tilestore"):
        assert s.slide_ids == ["b", "c"]
        assert s.slide_ids == ["b", "c"]
    assert caplog.text.count("slide 'a' of tile store") == 1  # warned once, not per call
    assert "zarr.json is not valid JSON" in caplog.text
    assert s.unreadable == {"a": s.unreadable["a"]} and "not valid JSON" in s.unreadable["a"]
    with pytest.raises(KeyError, match="slide 'a' of .* is unreadable: zarr.json is not valid"):
        s["a"]
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
    after = s["a"]
    assert s.slide_ids == ["a", "b", "c"] and after.attrs == before.attrs
    for name in ("features", "coords", "views", "view_index"):
        np.testing.assert_array_equal(getattr(after, name), getattr(before, name))

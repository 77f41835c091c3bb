"""The slide index: listing a store is one index read and one directory listing, and it is
always exactly the complete slides (a writer killed between its commit and its index line, a
stale index, a missing one, one naming a deleted slide, a torn last line)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from wsi_ssl.store import TileStore
from wsi_ssl.store._index import INDEX_NAME

_WRITER = """
import sys
import numpy as np
from wsi_ssl.store import TileStore
store = TileStore(sys.argv[1])
store.write_slide(sys.argv[2], np.ones((4, 8)), np.zeros((4, 2)))
print("NOT KILLED", flush=True)
"""


def _store(tmp_path, ids=("a", "b", "c")) -> TileStore:
    s = TileStore(tmp_path / "s.zarr")
    s.bind_encoder("enc", "fp", 8)
    rng = np.random.default_rng(0)
    for sid in ids:
        s.write_slide(sid, rng.normal(size=(5, 8)), np.zeros((5, 2)),
                      views=rng.normal(size=(2, 3, 8)), view_index=np.zeros((2, 3), int))
    return s


def _indexed(s: TileStore) -> set[str]:
    loaded = s._index.load()
    return set() if loaded is None else set(loaded[0])


def test_sigkill_between_commit_and_index_update(tmp_path):
    s = _store(tmp_path)
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(_WRITER))
    env = dict(os.environ, WSI_SSL_STORE_CRASH_AT="after-commit")
    proc = subprocess.run([sys.executable, str(script), str(s.path), "k"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9 and "NOT KILLED" not in proc.stdout, proc.stderr[-2000:]
    # committed (renamed into slides/) but not indexed: still listed, exactly
    assert "k" not in _indexed(s)
    fresh = TileStore(s.path, mode="r")
    assert fresh.slide_ids == ["a", "b", "c", "k"] and fresh["k"].features.shape == (4, 8)
    assert fresh.summary().slides == 4 and fresh.summary().tiles == 19
    # the next writer's cleanup (every embed starts with it) repairs the index
    s.cleanup()
    assert _indexed(s) == {"a", "b", "c", "k"}


def test_stale_missing_and_deleted(tmp_path):
    s = _store(tmp_path)
    old = (s.path / INDEX_NAME).read_bytes()
    s.write_slide("d", np.ones((2, 8)), np.zeros((2, 2)))
    s.delete_slide("a")
    assert s.slide_ids == ["b", "c", "d"] and _indexed(s) == {"b", "c", "d"}
    (s.path / INDEX_NAME).write_bytes(old)  # stale: restored from a backup
    assert TileStore(s.path, mode="r").slide_ids == ["b", "c", "d"]
    (s.path / INDEX_NAME).unlink()  # missing: the directory scan
    assert TileStore(s.path, mode="r").slide_ids == ["b", "c", "d"]
    from wsi_ssl.cli import main

    assert main(["info", str(s.path), "--rescan"]) == 0
    assert _indexed(s) == {"b", "c", "d"}
    shutil.rmtree(s.path / "slides" / "c")  # an index entry whose slide was deleted by hand
    assert TileStore(s.path, mode="r").slide_ids == ["b", "d"]
    # a folder that is not a complete slide is never listed, indexed or not
    (s.path / "slides" / "half").mkdir()
    (s.path / "slides" / "half" / "zarr.json").write_text(
        '{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    assert TileStore(s.path, mode="r").slide_ids == ["b", "d"]
    assert main(["store", "index", "--rebuild", str(s.path)]) == 0
    assert _indexed(s) == {"b", "d"}


def test_torn_line_and_compaction(tmp_path):
    s = _store(tmp_path, ids=("a",))
    with open(s.path / INDEX_NAME, "ab") as fh:
        fh.write(b'{"+": "ghost", "n_ti')  # a writer killed mid-append
    assert TileStore(s.path, mode="r").slide_ids == ["a"]
    for i in range(60):  # rewrites of one slide: the log is compacted, never grows unbounded
        s.write_slide("b", np.full((1, 8), i), np.zeros((1, 2)))
    lines = (s.path / INDEX_NAME).read_text().splitlines()
    assert len(lines) <= 2 * 2 + 64 + 1 and _indexed(s) == {"a", "b"}
    assert TileStore(s.path, mode="r").slide_ids == ["a", "b"]
    assert float(s["b"].features[0, 0]) == 59


def test_listing_reads_no_slide_metadata(tmp_path):
    """With an index that agrees with the folders, listing and summary read no per-slide file:
    planted garbage metadata does not change them (reading the slide then says what is wrong)."""
    s = _store(tmp_path)
    for sid in ("a", "b", "c"):
        (s.path / "slides" / sid / "zarr.json").write_text("garbage")
    ro = TileStore(s.path, mode="r")
    assert ro.slide_ids == ["a", "b", "c"] and ro.summary().tiles == 15
    with pytest.raises(KeyError, match="unreadable: zarr.json is not valid JSON"):
        ro["a"]

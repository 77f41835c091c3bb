"""Format 1 -> 2: old stores are refused by readers and writers with the command that upgrades
them; `wsi-ssl store upgrade` rewrites them in place with identical arrays and checksums, and a
killed upgrade resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

from tests.store._format1 import create_format1_store, write_format1_slide
from wsi_ssl.cli import main
from wsi_ssl.errors import StoreFormatError
from wsi_ssl.store import TileStore
from wsi_ssl.store._upgrade import upgrade_store

ARRAYS = ("features", "coords", "views", "view_index")


def _format1(tmp_path):
    path = create_format1_store(tmp_path / "old.zarr")
    rng = np.random.default_rng(0)
    for sid, n, v, dtype in (("a", 20, 3, "float16"), ("b", 9, 0, "float32"),
                             ("c", 0, 0, "float16"), ("d", 300, 4, "float16")):
        views = rng.normal(size=(v, 5, 8)) if v else None
        vidx = rng.integers(0, max(n, 1), (v, 5)) if v else None
        write_format1_slide(path, sid, rng.normal(size=(n, 8)), rng.integers(0, 9999, (n, 2)),
                            views, vidx, attrs={"mpp": 0.5, "source": f"/x/{sid}.svs"},
                            dtype=dtype)
    root = zarr.open_group(str(path), mode="r+")
    root.attrs["failures"] = {"z": {"path": "/x/z.svs", "error": "boom"}}
    before = {}
    for sid in ("a", "b", "c", "d"):
        g = zarr.open_group(str(path / "slides" / sid), mode="r")
        before[sid] = ({k: g[k][...] for k in ARRAYS}, dict(g.attrs))
    return path, before


def _check_upgraded(path, before):
    store = TileStore(path, mode="r")
    assert store.slide_ids == ["a", "b", "c", "d"] and store.failures["z"]["error"] == "boom"
    for sid, (arrays, attrs) in before.items():
        rec = store[sid]
        for k in ARRAYS:
            want = arrays[k]
            if k == "views" and want.size == 0:
                assert rec.views.shape == (0, 0, 8)
                continue
            assert getattr(rec, k).dtype == want.dtype
            np.testing.assert_array_equal(getattr(rec, k), want)
            assert rec.attrs["checksums"][k]["sha256"] == attrs["checksums"][k]["sha256"]
        assert rec.attrs["mpp"] == 0.5 and rec.attrs["source"] == f"/x/{sid}.svs"
        assert 1 + sum(len(d) + len(f) for _, d, f in os.walk(path / "slides" / sid)) <= 12
    assert store.verify().ok
    assert store.slide_stats("d").n_tiles == 300


def test_format1_refused_then_upgraded_identical(tmp_path, capsys):
    path, before = _format1(tmp_path)
    for mode in ("r", "a"):
        with pytest.raises(StoreFormatError, match=rf"is format 1; .* run `wsi-ssl store "
                           rf"upgrade {path}`"):
            TileStore(path, mode=mode)
    assert main(["store", "upgrade", str(path)]) == 0
    out = capsys.readouterr().out
    assert "from format 1 to 2" in out and "converted      4 slides" in out
    _check_upgraded(path, before)
    assert main(["store", "upgrade", str(path)]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_interrupted_upgrade_resumes(tmp_path):
    path, before = _format1(tmp_path)
    env = dict(os.environ, WSI_SSL_STORE_CRASH_AT="after-commit")
    proc = subprocess.run([sys.executable, "-m", "wsi_ssl", "store", "upgrade", str(path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    with pytest.raises(StoreFormatError, match="interrupted upgrade to format 2; .*store upgrade"):
        TileStore(path, mode="r")
    rep = upgrade_store(path)
    assert rep.already == ("a",) and set(rep.converted) == {"b", "c", "d"}
    _check_upgraded(path, before)


def test_damaged_format1_slide_and_newer_format(tmp_path):
    path, _ = _format1(tmp_path)
    (path / "slides" / "a" / "views" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(StoreFormatError, match=r"1 format-1 slides are damaged .*a: views: 1 of 3 "
                       r"chunk files missing.*--drop-damaged"):
        upgrade_store(path)
    rep = upgrade_store(path, drop_damaged=True)
    assert list(rep.dropped) == ["a"] and TileStore(path, mode="r").slide_ids == ["b", "c", "d"]
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 3
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match="format_version=3; .*upgrade wsi-ssl"):
        TileStore(path, mode="r")
    with pytest.raises(StoreFormatError, match="newer than this wsi-ssl .*upgrade wsi-ssl"):
        upgrade_store(path)

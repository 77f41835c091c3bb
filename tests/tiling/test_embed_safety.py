"""`wsi-ssl embed` loses nothing, with real processes: one writer per store (a second fails naming
the first, --wait queues), a real `dask scheduler` + 2 `dask worker` processes started in another
folder given relative paths (identical to a local run; a warning while no worker is connected),
unreadable metadata kept, damaged chunks listed by `info --verify` and restored by
`embed --repair`, and a missing slide path among several recorded as that slide's failure."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests._helpers import assert_same_store as _same
from tests._helpers import wait_until
from tests._synthetic import tissue_image
from wsi_ssl.cli import main
from wsi_ssl.datasets import write_pyramidal_tiff
from wsi_ssl.store import TileStore
from wsi_ssl.tiling import EmbedConfig, SlideFailure, embed_slides
from wsi_ssl.tiling._embed_worker import EncoderPayload, run_job

BIN = Path(sys.executable).parent
TILE = 64
KW = {"mpp": 0.5, "tile_size": TILE, "views": 2, "view_tiles": 4, "batch_size": 32}
FLAGS = ["--encoder", "tiny-cnn", "--tile-size", str(TILE), "--views", "2", "--view-tiles", "4",
         "--batch-size", "32"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cohort")
    for i in range(3):
        write_pyramidal_tiff(d / f"slide{i}.svs", tissue_image(768, 512, seed=20 + i), mpp=0.5,
                             n_levels=1)
    return d


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory) -> TileStore:
    """The same three slides embedded in this process, without dask."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    rep = embed_slides(sorted(cohort.glob("*.svs")), "tiny-cnn", path, client="sync", **KW)
    assert rep.ok and len(rep.done) == 3
    return TileStore(path, mode="r")


def _holder_pid(store: Path) -> int | None:
    try:
        return json.loads((store / ".lock.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_one_writer_per_store_and_a_real_cluster_started_elsewhere(cohort, reference, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    existing = tmp_path / "e.zarr"  # an existing store: slide0 already there
    embed_slides([cohort / "slide0.svs"], "tiny-cnn", existing, client="sync", **KW)
    sched_file = tmp_path / "scheduler.json"
    env = dict(os.environ, WSI_SSL_NO_WORKERS_WARN_S="1")
    procs: list[subprocess.Popen] = []

    def start(args, *, cwd, name):
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    def log(name):
        return (tmp_path / f"{name}.log").read_text()

    try:
        start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
               "--no-dashboard", "--scheduler-file", str(sched_file)], cwd=elsewhere, name="sched")
        # other processes: polled with a deadline
        wait_until(lambda: sched_file.exists() and "address" in sched_file.read_text(), 180,
                   lambda: f"the scheduler file; its log: {log('sched')[-2000:]}")
        address = json.loads(sched_file.read_text())["address"]
        rel = ["slide0.svs", "slide1.svs", "slide2.svs"]  # relative to the cohort folder
        cmd = [str(BIN / "wsi-ssl"), "embed", *rel, *FLAGS, "--scheduler", address, "--store"]
        new = tmp_path / "a.zarr"
        rel_new = os.path.relpath(new, cohort)
        a = start([*cmd, rel_new], cwd=cohort, name="a")                     # a new store
        e = start([*cmd, str(existing)], cwd=cohort, name="e")               # an existing one
        wait_until(lambda: _holder_pid(new) == a.pid and _holder_pid(existing) == e.pid, 180,
                   lambda: f"both runs to hold their store's lock; logs: {log('a')[-1000:]} "
                           f"{log('e')[-1000:]}")
        # the same command again on a held store: fails at once, naming the holder
        b = subprocess.run([*cmd, rel_new], cwd=cohort, env=env, capture_output=True,
                           text=True, timeout=180)
        assert b.returncode == 1, b.stderr
        assert f"is locked by another writer (host {socket.gethostname()}, PID {a.pid}" in b.stderr
        assert "--wait" in b.stderr
        f = start([*cmd, str(existing), "--wait"], cwd=cohort, name="f")     # queues behind e
        # nobody is computing yet: the runs say so, naming the scheduler
        wait_until(lambda: f"no dask workers have been connected to the scheduler {address}"
                   in log("a"), 180, lambda: f"the no-worker warning; log: {log('a')[-2000:]}")
        for i in range(2):
            start([str(BIN / "dask"), "worker", "--scheduler-file", str(sched_file),
                   "--nthreads", "1", "--no-dashboard"], cwd=elsewhere, name=f"worker{i}")
        for p, name in ((a, "a"), (e, "e"), (f, "f")):
            assert p.wait(timeout=240) == 0, log(name)[-3000:]
        assert "embedded  3 slides" in log("a") and "embedded  2 slides" in log("e")
        assert "skipped   3 slides" in log("f")  # it ran after e, and found everything done
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for path in (new, existing):
        store = TileStore(path, mode="r")
        _same(store, reference)
        assert store["slide1"].attrs["source"] == str((cohort / "slide1.svs").resolve())
        assert not (path / ".lock").exists()


def _chunk_file(store: Path, sid: str, array: str) -> Path:
    """The first chunk (or shard) file of a slide's array, whatever the store's chunk layout."""
    files = sorted(p for p in (store / "slides" / sid / array).rglob("*")
                   if p.is_file() and p.name != "zarr.json")
    assert files, f"no chunk file under {store / 'slides' / sid / array}"
    return files[0]


def test_unreadable_metadata_survives_and_damage_is_repaired(cohort, reference, tmp_path,
                                                             capsys):
    store = tmp_path / "s.zarr"
    embed_slides([cohort / "slide0.svs", cohort / "slide1.svs"], "tiny-cnn", store,
                 client="sync", **KW)
    meta = store / "slides" / "slide0" / "zarr.json"
    good = meta.read_bytes()
    meta.write_bytes(good[:40])
    base = ["embed", "--store", str(store), *FLAGS, "--scheduler", "sync"]
    assert main([*base, str(cohort / "slide2.svs")]) == 0
    capsys.readouterr()
    assert (store / "slides" / "slide0" / "features").is_dir()  # not deleted
    assert main(["info", str(store), "--slides"]) == 0
    out = capsys.readouterr().out
    assert "slide0" in out and "unreadable: zarr.json is not valid JSON" in out
    meta.write_bytes(good)
    _same(TileStore(store, mode="r"), reference)  # back, identical

    # one chunk deleted, another corrupted: --verify lists exactly those two slides
    original = {s: TileStore(store, mode="r")[s] for s in ("slide1", "slide2")}
    _chunk_file(store, "slide1", "views").unlink()
    chunk = _chunk_file(store, "slide2", "features")
    chunk.write_bytes(chunk.read_bytes()[::-1])
    assert main(["info", str(store), "--verify"]) == 1
    out = capsys.readouterr().out
    damaged = [line.split()[1] for line in out.splitlines() if line.startswith("  damaged:")]
    assert damaged == ["slide1", "slide2"] and "3 slides checked, 2 damaged" in out
    repair = out.split("re-embed exactly these with:\n")[1].splitlines()[0].split("   (")[0]
    args = shlex.split(repair)
    assert args[:2] == ["wsi-ssl", "embed"]
    assert main([*args[1:], "--scheduler", "sync"]) == 0  # the printed command, as printed
    out = capsys.readouterr().out
    assert "embedded  2 slides" in out and "skipped   0 slides" in out  # exactly the two
    repaired = TileStore(store, mode="r")
    assert repaired.verify().ok
    for sid, rec in original.items():
        for name in ("features", "coords", "views", "view_index"):
            np.testing.assert_array_equal(getattr(repaired[sid], name), getattr(rec, name))
        assert repaired[sid].attrs == rec.attrs
    # repair with other settings would not restore the bytes: refused, naming the command
    _chunk_file(store, "slide2", "features").unlink()
    assert main(["embed", "--store", str(store), "--repair", "--encoder", "tiny-cnn",
                 "--tile-size", str(TILE), "--scheduler", "sync"]) == 1
    err = capsys.readouterr().err
    assert "slide 'slide2'" in err and "was embedded with other settings" in err
    assert "--views 2 --view-tiles 4" in err


def test_missing_path_among_several_is_that_slides_failure(cohort, tmp_path, capsys):
    store = tmp_path / "m.zarr"
    rc = main(["embed", str(cohort / "slide0.svs"), str(tmp_path / "typo.svs"), "--store",
               str(store), *FLAGS, "--views", "0", "--scheduler", "sync"])
    out = capsys.readouterr().out
    assert rc == 1 and "embedded  1 slides" in out and "FAILED    1 slides" in out
    assert "typo" in out and "does not exist" in out
    s = TileStore(store, mode="r")
    assert s.slide_ids == ["slide0"]
    assert s.failures["typo"]["path"] == str(tmp_path / "typo.svs")


def test_a_worker_that_cannot_see_the_slide_says_so(tmp_path):
    job = {"path": str(tmp_path / "only-on-the-driver.svs"), "slide_id": "x", "slide_mpp": None}
    res = run_job(job, EncoderPayload(fingerprint="unused"), EmbedConfig())
    assert isinstance(res, SlideFailure)  # data, not an exception: the batch goes on
    assert res.slide_id == "x"
    assert res.error.startswith(f"InputError: slide file '{job['path']}' is not visible on "
                                f"the worker on host {socket.gethostname()}")
    assert "same absolute path (a shared filesystem" in res.error

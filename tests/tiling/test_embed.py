"""embed_slides on a real dask LocalCluster (2 worker processes): correctness of features and the
Giga-SSL view bank, failures, resume, SIGKILL + rerun == uninterrupted run, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._helpers import assert_same_store as _assert_same_store
from tests._helpers import wait_until
from tests._synthetic import tissue_image
from wsi_ssl.augment import apply_params, sample_params
from wsi_ssl.cli import main
from wsi_ssl.datasets import write_pyramidal_tiff
from wsi_ssl.encoders import create_encoder, spec_fingerprint
from wsi_ssl.errors import ConfigError, EncoderMismatchError, InputError
from wsi_ssl.store import TileStore
from wsi_ssl.tiling import EmbedReport, embed_slides, open_slide, read_tiles, tile_grid
from wsi_ssl.tiling._embed_worker import seed_for

TILE = 64
KW = {"mpp": 0.5, "tile_size": TILE, "views": 3, "view_tiles": 8, "batch_size": 32}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cohort")
    for i in range(4):
        write_pyramidal_tiff(d / f"slide{i}.svs", tissue_image(1024, 768, seed=10 + i), mpp=0.5,
                             n_levels=2, downsample=2)
    return d


@pytest.fixture(scope="module")
def no_mpp_slide(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("nompp")
    return write_pyramidal_tiff(d / "nompp.svs", tissue_image(768, 512, seed=3), mpp=None,
                                n_levels=1)


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


def _good(cohort: Path) -> list[Path]:
    return sorted(cohort.glob("slide*.svs"))[:3]


def _assert_equals_direct_computation(rec, path: Path) -> None:
    """A stored slide's features and view bank equal the same computation done here, by hand."""
    enc = create_encoder("tiny-cnn", device="cpu")
    with open_slide(path) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=TILE)
        tiles = np.zeros((len(grid), TILE, TILE, 3), np.uint8)
        for b in read_tiles(slide, grid, batch_size=50):
            tiles[b.indices] = b.tiles
    np.testing.assert_array_equal(rec.coords, grid.coords)
    assert rec.features.shape == (len(grid), enc.embed_dim) and rec.features.dtype == np.float16
    np.testing.assert_allclose(rec.features, enc.embed(tiles).numpy(), rtol=1e-2, atol=1e-2)
    # the view bank: per version T grid tiles, ONE augmentation draw, rng seeded by (seed, id)
    rng = np.random.default_rng(seed_for(0, path.stem))
    assert rec.views.shape == (3, 8, enc.embed_dim) and rec.view_index.shape == (3, 8)
    for v in range(3):
        idx = rng.choice(len(grid), size=8, replace=False)
        params = sample_params(rng, "histo")
        np.testing.assert_array_equal(rec.view_index[v], idx)
        x = apply_params(torch.from_numpy(tiles[idx]).permute(0, 3, 1, 2), params,
                         out_size=enc.input_size)
        np.testing.assert_allclose(rec.views[v], enc.embed(x).numpy(), rtol=1e-2, atol=1e-2)
    # augmented versions differ from each other and from the plain features
    assert not np.allclose(rec.views[0], rec.features[rec.view_index[0]], atol=1e-2)
    a = rec.attrs
    assert a["complete"] and a["mpp"] == 0.5 and a["slide_mpp"] == 0.5 and not a["mpp_assumed"]
    assert a["tile_size"] == TILE and a["level"] == 0 and a["stride_level0"] == TILE
    assert a["encoder_fingerprint"] == spec_fingerprint(enc.spec) and a["augment"]["rot90"] is True
    assert a["source_file"]["size"] == path.stat().st_size


def test_embed_on_local_cluster_matches_direct_computation(cohort, no_mpp_slide, slides_dir,
                                                           client, tmp_path):
    slides = [*_good(cohort), slides_dir / "broken.svs", no_mpp_slide]
    report = embed_slides(slides, "tiny-cnn", tmp_path / "s.zarr", client=client, **KW)
    assert isinstance(report, EmbedReport)
    assert sorted(report.done) == ["slide0", "slide1", "slide2"] and not report.ok
    failed = {sid: err for sid, _, err in report.failed}
    assert set(failed) == {"broken", "nompp"}
    assert "MissingMPPError" in failed["nompp"] and "SlideOpenError" in failed["broken"]
    store = TileStore(tmp_path / "s.zarr", mode="r")
    assert store.slide_ids == ["slide0", "slide1", "slide2"]
    assert set(store.failures) == {"broken", "nompp"}
    assert store.failures["broken"]["path"].endswith("broken.svs")
    assert report.n_tiles == sum(len(store[s]) for s in store.slide_ids) > 100
    assert report.n_view_tiles == 3 * 3 * 8 and report.tiles_per_second > 0

    # the worker's output equals the same computation done here, by hand
    _assert_equals_direct_computation(store["slide1"], cohort / "slide1.svs")

    # rerun: complete slides are skipped; failures are retried; --assume-mpp fixes the one
    again = embed_slides(slides, "tiny-cnn", store.path, client=client, assume_mpp=0.5, **KW)
    assert sorted(again.skipped) == ["slide0", "slide1", "slide2"]
    assert again.done == ("nompp",) and [f[0] for f in again.failed] == ["broken"]
    store = TileStore(store.path, mode="r")
    assert store["nompp"].attrs["mpp_assumed"] is True and set(store.failures) == {"broken"}
    # changed settings redo the slide
    third = embed_slides(_good(cohort)[:1], "tiny-cnn", store.path, client="sync",
                         **(KW | {"views": 2}))
    assert third.done == ("slide0",) and TileStore(store.path)["slide0"].n_views == 2


def test_refuses_another_encoder_and_bad_input(cohort, tmp_path):
    embed_slides(_good(cohort)[:1], "tiny-cnn", tmp_path / "s.zarr", client="sync",
                 **(KW | {"views": 0}))
    with pytest.raises(EncoderMismatchError, match="refusing to add features from 'tiny-vit'"):
        embed_slides(_good(cohort)[:1], "tiny-vit", tmp_path / "s.zarr", client="sync")
    with pytest.raises(ConfigError, match="views=-1 must be an integer >= 0"):
        embed_slides(_good(cohort), "tiny-cnn", tmp_path / "t.zarr", views=-1)
    with pytest.raises(ConfigError, match="tile_size=0 must be"):
        embed_slides(_good(cohort), "tiny-cnn", tmp_path / "t.zarr", tile_size=0)
    with pytest.raises(InputError, match="matches no slide file"):
        embed_slides([tmp_path / "nothing*.svs"], "tiny-cnn", tmp_path / "t.zarr")
    (tmp_path / "m.csv").write_text("path,slide_id\nslide0.svs,a\nslide1.svs,a\n")
    with pytest.raises(InputError, match="slide id 'a' is used by both"):
        embed_slides(None, "tiny-cnn", tmp_path / "t.zarr", manifest=tmp_path / "m.csv")
    with pytest.raises(ConfigError, match="cannot connect to the dask scheduler"):
        embed_slides(_good(cohort)[:1], "tiny-cnn", tmp_path / "u.zarr", client="tcp://nohost")


def test_wrapped_module_travels_pickled(cohort, tmp_path):
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    enc = create_encoder(net, input_size=TILE)
    rep = embed_slides(_good(cohort)[:1], enc, tmp_path / "w.zarr", client="sync",
                       **(KW | {"views": 1}))
    rec = TileStore(tmp_path / "w.zarr")["slide0"]
    assert rep.ok and rec.features.shape[1] == 5 and rec.views.shape == (1, 8, 5)
    assert rec.attrs["encoder_fingerprint"] == enc.fingerprint


_KILL_SCRIPT = """
import sys
from wsi_ssl.tiling import embed_slides
embed_slides(sys.argv[1:-2], "tiny-cnn", sys.argv[-2], client=sys.argv[-1], mpp=0.5,
             tile_size={tile}, views=3, view_tiles=8, batch_size=8)
"""


def test_sigkill_then_rerun_equals_uninterrupted_run(cohort, client, tmp_path, caplog):
    slides = [str(p) for p in sorted(cohort.glob("slide*.svs"))]
    kw = KW | {"batch_size": 8}
    ref = embed_slides(slides, "tiny-cnn", tmp_path / "ref.zarr", client=client, **kw)
    assert len(ref.done) == 4

    killed = tmp_path / "killed.zarr"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_KILL_SCRIPT.format(tile=TILE)))
    proc = subprocess.Popen([sys.executable, str(script), *slides, str(killed),
                             client.scheduler.address], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # another process writes the store: polled (every 20 ms, to strike early) with a deadline;
    # if the run ends first, the returncode assertion below says so
    wait_until(lambda: proc.poll() is not None or (
        killed.exists() and any((killed / "slides").glob("*/features"))), 240,
        "the run to complete its first slide", interval=0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    survived = TileStore(killed, mode="r").slide_ids
    assert 1 <= len(survived) < 4, survived
    assert (killed / ".lock").exists()  # the killed run still "holds" the store

    import logging

    with caplog.at_level(logging.WARNING, logger="wsi_ssl.store._lock"):
        rerun = embed_slides(slides, "tiny-cnn", killed, client=client, **kw)
    assert f"took over the stale lock of tile store '{killed}' left by " in caplog.text
    assert f"PID {proc.pid}" in caplog.text
    assert not (killed / ".lock").exists()
    assert set(rerun.skipped) == set(survived)
    assert len(rerun.done) == 4 - len(survived) and rerun.ok
    _assert_same_store(TileStore(killed, mode="r"), TileStore(tmp_path / "ref.zarr", mode="r"))
    assert not list((killed / ".tmp").iterdir())


def test_cli_embed_and_info(cohort, slides_dir, client, tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    rows = [f"{p},{p.stem.upper()}," for p in _good(cohort)[:2]]
    manifest.write_text("path,slide_id,mpp\n" + "\n".join(rows) + "\n"
                        f"{slides_dir / 'broken.svs'},bad,\n")
    store = tmp_path / "cli.zarr"
    rc = main(["embed", "--manifest", str(manifest), "--store", str(store), "--encoder",
               "tiny-cnn", "--tile-size", str(TILE), "--views", "2", "--view-tiles", "4",
               "--scheduler", client.scheduler.address])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED    1 slides" in out and "bad" in out
    assert TileStore(store).slide_ids == ["SLIDE0", "SLIDE1"]
    rc = main(["info", str(store), "--slides"])
    out = capsys.readouterr().out
    assert rc == 0 and "tiny-cnn" in out and "SLIDE1" in out and "2x4" in out
    assert "failures       1" in out
    rc = main(["embed", str(cohort / "slide0.svs"), "--store", str(store), "--tile-size", "64",
               "--encoder", "tiny-vit", "--scheduler", "sync"])
    err = capsys.readouterr().err
    assert rc == 1 and "refusing to add features from 'tiny-vit'" in err
    summary = TileStore(store).summary()
    assert summary.slides == 2 and '"slides": 2' in json.dumps(summary.to_dict())

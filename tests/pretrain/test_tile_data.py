"""Streaming random tissue tiles from real and generated slides."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_ssl.errors import ConfigError, InputError
from wsi_ssl.pretrain import TileSSLDataset
from wsi_ssl.pretrain._tile_data import make_tile_loader

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def cmu(slides_dir: Path) -> Path:
    return slides_dir / "cmu-1-small-region.svs"


def test_batches_shape_and_tissue(cmu):
    ds = TileSSLDataset([cmu], tile_size=64, mpp=0.5, batch_size=12, batches_per_epoch=3, seed=1)
    batches = list(ds)
    assert len(batches) == 3 == len(ds)
    for b in batches:
        assert b.dtype == torch.uint8 and b.shape == (12, 3, 64, 64)
    # tiles come from tissue: darker than the glass (~240) and coloured
    x = torch.cat(batches).float()
    assert float(x.mean()) < 215
    ds.close()


def test_deterministic_per_epoch_and_seed(cmu):
    def run(seed, epoch):
        ds = TileSSLDataset([cmu], tile_size=32, mpp=1.0, batch_size=8, batches_per_epoch=2,
                            seed=seed)
        ds.set_epoch(epoch)
        out = torch.cat(list(ds))
        ds.close()
        return out

    a = run(0, 0)
    assert torch.equal(a, run(0, 0))
    assert not torch.equal(a, run(0, 1))
    assert not torch.equal(a, run(1, 0))


def test_dataloader_worker_gives_the_same_stream(cmu, synthetic_slide):
    kw = dict(tile_size=32, mpp=1.0, batch_size=8, batches_per_epoch=3, seed=3,
              tiles_per_slide=4)
    ds = TileSSLDataset([cmu, synthetic_slide], **kw)
    in_process = list(make_tile_loader(ds, num_workers=0))
    worker = list(make_tile_loader(TileSSLDataset([cmu, synthetic_slide], **kw), num_workers=1))
    assert len(worker) == 3
    for a, b in zip(in_process, worker, strict=True):
        assert torch.equal(a, b)
    # both slides are used: every streamed tile is close to a grid tile of one slide and far from
    # all of the other's (read in other regions, so not bit-equal), and each slide gives some
    grids = []
    for i in range(2):
        slide, grid = ds._open(i)
        grids.append(ds._read(slide, grid, np.arange(len(grid))).astype(np.float32))
    src = []
    for t in torch.cat(in_process).permute(0, 2, 3, 1).numpy().astype(np.float32):
        dist = [float(np.abs(g - t).mean(axis=(1, 2, 3)).min()) for g in grids]
        assert max(dist) > 2 * min(dist), dist  # mean |difference| in grey levels
        src.append(int(np.argmin(dist)))
    assert 0 < sum(src) < len(src), src
    ds.close()


def test_tiles_match_read_tiles(synthetic_slide):
    from wsi_ssl.tiling import open_slide, read_tiles, tile_grid

    ds = TileSSLDataset([synthetic_slide], tile_size=32, mpp=1.0, batch_size=6,
                        batches_per_epoch=1)
    with open_slide(synthetic_slide) as slide:
        grid = tile_grid(slide, mpp=1.0, tile_size=32, min_tissue=0.5)
        idx = np.array([5, 2, 5, 0])
        got = ds._read(slide, grid, idx)
        ref = {int(i): t for b in read_tiles(slide, grid, indices=[0, 2, 5], read_threads=1)
               for i, t in zip(b.indices, b.tiles, strict=True)}
    assert got.shape == (4, 32, 32, 3)
    for k, i in enumerate(idx):
        assert np.array_equal(got[k], ref[int(i)])


def test_bad_slides_are_skipped(cmu, slides_dir, caplog):
    broken = slides_dir / "broken.svs"
    ds = TileSSLDataset([broken, cmu], tile_size=32, mpp=1.0, batch_size=8,
                        batches_per_epoch=2)
    with caplog.at_level(logging.WARNING, logger="wsi_ssl.pretrain._tile_data"):
        batches = list(ds)
    assert len(batches) == 2
    assert any("broken.svs" in r.getMessage() for r in caplog.records)
    only_bad = TileSSLDataset([broken], tile_size=32, mpp=1.0, batch_size=8,
                              batches_per_epoch=1)
    with pytest.raises(InputError, match="none of the 1 slides gives tissue tiles"):
        list(only_bad)


def test_missing_mpp_needs_assume_mpp(slides_dir):
    tcga = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    ds = TileSSLDataset([tcga], tile_size=32, mpp=2.0, batch_size=4, batches_per_epoch=1)
    with pytest.raises(InputError, match="none of the 1 slides"):
        list(ds)
    ok = TileSSLDataset([tcga], tile_size=32, mpp=2.0, batch_size=4, batches_per_epoch=1,
                        assume_mpp=0.5, min_tissue=0.3)
    assert list(ok)[0].shape == (4, 3, 32, 32)
    ok.close()


def test_config_errors(cmu):
    with pytest.raises(ConfigError, match=r"TileSSLDataset\(batch_size=1\) must be an integer >= 2"):
        TileSSLDataset([cmu], batch_size=1)
    with pytest.raises(ConfigError, match="mpp=0"):
        TileSSLDataset([cmu], mpp=0)
    with pytest.raises(InputError, match="no slides"):
        TileSSLDataset([])

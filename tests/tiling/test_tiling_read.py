"""read_tiles / tiles_as_dask / plot_grid on real and generated slides."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_ssl.errors import ConfigError, SlideOpenError
from wsi_ssl.tiling import TileBatch, open_slide, plot_grid, read_tiles, tile_grid, tiles_as_dask
from wsi_ssl.tiling._read import plan_regions


@pytest.mark.parametrize("batch_size,region_size", [(64, 4096), (5, 600)])
def test_every_index_exactly_once(synthetic_slide, batch_size, region_size):
    with open_slide(synthetic_slide) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=224, min_tissue=0.1)
        assert len(grid) > 20
        seen = []
        for batch in read_tiles(slide, grid, batch_size=batch_size, num_workers=2,
                                region_size=region_size):
            assert isinstance(batch, TileBatch)
            assert batch.tiles.dtype == np.uint8 and batch.tiles.shape[1:] == (224, 224, 3)
            assert batch.indices.dtype == np.int64 and len(batch.indices) <= batch_size
            seen.append(batch.indices)
        seen = np.concatenate(seen)
        assert len(seen) == len(grid) and np.array_equal(np.sort(seen), np.arange(len(grid)))


def test_region_tiles_equal_single_tile_reads(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=224, min_tissue=0.1)
        for tiles, idx in read_tiles(slide, grid, batch_size=16, region_size=1000):
            for t, i in zip(tiles, idx, strict=False):
                x, y = grid.coords[i]
                assert np.array_equal(t, slide.read_region((int(x), int(y)), 0, (224, 224)))
            break


def test_regions_are_bounded_by_region_size(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=224, min_tissue=0.0)
        regions = plan_regions(slide, grid, np.arange(len(grid)), region_size=1024)
        assert len(regions) > 4
        for reg in regions:  # memory per region does not depend on the slide size
            assert ((reg.cols - 1) * 224 + 224) <= 1024 and ((reg.rows - 1) * 224 + 224) <= 1024
        assert sum(len(r.tiles) for r in regions) == len(grid)


def test_indices_subset_and_backends_agree(synthetic_slide):
    with open_slide(synthetic_slide, backend="tiffslide") as a, \
            open_slide(synthetic_slide, backend="openslide") as b:
        from wsi_ssl.tiling import detect_tissue

        tissue = detect_tissue(a)  # thumbnails come from different levels: share one mask
        ga = tile_grid(a, mpp=0.5, min_tissue=0.1, tissue=tissue)
        gb = tile_grid(b, mpp=0.5, min_tissue=0.1, tissue=tissue)
        assert np.array_equal(ga.coords, gb.coords)
        want = [len(ga) - 1, 3, 0]
        ta = next(read_tiles(a, ga, indices=want, batch_size=8))
        tb = next(read_tiles(b, gb, indices=want, batch_size=8))
        assert sorted(ta.indices.tolist()) == sorted(want)
        order_a, order_b = np.argsort(ta.indices), np.argsort(tb.indices)
        assert np.array_equal(ta.tiles[order_a], tb.tiles[order_b])
        with pytest.raises(ConfigError, match="indices="):
            next(read_tiles(a, ga, indices=[len(ga)]))
        with pytest.raises(ConfigError, match="batch_size=0"):
            read_tiles(a, ga, batch_size=0)


def test_ndpi_resized_tiles_match_per_tile_resize(slides_dir):
    from PIL import Image

    with open_slide(slides_dir / "test3-DAPI-2-(387).ndpi") as slide:
        grid = tile_grid(slide, mpp=0.5, min_tissue=0.0)
        batch = next(read_tiles(slide, grid, batch_size=len(grid)))
        for t, i in list(zip(batch.tiles, batch.indices, strict=False))[::9]:
            x, y = grid.coords[i]
            ref = slide.read_region((int(x), int(y)), grid.level, (grid.read_size, grid.read_size))
            ref = np.asarray(Image.fromarray(ref).resize((224, 224), Image.Resampling.BILINEAR))
            assert np.abs(t.astype(int) - ref.astype(int)).mean() < 8  # sub-pixel resampling


def test_read_error_is_a_slide_open_error(slides_dir, tmp_path):
    # a slide whose pixels go away after opening: the backend error is wrapped, naming the file
    import shutil

    path = tmp_path / "gone.svs"
    shutil.copy(slides_dir / "synthetic_openslide_fixtures" / "small.svs", path)
    img = np.zeros((64, 64, 3), np.uint8)
    with open_slide(img, mpp=0.5) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=16, min_tissue=0.0)

        def boom(*a, **k):
            raise RuntimeError("disk vanished")

        slide._read_level = boom
        with pytest.raises(SlideOpenError, match="disk vanished"):
            list(read_tiles(slide, grid))


def test_tiles_as_dask(synthetic_slide):
    import dask

    with open_slide(synthetic_slide) as slide:
        grid = tile_grid(slide, mpp=0.5, min_tissue=0.1)
        arr = tiles_as_dask(slide, grid, chunk_size=16)
        assert arr.shape == (len(grid), 224, 224, 3) and arr.dtype == np.uint8
        assert arr.chunks[0][0] == 16
        with dask.config.set(scheduler="threads"):
            part = arr[10:20].compute()
        ref = {}
        for tiles, idx in read_tiles(slide, grid, indices=range(10, 20)):
            ref.update(zip(idx.tolist(), tiles, strict=False))
        assert np.array_equal(part, np.stack([ref[i] for i in range(10, 20)]))


def test_plot_grid_returns_figure(slides_dir, tmp_path):
    from matplotlib.figure import Figure

    from wsi_ssl.tiling import detect_tissue

    with open_slide(slides_dir / "cmu-1-small-region.svs") as slide:
        tissue = detect_tissue(slide)
        grid = tile_grid(slide, mpp=0.5, tissue=tissue)
        fig = plot_grid(slide, grid, tissue)
        assert isinstance(fig, Figure)
        assert len(fig.axes[0].collections) >= 2  # tissue contour + tile boxes
        fig.savefig(tmp_path / "qc.png")
        assert (tmp_path / "qc.png").stat().st_size > 10_000
        empty = grid.subset([])
        assert isinstance(plot_grid(slide, empty), Figure)

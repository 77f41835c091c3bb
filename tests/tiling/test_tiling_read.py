"""read_tiles / tiles_as_dask / plot_grid on real and generated slides."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_ssl.datasets import write_pyramidal_tiff
from wsi_ssl.errors import ConfigError, SlideOpenError
from wsi_ssl.tiling import (
    TileBatch,
    detect_tissue,
    open_slide,
    plot_grid,
    read_tiles,
    tile_grid,
    tiles_as_dask,
)
from wsi_ssl.tiling._read import _read_region_tiles, plan_regions


@pytest.mark.parametrize("batch_size,region_size", [(64, 4096), (5, 600)])
def test_every_index_exactly_once(synthetic_slide, batch_size, region_size):
    with open_slide(synthetic_slide) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=224, min_tissue=0.1)
        assert len(grid) > 20
        seen = []
        for batch in read_tiles(slide, grid, batch_size=batch_size, read_threads=2,
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


def test_memory_is_bounded_by_regions_in_flight_not_by_slide_size(synthetic_slide):
    import tracemalloc

    with open_slide(synthetic_slide) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=224, min_tissue=0.0)
        peaks = {}
        for name, idx in (("quarter", np.arange(len(grid) // 4)), ("all", np.arange(len(grid)))):
            tracemalloc.start()
            n = sum(len(b.indices) for b in read_tiles(slide, grid, batch_size=16, read_threads=2,
                                                       indices=idx, region_size=672))
            peaks[name] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert n == len(idx)
        # 4x the tiles, no more memory: the peak (~8-12 MB, depending on thread timing) is
        # (read_threads + 2) regions of 672^2 px, batches and buffers, far below the decoded
        # tiles of the quarter (>= 7.5 MB) or of the whole grid (>= 30 MB)
        assert len(grid) >= 200
        tiles_bytes = len(grid) * 224 * 224 * 3
        assert peaks["all"] < 16e6 < tiles_bytes / 2, (peaks, tiles_bytes)
        assert peaks["all"] - peaks["quarter"] < tiles_bytes * 3 / 4 / 6, (peaks, tiles_bytes)


def test_indices_subset_and_backends_agree(synthetic_slide):
    with open_slide(synthetic_slide, backend="tiffslide") as a, \
            open_slide(synthetic_slide, backend="openslide") as b:
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


# -- resizing (grids read from a finer level) ------------------------------------------------
LINE0, PERIOD0 = 50, 97  # dark 3 px lines at level-0 x, y = LINE0 + j * PERIOD0


@pytest.fixture(scope="module")
def ruled_slides(tmp_path_factory):
    """A ruled slide at 0.2282 µm/px (like a 40x NDPI) written with one and with two levels:
    read at 0.5 µm/px from level 0 (f = 2.19: 2x2 block average + bilinear 1.096) and from level 1
    (f = 1.096: bilinear only)."""
    img = np.full((1800, 2600, 3), 250, np.uint8)
    for v in range(LINE0, 2600, PERIOD0):
        img[:, v: v + 3] = 30
    for v in range(LINE0, 1800, PERIOD0):
        img[v: v + 3, :] = 30
    d = tmp_path_factory.mktemp("ruled")
    return {n: write_pyramidal_tiff(d / f"ruled{n}.tif", img, mpp=0.2282, n_levels=n, downsample=2,
                                    quality=95) for n in (1, 2)}


def _line_centres(profile: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Darkness-weighted centroids (output px, pixel centres at i) near each expected position."""
    dark = 255.0 - profile
    dark -= np.median(dark)
    out = []
    for e in expected:
        lo, hi = int(np.floor(e)) - 3, int(np.ceil(e)) + 4
        w = np.clip(dark[lo:hi], 0, None)
        out.append(float((w * np.arange(lo, hi)).sum() / w.sum()))
    return np.asarray(out)


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("engine", ["cv2", "pil"])
def test_resized_tiles_keep_the_scale_and_position(ruled_slides, levels, engine):
    with open_slide(ruled_slides[levels]) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=224, min_tissue=0.0)
        assert grid.level == levels - 1 and grid.needs_resize
        scale0 = grid.scale0  # level-0 px per output px (2.19 / 2.19)
        regions = plan_regions(slide, grid, np.arange(len(grid)), region_size=700)
        assert len(regions) >= 4  # several region origins: sub-pixel alignment of each
        slopes, errs = [], []
        for reg in regions:
            img = _read_region_tiles(slide, grid, reg, engine)
            ox0, oy0 = reg.c0 * 224, reg.r0 * 224
            for axis, o0 in ((1, ox0), (0, oy0)):
                lines = LINE0 + 1.5 + PERIOD0 * np.arange(40)  # level-0 line centres
                exp = (lines - o0 * scale0) / scale0 - 0.5  # output pixel-centre coordinates
                exp = exp[(exp > 6) & (exp < img.shape[axis] - 7)]
                got = _line_centres(img.mean(axis=(1 - axis, 2)), exp)
                errs.append(np.abs(got - exp).max())
                slopes.append(np.polyfit(exp, got, 1)[0])
        # the scale within 1 % of 0.5 µm/px (in fact within 0.2 %), lines within 0.3 output px
        assert np.all(np.abs(np.asarray(slopes) - 1) < 0.002), slopes
        assert max(errs) < 0.3, errs


def test_opencv_resize_is_close_to_the_antialiased_pil_resize(slides_dir, synthetic_slide,
                                                               slide_025):
    # (slide, mpp, bound on the mean |difference|, on its 99th percentile), grey levels 0-255.
    # Real slides: a 40x NDPI at 20x (f = 1.096, measured 0.12-0.16 / 2-3) and the CMU H&E slide
    # at 0.6 µm/px (f = 1.2, 0.4-0.85 / 6-9). Generated H&E-like texture with pixel noise at
    # f = 2 (2x2 box average vs PIL's 4-tap triangle, 1.5-1.9 / 13-14) and f = 1.6 (2x2 average,
    # then upsampled, 0.1-1.4 / 4-15).
    cases = [(slides_dir / "test3-DAPI-2-(387).ndpi", 0.5, 0.3, 5),
             (slides_dir / "cmu-1-small-region.svs", 0.6, 1.5, 14),
             (slide_025, 0.5, 2.6, 20), (synthetic_slide, 0.8, 2.2, 20)]
    for path, mpp, mean_max, p99_max in cases:
        with open_slide(path) as slide:
            grid = tile_grid(slide, mpp=mpp, tile_size=224, min_tissue=0.0)
            assert grid.needs_resize
            for reg in plan_regions(slide, grid, np.arange(len(grid)), region_size=1500)[:3]:
                a = _read_region_tiles(slide, grid, reg, "pil").astype(int)
                b = _read_region_tiles(slide, grid, reg, "cv2").astype(int)
                assert a.shape == b.shape
                d = np.abs(a - b)
                assert d.mean() < mean_max and np.percentile(d, 99) <= p99_max, (path.name, d.mean())


def test_read_error_is_a_slide_open_error():
    # a slide whose pixels go away after opening: the backend error is wrapped, naming the slide
    img = np.zeros((64, 64, 3), np.uint8)
    with open_slide(img, slide_mpp=0.5) as slide:
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


@pytest.mark.parametrize("mpp", [0.6, 1.0])
def test_a_tile_does_not_depend_on_the_batch_it_is_read_with(slides_dir, mpp):
    # resized reads (f = 1.2: bilinear; f = 2.0: 2x2 blocks): tile i read alone, or with the whole
    # grid in other regions, gives the same pixels (the view bank reads subsets of the grid)
    with open_slide(slides_dir / "cmu-1-small-region.svs") as slide:
        grid = tile_grid(slide, mpp=mpp, tile_size=32, min_tissue=0.0)
        assert grid.needs_resize
        every = np.zeros((len(grid), 32, 32, 3), np.uint8)
        for b in read_tiles(slide, grid, batch_size=256):
            every[b.indices] = b.tiles
        for i in range(0, len(grid), max(1, len(grid) // 25)):
            alone = next(read_tiles(slide, grid, indices=np.array([i]))).tiles[0]
            d = np.abs(alone.astype(int) - every[i].astype(int))
            assert d.mean() < 0.05 and d.max() <= 2, (i, d.mean(), d.max())

"""tile_grid: level choice, MPP-exact geometry, errors, empty grids."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsi_ssl.errors import ConfigError, MissingMPPError, ResolutionError, TissueWarning
from wsi_ssl.tiling import TileGrid, open_slide, read_tiles, tile_grid, tile_slides
from wsi_ssl.tiling._batch import SavedGrid, load_grid


def test_ndpi_40x_reads_level_with_downsample_2_and_resizes(slides_dir):
    with open_slide(slides_dir / "test3-DAPI-2-(387).ndpi") as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=224, min_tissue=0.0)
        assert slide.level_downsamples[grid.level] == pytest.approx(2.0)
        assert grid.read_size == round(224 * 0.5 / (0.228175 * 2))  # 245 px read, resized to 224
        assert grid.stride_level0 == pytest.approx(224 * 0.5 / slide.slide_mpp)
        assert grid.grid_shape == (int(4864 * 0.228175 / 0.5 // 224), int(3968 * 0.228175 / 0.5 // 224))
        batch = next(read_tiles(slide, grid, batch_size=4))
        assert batch.tiles.shape == (4, 224, 224, 3)


def test_same_resolution_within_tolerance_reads_level0_without_resize(slides_dir):
    with open_slide(slides_dir / "cmu-1-small-region.svs") as slide:  # 0.499 µm/px
        grid = tile_grid(slide, mpp=0.5, min_tissue=0.25)
    assert isinstance(grid, TileGrid)
    assert grid.level == 0 and grid.read_size == 224 and grid.stride_level0 == 224.0
    assert 30 < len(grid) < 117  # tissue only, not the whole 9 x 13 grid
    assert grid.coords.dtype == np.int64 and grid.coords.shape == (len(grid), 2)
    assert grid.tissue_fraction.dtype == np.float32 and (grid.tissue_fraction >= 0.25).all()
    assert (grid.coords[:, 0] + 224 <= 2220).all() and (grid.coords[:, 1] + 224 <= 2967).all()
    assert (grid.coords % 224 == 0).all()


def test_tile_at_05_from_025_slide_equals_downsampled_level0(slide_025):
    with open_slide(slide_025, backend="openslide") as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=128, min_tissue=0.5)
        assert grid.level == 0 and grid.read_size == 256 and grid.stride_level0 == 256.0
        assert len(grid) > 5
        got = {}
        for tiles, idx in read_tiles(slide, grid, batch_size=7, read_threads=2):
            got.update(zip(idx.tolist(), tiles, strict=False))
        for k in (0, len(grid) // 2, len(grid) - 1):
            x, y = grid.coords[k]
            ref = slide.read_region((int(x), int(y)), 0, (256, 256))
            ref = np.asarray(Image.fromarray(ref).resize((128, 128), Image.Resampling.BOX))
            diff = np.abs(got[k].astype(int) - ref.astype(int))
            assert diff.mean() < 3.0, k  # JPEG + resampling tolerance
            # a tile shifted by one output pixel is clearly worse: the grid is exact
            shifted = slide.read_region((int(x) + 2, int(y)), 0, (256, 256))
            shifted = np.asarray(Image.fromarray(shifted).resize((128, 128), Image.Resampling.BOX))
            assert np.abs(got[k].astype(int) - shifted.astype(int)).mean() > diff.mean()


def test_coarser_level_is_used_when_it_matches(slide_025):
    with open_slide(slide_025, backend="openslide") as slide:  # levels 0.25 and 1.0 µm/px
        grid = tile_grid(slide, mpp=1.0, tile_size=64, min_tissue=0.0)
        assert grid.level == 1 and grid.read_size == 64 and grid.stride_level0 == 256.0
        grid2 = tile_grid(slide, mpp=0.9, tile_size=64, min_tissue=0.0)
        assert grid2.level == 0 and grid2.read_size == round(64 * 0.9 / 0.25)


def test_target_finer_than_level0_is_an_error(slides_dir):
    with open_slide(slides_dir / "multiframe_camelyon_challenge_image.dcm") as slide:
        with pytest.raises(ResolutionError, match=r"mpp=0\.5 .*finer than level 0"):
            tile_grid(slide, mpp=0.5)
        grid = tile_grid(slide, mpp=64.0, tile_size=16, min_tissue=0.0)  # coarser is fine
        assert len(grid) == (1152 * 28.9685 / 64 // 16) * (700 * 28.9685 / 64 // 16)


def test_missing_mpp_then_override(slides_dir):
    path = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    with open_slide(path) as slide:
        with pytest.raises(MissingMPPError, match="mpp="):
            tile_grid(slide)
    with open_slide(path, slide_mpp=0.25) as slide:
        grid = tile_grid(slide, mpp=0.5)
        assert grid.level == 1 and len(grid) > 20


def test_no_tissue_gives_empty_grid_and_warning(white_slide):
    with open_slide(white_slide) as slide:
        with pytest.warns(TissueWarning, match="empty tile grid"):
            grid = tile_grid(slide, mpp=0.5, tile_size=128)
        assert len(grid) == 0 and grid.coords.shape == (0, 2)
        assert list(read_tiles(slide, grid)) == []
        assert len(tile_grid(slide, mpp=0.5, tile_size=128, min_tissue=0.0)) == 8 * 10


def test_overlap_and_bad_arguments(slides_dir):
    with open_slide(slides_dir / "cmu-1-small-region.svs") as slide:
        g = tile_grid(slide, mpp=0.5, tile_size=224, overlap=24, min_tissue=0.0)
        assert g.stride_level0 == 200.0 and g.grid_shape == ((2967 - 224) // 200 + 1, (2220 - 224) // 200 + 1)
        for kw, msg in [({"mpp": 0}, "mpp=0"), ({"tile_size": 3}, "tile_size=3"),
                        ({"overlap": 224}, "overlap=224"), ({"min_tissue": 2}, "min_tissue=2"),
                        ({"tissue": "x"}, "tissue=")]:
            with pytest.raises(ConfigError, match=msg):
                tile_grid(slide, **kw)


def test_load_grid_reads_back_the_tile_grid(slides_dir, tmp_path):
    """tile_slides writes a grid; load_grid returns it as a dataclass holding the same TileGrid."""
    cmu = slides_dir / "cmu-1-small-region.svs"
    tile_slides([cmu], tmp_path, mpp=0.5, tile_size=224, plot=False)
    saved = load_grid(tmp_path / "cmu-1-small-region")
    with open_slide(cmu) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=224, min_tissue=0.25)
    assert isinstance(saved, SavedGrid) and saved.slide_id == "cmu-1-small-region"
    assert saved.meta["n_tiles"] == len(grid) == len(saved.grid)
    np.testing.assert_array_equal(saved.coords, grid.coords)
    np.testing.assert_array_equal(saved.grid.cells, grid.cells)
    np.testing.assert_allclose(saved.grid.tissue_fraction, grid.tissue_fraction, atol=1e-4)
    for name in ("mpp", "tile_size", "level", "read_size", "stride_level0", "overlap",
                 "grid_shape", "backend"):
        assert getattr(saved.grid, name) == getattr(grid, name), name
    with pytest.raises(TypeError):
        meta, coords = saved  # a SavedGrid, no longer the 0.1 (meta, coords) tuple

"""The optional tiatoolbox backend (run by .ci/run in a venv with ``wsi-ssl[tiatoolbox]``)."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_ssl.tiling import open_slide, read_tiles, tile_grid

pytestmark = pytest.mark.tiatoolbox


@pytest.fixture(autouse=True)
def _needs_tiatoolbox():
    # inside a fixture, so the main venv's `-m "not tiatoolbox"` deselects quietly (no skip)
    pytest.importorskip("tiatoolbox")


def test_svs_pixels_match_openslide(slides_dir):
    path = slides_dir / "cmu-1-small-region.svs"
    with open_slide(path, backend="tiatoolbox") as tia, open_slide(path, backend="openslide") as osl:
        assert tia.backend == "tiatoolbox"
        assert tia.dimensions == osl.dimensions
        assert tia.slide_mpp == pytest.approx(0.499, rel=1e-3)
        a = tia.read_region((500, 700), 0, (256, 200))
        b = osl.read_region((500, 700), 0, (256, 200))
        assert a.shape == b.shape == (200, 256, 3)
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0


def test_plain_strip_tiff_opens(slides_dir):
    with open_slide(slides_dir / "kidney-48-5.tif", backend="tiatoolbox", slide_mpp=0.5) as slide:
        assert slide.dimensions == (1493, 901)
        assert slide.read_region((700, 400), 0, (32, 32)).std() > 0


def test_numpy_array_as_virtual_slide():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
    with open_slide(img, backend="tiatoolbox", slide_mpp=0.5) as slide:
        assert slide.backend == "tiatoolbox" and slide.dimensions == (800, 600)
        assert np.array_equal(slide.read_region((100, 50), 0, (64, 64)), img[50:114, 100:164])
        grid = tile_grid(slide, mpp=0.5, tile_size=100, min_tissue=0.0)
        assert len(grid) == 6 * 8
        n = sum(len(b.indices) for b in read_tiles(slide, grid, batch_size=10))
        assert n == len(grid)

"""open_slide on every real slide of the shared data, the broken ones, backends and MPP."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_ssl.errors import BackendUnavailableError, ConfigError, MissingMPPError, SlideOpenError
from wsi_ssl.tiling import Slide, open_slide

# file -> (backend chosen by auto, level-0 (w, h), MPP or None)
REAL = {
    "cmu-1-small-region.svs": ("tiffslide", (2220, 2967), 0.499),
    "tcga-cr-7395-01a-01-ts1.svs": ("tiffslide", (4443, 3567), None),
    "test3-DAPI-2-(387).ndpi": ("tiffslide", (3968, 4864), 0.228175),
    "multiframe_camelyon_challenge_image.dcm": ("openslide", (1152, 700), 28.9685),
    "kidney-48-5.tif": ("tiffslide", (1493, 901), None),
    "synthetic_openslide_fixtures/small.svs": ("tiffslide", (16, 16), 0.499),
    "synthetic_openslide_fixtures/boxes.tiff": ("tiffslide", (300, 250), 352.7778),  # 72 dpi tags
    "synthetic_openslide_fixtures/boxes_0.dcm": ("openslide", (16, 16), 0.499),
}
BROKEN = ["broken.svs", "synthetic_openslide_fixtures/unopenable.tiff",
          "synthetic_openslide_fixtures/unreadable.svs"]


@pytest.mark.parametrize("name", sorted(REAL))
def test_every_real_slide_opens(slides_dir, name):
    backend, dims, mpp = REAL[name]
    with open_slide(slides_dir / name) as slide:
        assert isinstance(slide, Slide)
        assert slide.backend == backend
        assert slide.dimensions == dims
        assert slide.level_dimensions[0] == dims
        assert slide.level_downsamples[0] == 1.0
        assert len(slide.level_downsamples) == slide.level_count >= 1
        if mpp is not None:
            assert slide.slide_mpp == pytest.approx(mpp, rel=1e-3)
            assert slide.mpp_assumed is False
        else:
            with pytest.raises(MissingMPPError, match="mpp="):
                _ = slide.slide_mpp
        region = slide.read_region((0, 0), 0, (min(64, dims[0]), min(48, dims[1])))
        assert region.dtype == np.uint8 and region.shape == (min(48, dims[1]), min(64, dims[0]), 3)
        thumb = slide.thumbnail(128)
        assert thumb.dtype == np.uint8 and max(thumb.shape[:2]) == min(128, max(dims))


@pytest.mark.parametrize("name", BROKEN)
def test_broken_slides_name_path_and_backends(slides_dir, name):
    path = slides_dir / name
    with pytest.raises(SlideOpenError, match=r"tiffslide: .*openslide: ") as info:
        open_slide(path)
    assert path.name in str(info.value)
    assert isinstance(info.value, OSError)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(SlideOpenError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideOpenError, match="is a directory"):
        open_slide(tmp_path)


def test_missing_mpp_is_lazy_and_overridable(slides_dir):
    path = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    with open_slide(path) as slide:
        assert slide.thumbnail(64).shape[1] == 64  # looking at it works without MPP
        with pytest.raises(MissingMPPError, match=r"tcga-cr-7395-01a-01-ts1\.svs.*mpp=.*--assume-mpp"):
            _ = slide.slide_mpp
    with open_slide(path, slide_mpp=0.25) as slide:
        assert slide.slide_mpp == 0.25 and slide.mpp_assumed is True


def test_mpp_override_replaces_metadata(slides_dir):
    with open_slide(slides_dir / "cmu-1-small-region.svs", slide_mpp=0.3) as slide:
        assert slide.slide_mpp == 0.3 and slide.mpp_assumed
    with pytest.raises(ConfigError, match="slide_mpp=-1"):
        open_slide(slides_dir / "cmu-1-small-region.svs", slide_mpp=-1)


def test_kidney_plain_strip_tiff_opens_via_tiffslide_not_openslide(slides_dir):
    path = slides_dir / "kidney-48-5.tif"
    with open_slide(path, backend="tiffslide") as slide:
        assert slide.read_region((700, 400), 0, (32, 32)).std() > 0
    with pytest.raises(SlideOpenError, match=r"kidney-48-5\.tif.*openslide: "):
        open_slide(path, backend="openslide")


@pytest.mark.parametrize("name,level", [
    ("cmu-1-small-region.svs", 0),
    ("test3-DAPI-2-(387).ndpi", 0),
    ("test3-DAPI-2-(387).ndpi", 1),
    ("synthetic_openslide_fixtures/boxes.tiff", 0),
])
def test_tiffslide_and_openslide_agree_on_pixels(slides_dir, name, level):
    with open_slide(slides_dir / name, backend="tiffslide") as a, \
            open_slide(slides_dir / name, backend="openslide") as b:
        assert a.dimensions == b.dimensions
        w, h = a.level_dimensions[level]
        xy0 = (int(w // 5 * a.level_downsamples[level]), int(h // 3 * a.level_downsamples[level]))
        size = (min(400, w - w // 5), min(300, h - h // 3))
        ra, rb = a.read_region(xy0, level, size), b.read_region(xy0, level, size)
        assert ra.std() > 1  # not a blank area
        assert np.abs(ra.astype(int) - rb.astype(int)).mean() < 1.0


def test_generated_tiff_agrees_between_backends(slide_025):
    with open_slide(slide_025, backend="tiffslide") as a, open_slide(slide_025, backend="openslide") as b:
        assert a.slide_mpp == pytest.approx(0.25) and b.slide_mpp == pytest.approx(0.25)
        ra = a.read_region((517, 333), 0, (700, 500))
        rb = b.read_region((517, 333), 0, (700, 500))
        assert np.array_equal(ra, rb)


def test_out_of_bounds_reads_white(slides_dir):
    with open_slide(slides_dir / "cmu-1-small-region.svs") as slide:
        w, h = slide.dimensions
        r = slide.read_region((w - 10, h - 10), 0, (30, 30))
        assert r.shape == (30, 30, 3)
        assert (r[15:, :] == 255).all() and (r[:, 15:] == 255).all()


def test_path_with_spaces_and_parentheses(spaced_slide, slides_dir):
    with open_slide(spaced_slide) as slide:
        assert slide.slide_id == "my_slide_copy_2"
        assert slide.dimensions == (2220, 2967)
    with open_slide(slides_dir / "test3-DAPI-2-(387).ndpi") as slide:
        assert slide.slide_id == "test3-DAPI-2-_387"


def test_backend_errors(slides_dir):
    with pytest.raises(ConfigError, match="backend='bogus'"):
        open_slide(slides_dir / "cmu-1-small-region.svs", backend="bogus")
    try:
        import tiatoolbox  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match=r"wsi-ssl\[tiatoolbox\]"):
            open_slide(slides_dir / "cmu-1-small-region.svs", backend="tiatoolbox")


def test_numpy_array_virtual_slide():
    img = np.zeros((300, 400, 3), np.uint8)
    img[100:200, 50:150] = (200, 30, 90)
    with open_slide(img, slide_mpp=0.5) as slide:
        assert slide.backend == "numpy" and slide.dimensions == (400, 300)
        assert slide.slide_mpp == 0.5
        assert np.array_equal(slide.read_region((50, 100), 0, (100, 100)), img[100:200, 50:150])
    with pytest.raises(ConfigError, match="uint8"):
        open_slide(np.zeros((10, 10), np.float32))


def test_16bit_slide_regions_share_one_intensity_scale(tmp_path):
    """Two regions of one 16-bit slide whose maxima differ map the same raw value to the same
    8-bit value (the scale is the dtype's range, not each region's maximum)."""
    import tifffile

    img = np.full((256, 512, 3), 20000, np.uint16)
    img[:, 256:] = 60000  # the right region is brighter
    img[100:140, 100:140] = 30000  # the same raw value in both regions
    img[100:140, 356:396] = 30000
    path = tmp_path / "sixteen.tif"
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb")
    with open_slide(path, slide_mpp=0.5) as slide:
        left = slide.read_level((0, 0), 0, (256, 256))
        right = slide.read_level((256, 0), 0, (256, 256))
    assert left.dtype == right.dtype == np.uint8
    same = round(30000 * 255 / 65535)
    assert (left[120, 120] == same).all() and (right[120, 120] == same).all()
    assert (left[10, 10] == round(20000 * 255 / 65535)).all()
    assert (right[10, 10] == round(60000 * 255 / 65535)).all()

"""The generated cohort: real pyramidal TIFFs read back with OpenSlide, labels, survival, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_ssl.datasets import CohortInfo, make_cohort, make_slide, region_fractions
from wsi_ssl.errors import ConfigError, InputError

SMALL = (1536, 1536)  # 2 pyramid levels, ~20 tissue tiles of 224 px


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> CohortInfo:
    return make_cohort(tmp_path_factory.mktemp("cohort"), n_slides=6, seed=3, size=SMALL)


def test_layout_and_labels(cohort: CohortInfo) -> None:
    assert len(cohort) == 6 and all(p.is_file() for p in cohort.paths)
    assert cohort.labels_csv == cohort.out_dir / "labels.csv"
    table = pd.read_csv(cohort.labels_csv)
    assert list(table.columns[:5]) == ["slide_id", "patient_id", "label", "time", "event"]
    assert table["slide_id"].tolist() == [p.stem for p in cohort.paths] == cohort.slide_ids
    assert table["label"].sum() == 3  # exactly balanced
    # the label is carried by the tumour region and nothing else
    assert ((table["tumor_fraction"] > 0) == (table["label"] == 1)).all()
    assert (table["time"] > 0).all() and set(table["event"]) <= {0, 1}
    assert (cohort.out_dir / "cohort.json").is_file()


def test_slides_open_in_openslide_at_half_micron(cohort: CohortInfo) -> None:
    import openslide

    for path in cohort.paths[:2]:
        with openslide.OpenSlide(str(path)) as s:
            assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
            assert float(s.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
            assert s.dimensions == SMALL
            assert s.level_count >= 2
            img = np.asarray(s.read_region((0, 0), 0, SMALL).convert("RGB")).astype(np.float32)
            low = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("RGB"))
    # bright glass and darker stained tissue are both there
    bright = img.mean(-1) > 225
    assert 0.2 < bright.mean() < 0.8
    assert img[~bright].mean() < 200
    # the coarse level is the box-downsampled level 0 (up to JPEG noise)
    k = SMALL[0] // low.shape[1]
    box = img.reshape(low.shape[0], k, low.shape[1], k, 3).mean(axis=(1, 3))
    assert np.abs(box - low).mean() < 4.0


def test_tiffslide_reads_the_same_pixels(cohort: CohortInfo) -> None:
    import openslide
    import tiffslide

    with openslide.OpenSlide(str(cohort.paths[0])) as a, tiffslide.TiffSlide(cohort.paths[0]) as b:
        ra = np.asarray(a.read_region((512, 512), 0, (256, 256)).convert("RGB")).astype(int)
        rb = np.asarray(b.read_region((512, 512), 0, (256, 256)).convert("RGB")).astype(int)
        assert float(b.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
    assert np.abs(ra - rb).mean() < 2.0


def test_same_seed_same_bytes_other_seed_other_slide(tmp_path: Path) -> None:
    kw = dict(size=(768, 768), tumor_fraction=0.1, decoy_fraction=0.05)
    a = make_slide(tmp_path / "a.tif", seed=7, **kw)
    b = make_slide(tmp_path / "b.tif", seed=7, **kw)
    c = make_slide(tmp_path / "c.tif", seed=8, **kw)
    assert _sha(a.path) == _sha(b.path)
    assert _sha(a.path) != _sha(c.path)
    assert a.tumor_fraction == pytest.approx(0.1, abs=0.01)
    assert a.decoy_fraction == pytest.approx(0.05, abs=0.01)


def test_parallel_writing_is_identical_and_rerun_reuses(tmp_path: Path) -> None:
    kw = dict(n_slides=3, seed=11, size=(768, 768))
    serial = make_cohort(tmp_path / "serial", **kw)
    parallel = make_cohort(tmp_path / "parallel", n_workers=2, **kw)
    assert [_sha(p) for p in serial.paths] == [_sha(p) for p in parallel.paths]
    pd.testing.assert_frame_equal(serial.labels, parallel.labels)
    mtimes = [p.stat().st_mtime_ns for p in serial.paths]
    again = make_cohort(tmp_path / "serial", **kw)  # same settings: reused, not rewritten
    assert [p.stat().st_mtime_ns for p in again.paths] == mtimes
    pd.testing.assert_frame_equal(again.labels, serial.labels)
    with pytest.raises(ConfigError, match=r"other settings \(seed\).*overwrite=True"):
        make_cohort(tmp_path / "serial", **{**kw, "seed": 12})
    redone = make_cohort(tmp_path / "serial", overwrite=True, **{**kw, "seed": 12})
    assert _sha(redone.paths[0]) != _sha(parallel.paths[0])


def test_label_region_is_a_minority_of_tissue_tiles(cohort: CohortInfo) -> None:
    tile = 224  # level-0 px at 0.5 µm/px
    xs = np.arange(0, SMALL[0] - tile + 1, tile)
    coords = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
    for sid, label in zip(cohort.labels["slide_id"], cohort.labels["label"], strict=True):
        frac = cohort.tile_fractions(sid, coords, tile)
        assert frac.shape == (len(coords), 4)
        np.testing.assert_allclose(frac.sum(1), 1.0, atol=1e-5)
        tissue = frac[:, 0] < 0.5
        tumor_tiles = (frac[:, 2] > 0.25) & tissue
        if label:
            share = tumor_tiles.sum() / tissue.sum()
            assert 0.0 < share <= 0.3, (sid, share)
        else:
            assert not tumor_tiles.any()


def test_region_map_matches_reported_fractions(cohort: CohortInfo) -> None:
    for _, row in cohort.labels.iterrows():
        m = cohort.region_map(row["slide_id"])
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1, 2, 3}
        tissue = (m > 0).sum()
        assert (m == 2).sum() / tissue == pytest.approx(row["tumor_fraction"], abs=0.03)
        assert (m == 3).sum() / tissue == pytest.approx(row["decoy_fraction"], abs=0.03)
    with pytest.raises(InputError, match="no region map for slide_id='nope'"):
        cohort.region_map("nope")


def test_tumour_looks_different_from_normal_tissue(cohort: CohortInfo) -> None:
    """Tumour tiles are darker (dense large nuclei) than normal tissue at the pixel level."""
    import openslide

    row = cohort.labels[cohort.labels["label"] == 1].iloc[0]
    m = cohort.region_map(row["slide_id"])
    path = cohort.paths[cohort.slide_ids.index(row["slide_id"])]
    with openslide.OpenSlide(str(path)) as s:
        img = np.asarray(s.read_region((0, 0), 0, SMALL).convert("RGB")).astype(np.float32)
    codes = np.repeat(np.repeat(m, 16, 0), 16, 1)[: SMALL[1], : SMALL[0]]
    lum = img.mean(-1)
    assert lum[codes == 2].mean() < lum[codes == 1].mean() - 15
    # ... and the fraction of very dark (nuclear) pixels is much higher in tumour
    dark = lum < 140
    assert dark[codes == 2].mean() > 2 * dark[codes == 1].mean()


def test_survival_times_follow_the_tumour_extent(tmp_path: Path) -> None:
    from lifelines.utils import concordance_index

    info = make_cohort(tmp_path, n_slides=60, seed=0, size=(512, 512))
    t = info.labels
    # a larger tumour means a higher hazard, i.e. a shorter time: C-index of -extent well above 0.5
    c = concordance_index(t["time"], -t["tumor_fraction"], t["event"])
    assert c > 0.66, c
    assert 0.3 < t["event"].mean() < 0.95
    # with no effect, the extent says nothing about the times
    flat = make_cohort(tmp_path / "flat", n_slides=60, seed=0, size=(512, 512),
                       survival_effect=0.0).labels
    c0 = concordance_index(flat["time"], -flat["tumor_fraction"], flat["event"])
    assert abs(c0 - 0.5) < c - 0.5


def test_region_fractions_of_a_known_map() -> None:
    m = np.zeros((4, 4), np.uint8)
    m[:2, :2] = 2
    frac = region_fractions(m, np.array([[0, 0], [32, 32]]), 32, downsample=16)
    np.testing.assert_allclose(frac[0], [0, 0, 1, 0])
    np.testing.assert_allclose(frac[1], [1, 0, 0, 0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_slides": 0}, r"n_slides=0 must be at least 1"),
        ({"tumor_fraction": (0.3, 0.1)}, r"tumor_fraction=\(0.3, 0.1\) must be .* low <= high"),
        ({"positive_fraction": 1.5}, r"positive_fraction=1.5 must be in \[0, 1\]"),
        ({"size": (100, 100)}, r"size=\(100, 100\) is too small"),
        ({"mpp": 0}, r"mpp=0 must be a positive number"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_cohort(tmp_path, **{"n_slides": 2, "size": (512, 512), **kwargs})

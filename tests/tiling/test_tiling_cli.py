"""tile_slides and ``wsi-ssl tile``: outputs, failures recorded, exit codes, reruns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from wsi_ssl.cli import main
from wsi_ssl.errors import ConfigError
from wsi_ssl.tiling import TilingReport, tile_slides
from wsi_ssl.tiling._batch import load_grid


def test_tile_slides_records_failures_and_goes_on(slides_dir, tmp_path):
    slides = [slides_dir / "cmu-1-small-region.svs", slides_dir / "broken.svs",
              slides_dir / "tcga-cr-7395-01a-01-ts1.svs"]
    report = tile_slides(slides, tmp_path / "out", plot=False)
    assert isinstance(report, TilingReport)
    by_id = {r.slide_id: r for r in report.rows}
    assert by_id["cmu-1-small-region"].status == "ok" and by_id["cmu-1-small-region"].n_tiles > 30
    assert by_id["broken"].status == "failed" and "SlideOpenError" in by_id["broken"].error
    assert by_id["tcga-cr-7395-01a-01-ts1"].status == "failed"
    assert "MissingMPPError" in by_id["tcga-cr-7395-01a-01-ts1"].error
    assert report.n_failed == 2 and not report.ok
    g = load_grid(tmp_path / "out" / "cmu-1-small-region")
    assert g.coords.shape == (by_id["cmu-1-small-region"].n_tiles, 2)
    assert g.coords.dtype == np.int64
    assert g.meta["backend"] == "tiffslide" and g.meta["level"] == 0
    assert g.meta["read_size"] == 224
    assert (tmp_path / "out" / "tiling_report.csv").read_text().count("\n") == 4
    with pytest.raises(ConfigError, match="assume_mpp=-2"):
        tile_slides(slides[:1], tmp_path / "o2", assume_mpp=-2)


def test_cli_in_process(slides_dir, tmp_path, capsys):
    out = tmp_path / "tiles"
    rc = main(["tile", str(slides_dir / "cmu-1-small-region.svs"), str(slides_dir / "broken.svs"),
               str(slides_dir / "tcga-cr-7395-01a-01-ts1.svs"), "--out", str(out),
               "--assume-mpp", "0.25", "--tile-size", "128"])
    text = capsys.readouterr().out
    assert rc == 1  # broken.svs failed
    assert "3 slides" in text and "1 failed" in text and "broken" in text
    meta = json.loads((out / "tcga-cr-7395-01a-01-ts1" / "grid.json").read_text())
    assert meta["mpp_assumed"] is True and meta["slide_mpp"] == 0.25 and meta["n_tiles"] > 0
    assert (out / "cmu-1-small-region" / "qc.png").stat().st_size > 5000
    # a rerun skips what is done
    rc = main(["tile", str(slides_dir / "cmu-1-small-region.svs"), "--out", str(out),
               "--tile-size", "128", "--assume-mpp", "0.25"])
    assert rc == 0 and "skipped" in capsys.readouterr().out


def test_cli_subprocess_glob_and_spaces(spaced_slide, tmp_path):
    out = tmp_path / "out dir"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    res = subprocess.run(
        [sys.executable, "-m", "wsi_ssl", "tile", str(spaced_slide.parent / "*.svs"),
         "--out", str(out), "--min-tissue", "0.5"],
        capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "1 slides" in res.stdout and "0 failed" in res.stdout
    g = load_grid(out / "my_slide_copy_2")
    assert len(g.coords) > 10

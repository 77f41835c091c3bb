"""Fixtures of the tiling tests: small generated pyramidal TIFFs (real files, written by tifffile)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests._synthetic import tissue_image
from wsi_ssl.datasets import write_pyramidal_tiff


@pytest.fixture(scope="session")
def slide_025(tmp_path_factory) -> Path:
    """2048 x 1536 H&E-like slide at 0.25 µm/px, JPEG q95, levels 1 and 1/4 (OpenSlide sees both)."""
    path = tmp_path_factory.mktemp("s025") / "fine.tif"
    return write_pyramidal_tiff(path, tissue_image(2048, 1536, seed=3), mpp=0.25, n_levels=2,
                                downsample=4, quality=95)


@pytest.fixture(scope="session")
def white_slide(tmp_path_factory) -> Path:
    """An all-glass (near-white) slide at 0.5 µm/px: no tissue anywhere."""
    img = np.full((1024, 1280, 3), 243, np.uint8)
    return write_pyramidal_tiff(tmp_path_factory.mktemp("white") / "white.svs", img, mpp=0.5,
                                n_levels=1)


@pytest.fixture(scope="session")
def spaced_slide(tmp_path_factory, slides_dir) -> Path:
    """The real CMU slide behind a path with spaces and parentheses (a symlink, no copy)."""
    d = tmp_path_factory.mktemp("dir with spaces (1)")
    link = d / "my slide (copy 2).svs"
    os.symlink(slides_dir / "cmu-1-small-region.svs", link)
    return link

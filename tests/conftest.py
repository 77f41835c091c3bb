"""Shared fixtures: the real test data folder and small generated pyramidal slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests._synthetic import tissue_image

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("WSI_SSL_TEST_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


@pytest.fixture(scope="module")
def single_thread_torch():
    """Run torch single-threaded for a whole test module: on the shared 2-core CI machine, OpenMP
    threads spinning against other processes made tiny models ~100x slower. Opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread_torch")`` (module-scoped, so the
    module's own module-scoped fixtures that train models run single-threaded too)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``$WSI_SSL_TEST_DATA`` or ``../shared/data`` (the real slides, tiles, MIL sets, features)."""
    d = _data_dir()
    if not (d / "slides").is_dir():
        pytest.fail(
            f"test data not found at '{d}'; set WSI_SSL_TEST_DATA to the shared/data folder."
        )
    return d


@pytest.fixture(scope="session")
def slides_dir(data_dir: Path) -> Path:
    return data_dir / "slides"


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory) -> Path:
    """A 4096 x 3072 pyramidal JPEG TIFF at 0.5 µm/px with tissue blobs (3 levels)."""
    from wsi_ssl.datasets import write_pyramidal_tiff

    path = tmp_path_factory.mktemp("slides") / "synthetic.svs"
    return write_pyramidal_tiff(path, tissue_image(4096, 3072), mpp=0.5, n_levels=3, downsample=2)

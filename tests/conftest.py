"""Shared fixtures: the real test data folder, small generated pyramidal slides, and the
single-node Slurm cluster of the ``slurm`` tests (tests/cluster/, tests/test_chaos.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests._synthetic import tissue_image
from tests.cluster.slurm_local import LocalSlurm, SlurmUnavailable
from wsi_ssl.datasets import write_pyramidal_tiff

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("WSI_SSL_TEST_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


def pytest_configure(config) -> None:
    """Under pytest-xdist each worker process is one of several on this machine's cores: torch
    (and the OpenMP/BLAS pools of the processes the tests start) run single-threaded there, so
    the workers do not oversubscribe the CPUs."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = "1"
        import torch  # lazy: only xdist workers pay for importing torch here

        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """For ``pytest -n N --dist loadgroup``: every test without an explicit ``xdist_group`` is
    grouped with its module, so a module's tests run on one worker and its module-scoped fixtures
    (cohorts, clusters, the demo run) are built once. Modules that look at this machine's
    processes (a dask worker or a job reaper must not be mistaken for a leftover) share the
    explicit group ``machine-processes``. Without xdist the marks change nothing."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            module = item.nodeid.split("::", 1)[0]
            item.add_marker(pytest.mark.xdist_group(module.rsplit("/", 1)[-1].removesuffix(".py")))


@pytest.fixture(scope="module")
def single_thread_torch():
    """Run torch single-threaded for a whole test module: on the shared 2-core CI machine, OpenMP
    threads spinning against other processes made tiny models ~100x slower. Opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread_torch")`` (module-scoped, so the
    module's own module-scoped fixtures that train models run single-threaded too)."""
    import torch  # lazy: only the modules that opt in pay for importing torch here

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
    path = tmp_path_factory.mktemp("slides") / "synthetic.svs"
    return write_pyramidal_tiff(path, tissue_image(4096, 3072), mpp=0.5, n_levels=3, downsample=2)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-node Slurm cluster (slurm_local.LocalSlurm), session scoped: munged,
    slurmctld and slurmd start once (about a second), ``SLURM_CONF`` is set in this process's
    environment (so every subprocess a test starts, the ``wsi-ssl`` CLI included, talks to it)
    with ``SBATCH_OUTPUT`` (job output goes to the fixture's temp folder, never into the
    checkout), and the daemons are stopped at the end. Where they cannot start the tests skip
    with the daemon's own error, except in CI (``CI=true``), where that is a failure."""
    root = Path(tmp_path_factory.mktemp("slurm"))
    try:
        s = LocalSlurm(root).start()
    except SlurmUnavailable as err:
        if _in_ci():
            pytest.fail(f"CI=true but the test Slurm cluster cannot start: {err}")
        pytest.skip(f"no Slurm cluster here: {err}")
    before = {k: os.environ.get(k) for k in s.env_vars()}
    os.environ.update(s.env_vars())  # every process a test starts talks to this cluster
    try:
        yield s
    finally:
        s.stop()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

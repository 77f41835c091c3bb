"""A real single-node Slurm cluster for the ``slurm`` tests (slurm_local.LocalSlurm).

Session scoped: munged, slurmctld and slurmd start once (about a second), ``SLURM_CONF`` is set
in this process's environment (so every subprocess a test starts, the ``wsi-ssl`` CLI included,
talks to it) with ``SBATCH_OUTPUT`` (job output goes to the fixture's temp folder, never into the
checkout), and the daemons are stopped at the end. Where they cannot start the tests skip
with the daemon's own error, except in CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cluster.slurm_local import LocalSlurm, SlurmUnavailable


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
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

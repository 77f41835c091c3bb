"""The MIL benchmark code path on the real Musk1 data (1 repeat x 3 of its standard folds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("single_thread_torch")

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("mil_benchmarks",
                                                  REPO / "benchmarks" / "mil_benchmarks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_load_musk1(data_dir: Path):
    bags, y, ids = _bench().load_mil_csv(data_dir / "mil" / "musk1.csv")
    assert len(bags) == 92 and sum(len(b) for b in bags) == 476
    assert bags[0].shape[1] == 166 and set(np.unique(y)) == {0, 1}
    assert np.all(np.diff(ids) > 0)
    assert int(y.sum()) == 47  # Musk1 has 47 musk (positive) bags


def test_musk1_abmil_three_folds(data_dir: Path):
    mil = data_dir / "mil"
    acc = _bench().run_benchmark(mil / "musk1.csv", ["abmil"], folds=mil / "musk1_folds_5x10.npy",
                                 repeats=1, max_folds=3)
    assert acc["abmil"].shape == (3,)
    assert acc["abmil"].mean() > 0.7, acc

"""Helpers of the batch-cluster tests and the chaos test: a tiny cohort, the embed command,
array-for-array store comparison, and what is still running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests._synthetic import tissue_image
from wsi_ssl.datasets import write_pyramidal_tiff
from wsi_ssl.store import TileStore

TILE = 64
#: the settings of every cluster test run (tiny slides, the tiny CNN, a small view bank)
EMBED_ARGS = ["--encoder", "tiny-cnn", "--mpp", "0.5", "--tile-size", str(TILE), "--views", "2",
              "--view-tiles", "8", "--batch-size", "16"]
EMBED_KW = {"mpp": 0.5, "tile_size": TILE, "views": 2, "view_tiles": 8, "batch_size": 16}
#: one CPU worker per job, one core and 2 GB each (the test node declares 4 CPUs)
SLURM_ARGS = ["--cluster", "slurm", "--cores", "1", "--memory", "2GB"]


def make_cohort(folder: Path, n: int, *, size: tuple[int, int] = (512, 384), seed: int = 70
                ) -> list[Path]:
    """``n`` small generated pyramidal slides (one level) at 0.5 µm/px."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"c{i:02d}.svs"
        if not p.exists():
            write_pyramidal_tiff(p, tissue_image(*size, seed=seed + i), mpp=0.5, n_levels=1)
        out.append(p)
    return out


def embed_cmd(slides: list[Path], store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "wsi_ssl", "embed", *map(str, slides), "--store", str(store),
            *EMBED_ARGS, *extra]


def store_arrays(path: Path) -> dict[str, tuple[np.ndarray, ...]]:
    s = TileStore(path, mode="r")
    return {sid: (s[sid].features, s[sid].coords, s[sid].views, s[sid].view_index)
            for sid in s.slide_ids}


def assert_same_arrays(got: Path, want: Path) -> None:
    a, b = store_arrays(got), store_arrays(want)
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for sid in b:
        for name, x, y in zip(("features", "coords", "views", "view_index"), a[sid], b[sid],
                              strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"{sid}.{name}")


def processes_matching(text: str) -> list[str]:
    """``pid cmdline`` of this machine's processes whose command line contains ``text``."""
    out = []
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(f"{d.name} {cmd.strip()}")
    return out


def run(cmd: list[str], timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)

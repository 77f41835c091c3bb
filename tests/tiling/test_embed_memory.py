"""Embed memory stays flat over a cohort (issue 20, item 9).

The growth came from glibc, not from objects kept alive: buffers freed by the reader, prepare
and encoder threads stayed resident in the malloc arenas once glibc's dynamic mmap threshold had
risen (0.2 GB in use, 2.5 GB free in the arenas after 20 slides). The acceptance curve (40
slides, ~17 min) is ``benchmarks/bench_embed_memory.py``; these tests run the same mechanism and
the same benchmark at toy sizes, each in a fresh process (malloc settings are per process).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_embed_memory.py"

# A slide's allocation pattern at toy scale, in one thread (deterministic): one big region
# first (glibc then raises its mmap threshold to that size), then per "slide" 20 tile-batch-sized
# buffers (9 MiB), each followed by a small allocation that outlives it (metadata, results),
# then the buffers are freed. The buffers come from the heap and the small survivors pin the
# freed space there: untuned it stays resident though not in use; malloc_trim returns it.
_CHILD = r"""
import ctypes, json
import numpy as np
from wsi_ssl._utils import release_free_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
big = np.ones(24 << 20, np.uint8); del big        # the first slide's decoded region
pins = []

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) << 10

rows = []
for slide in range(6):
    buffers = []
    for _ in range(20):
        buffers.append(np.ones(9 << 20, np.uint8))   # a batch of decoded / augmented tiles
        pins.append(np.ones(1 << 12, np.uint8) + slide)  # what outlives the slide
    del buffers
    tuned = release_free_memory()
    m = libc.mallinfo2()
    rows.append({"rss": rss(), "free": m.fordblks, "in_use": m.uordblks + m.hblkhd})
print(json.dumps({"tuned": tuned, "rows": rows}))
"""


def _run_child(tuning: bool) -> dict:
    # glibc's defaults: any MALLOC_* variable turns its dynamic mmap threshold off (dask's
    # nanny exports MALLOC_TRIM_THRESHOLD_ into this process once a test started a cluster)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["WSI_SSL_MALLOC_TUNING"] = "1" if tuning else "0"
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists(
    "/proc/self/status"), reason="glibc malloc tuning (Linux)")


@glibc
def test_freed_slide_buffers_leave_the_arenas():
    """With the trim after each slide (what every embedding process does) the memory a slide
    freed goes back to the OS; without it, it stays resident in the heap."""
    off, on = _run_child(False), _run_child(True)
    assert on["tuned"] and not off["tuned"]
    mib = 2**20
    # the pattern does leave ~180 MiB of freed batches in the heap (free chunks, either way)
    assert max(r["free"] for r in off["rows"]) / mib > 64, off
    # untuned they stay resident; trimmed after each "slide" they do not
    # (measured here: 203-212 MiB resident beyond what is in use, against 23-25 MiB)
    over_off = min(r["rss"] - r["in_use"] for r in off["rows"]) / mib
    over_on = max(r["rss"] - r["in_use"] for r in on["rows"]) / mib
    assert over_off > 128, off
    assert over_on < 64, on


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_embed_memory", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@glibc
def test_embed_rss_curve_is_flat_over_a_small_cohort(bench, tmp_path, capsys):
    """The benchmark itself at toy size (the in-process ``embed_slides`` with a bank in a child
    process, RSS sampled per slide): the late slides' peak stays within 1.2 x the early ones'.

    At this size (tiny encoder, 8 x 16 bank) the arena growth does not show even untuned (it
    passes with ``WSI_SSL_MALLOC_TUNING=0``; the test above covers that mechanism): this one
    catches per-slide objects kept alive, and keeps the benchmark itself running."""
    rc = bench.main(["--slides", "10", "--size", "1536", "--encoder", "tiny-cnn",
                     "--views", "8", "--view-tiles", "16", "--interval", "0.2",
                     "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    with open(tmp_path / "rss_curve.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["slide"]) for r in rows] == list(range(1, 11)), out
    assert all(float(r["peak_rss_mb"]) > 50 for r in rows)
    assert "PASS" in out

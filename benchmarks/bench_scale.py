"""TCGA scale (issue 20): the tile store and the slide-SSL data path at N = 250, 1,000 and 4,000
slides, plus a few slides of true TCGA shape, and the extrapolation to 11,600 slides.

Stores are built through the public write API (``TileStore.write_slide``) with the real
structure (features, coordinates, a ``views x view_tiles`` bank), bytes scaled down for the N
stores (``--tiles``, ``--dim``, ``--view-tiles``); the TCGA-shape set is true size (10,000 tiles,
1,024 dims, 50 x 256 bank, float16: ~47 MB per slide, ~545 GB for 11,600). One row per stage and
N:

* seconds, peak RSS of the process during the stage (sampled every 10 ms), bytes read, bytes
  needed, files and folders per slide group, and the growth exponent of the stage's time between
  N values (``log(t2/t1) / log(N2/N1)``; "-" when either time is under 0.1 s, noise there);
* bytes read = ``rchar`` of ``/proc/self/io`` (bytes returned by read syscalls, page-cache hits
  included; ``read_bytes`` is 0 for them): everything the process read during the stage;
* bytes needed: what the stage must read at least: the bank versions its views use and their
  ``view_index`` rows (one epoch), the clean features (transform; plus coordinates for heads that
  read them), nothing but metadata (listing, setup).

Stages: open + list, summary (``info``), verify (every byte hashed, 2 threads), slide-SSL setup
(statistics only), one slide-SSL epoch (``abmil``, k tiles per view, batch 32, 2 readers),
transform, a linear probe on the embeddings, ``similar`` (100 queries). The epoch runs the
library's trainer directly (``SlideTrainer.run_epoch``) so that setup and epoch are measured
apart. Then the targets of the issue are checked (PASS / FAIL), and the footer extrapolates to
TCGA (11,600 slides, 1,024 dims, 50 x 256 bank).

    python benchmarks/bench_scale.py --out /tmp/bench_scale           # default sizes, ~10 min
    python benchmarks/bench_scale.py --sizes 250 1000 --tcga-slides 4 --out /tmp/bench_scale

The stores are deleted at the end unless ``--keep``. The embed-memory row (item 9 of the issue)
reads the RSS curve of ``benchmarks/bench_embed_memory.py`` when ``--embed-rss-csv`` is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
TCGA_SLIDES = 11_600
TCGA = {"tiles": 10_000, "dim": 1024, "views": 50, "view_tiles": 256}


# ----------------------------------------------------------------------------- measuring
def rchar() -> int:
    """Bytes returned by read syscalls so far (``/proc/self/io``; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


@dataclass
class Stage:
    """Seconds, bytes read (rchar) and peak RSS of a block of code."""

    name: str
    n: int
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_needed: int | None = None
    peak_rss: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __enter__(self) -> Stage:
        self._stop = threading.Event()
        self.peak_rss = rss()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        self._r0, self._t0 = rchar(), time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_rss = max(self.peak_rss, rss())

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.bytes_read = rchar() - self._r0
        self._stop.set()
        self._t.join()
        self.peak_rss = max(self.peak_rss, rss())


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass


def files_per_slide(path: Path, n: int) -> float:
    """Files and folders of the slide groups (each group's folder included) per slide; the
    store's few root entries (zarr.json, slides/, the index, the lock) are not counted."""
    return sum(1 for p in (path / "slides").rglob("*") if p.name != "zarr.json"
               or p.parent != path / "slides") / max(1, n)


# ----------------------------------------------------------------------------- building stores
def slide_id(i: int) -> str:
    return f"TCGA-{i // 10000:02d}-{i % 10000:04d}-01Z-00-DX1"


class SlideMaker:
    """Seeded synthetic slides of one shape: a pool of random slides, each slide one of them
    plus a per-slide offset (so no two slides are equal, without drawing N x the values)."""

    def __init__(self, tiles: int, dim: int, views: int, view_tiles: int, pool: int = 8,
                 seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.shape = (tiles, dim, views, view_tiles)
        self.pool = []
        side = int(math.ceil(math.sqrt(tiles)))
        xy = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:tiles]
        for _ in range(pool):
            f = rng.standard_normal((tiles, dim), dtype=np.float32).astype(np.float16)
            vi = rng.integers(0, tiles, size=(views, view_tiles))
            vw = (f[vi].astype(np.float32)
                  + 0.1 * rng.standard_normal((views, view_tiles, dim), dtype=np.float32)
                  ).astype(np.float16)
            self.pool.append((f, xy * 224, vw, vi))

    def __call__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        f, xy, vw, vi = self.pool[i % len(self.pool)]
        off = np.float16((i // len(self.pool)) * 1e-3)
        return f + off, xy, vw + off, vi


def build_store(path: Path, n: int, maker: SlideMaker, dim: int) -> float:
    """Write ``n`` slides; returns the seconds spent in ``write_slide``."""
    from wsi_ssl.store import TileStore

    if path.exists():
        shutil.rmtree(path)
    st = TileStore(path, mode="a")
    st.bind_encoder("synthetic", "fp-synthetic", dim)
    spent = 0.0
    with st.lock():
        for i in range(n):
            f, xy, vw, vi = maker(i)
            t = time.perf_counter()
            st.write_slide(slide_id(i), f, xy, views=vw, view_index=vi,
                           attrs={"stride_level0": 224})
            spent += time.perf_counter() - t
    return spent


def driver_commits(path: Path, n: int, maker: SlideMaker, dim: int) -> dict[str, float]:
    """The embed driver's commit path: slides handed through a bounded queue to one writer
    thread calling ``write_slide``; slides/s over the writer's busy time and the wall time."""
    from wsi_ssl.store import TileStore

    if path.exists():
        shutil.rmtree(path)
    st = TileStore(path, mode="a")
    st.bind_encoder("synthetic", "fp-synthetic", dim)
    q: queue.Queue = queue.Queue(maxsize=2)
    busy = [0.0]

    def writer() -> None:
        while (item := q.get()) is not None:
            sid, (f, xy, vw, vi) = item
            t = time.perf_counter()
            st.write_slide(sid, f, xy, views=vw, view_index=vi, attrs={"stride_level0": 224})
            busy[0] += time.perf_counter() - t

    th = threading.Thread(target=writer)
    t0 = time.perf_counter()
    with st.lock():
        th.start()
        for i in range(n):
            q.put((slide_id(i), maker(i)))
        q.put(None)
        th.join()
    wall = time.perf_counter() - t0
    return {"slides": n, "busy_s": busy[0], "wall_s": wall, "per_s": n / busy[0],
            "bytes_per_slide": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / n}


class MemoryStore:
    """The slide-SSL read API of a TileStore served from arrays in memory (the reference the
    store's steps/s is compared with)."""

    def __init__(self, store: Any) -> None:
        self.path = f"memory:{store.path}"
        self.slide_ids = list(store.slide_ids)
        self.fingerprint = store.fingerprint
        self.encoder_fingerprint = store.encoder_fingerprint
        self._stats = {s: store.slide_stats(s) for s in self.slide_ids}
        self._attrs = {s: store.slide_attrs(s) for s in self.slide_ids}
        self._views = {}
        self._vidx = {}
        self._coords = {}
        for s in self.slide_ids:
            rec = store[s]
            self._views[s], self._vidx[s], self._coords[s] = rec.views, rec.view_index, rec.coords

    def slide_stats(self, s: str) -> Any:
        return self._stats[s]

    def slide_attrs(self, s: str) -> dict[str, Any]:
        return self._attrs[s]

    def read_views(self, s: str, versions: Any) -> tuple[np.ndarray, np.ndarray]:
        v = np.asarray(versions, np.int64)
        return self._views[s][v], self._vidx[s][v]

    def read_coords(self, s: str) -> np.ndarray:
        return self._coords[s]


# ----------------------------------------------------------------------------- slide SSL pieces
def ssl_model(k: int, batch: int, readers: int = 2, device: str = "cpu", epochs: int = 1,
              **kw: Any) -> Any:
    from wsi_ssl.pretrain import SlideSSL

    return SlideSSL("abmil", tiles_per_view=k, batch_size=batch, epochs=epochs, lr=1e-3,
                    temperature=0.1, warmup_epochs=0, embed_dim=kw.pop("embed_dim", 128),
                    proj_dims=kw.pop("proj_dims", (128, 64)), device=device, readers=readers,
                    seed=0, **kw)


def trainer_for(model: Any, store: Any) -> Any:
    """The library's trainer for ``model`` on ``store`` (setup from statistics, as ``fit``)."""
    return model.make_trainer(store)


def version_bytes(store: Any) -> int:
    """Bytes of one bank version and its view_index rows (logical)."""
    st = store.slide_stats(store.slide_ids[0])
    return st.view_tiles * st.dim * 2 + st.view_tiles * 8


def run_epochs(trainer: Any, epochs: int, start: int = 0) -> tuple[float, Any]:
    """Seconds for ``epochs`` epochs (synchronised on CUDA) and the progress record."""
    import torch

    from wsi_ssl.pretrain import TrainProgress

    prog = TrainProgress()
    t = time.perf_counter()
    for e in range(start, start + epochs):
        trainer.run_epoch(e, prog, _NoBar())
    trainer.close()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, prog


def store_vs_memory(store: Any, *, k: int, batch: int, epochs: int, readers: int = 2,
                    device: str = "cpu", embed_dim: int = 512) -> dict[str, Any]:
    """Slide-SSL steps/s reading from ``store`` vs the same steps on arrays in memory (same
    seed, same model, same batches: the loss histories must be equal). One warm-up epoch each,
    then ``epochs`` timed epochs; the two runs alternate twice and the best time counts."""
    mem = MemoryStore(store)
    res: dict[str, Any] = {"k": k, "batch": batch, "epochs": epochs, "readers": readers,
                           "device": device}
    times: dict[str, float] = {}
    hist: dict[str, list[float]] = {}
    steps = 0
    for _ in range(2):
        for name, src in (("memory", mem), ("store", store)):
            tr = trainer_for(ssl_model(k, batch, readers, device, epochs=epochs + 1,
                                       embed_dim=embed_dim, proj_dims=(embed_dim, 128)), src)
            run_epochs(tr, 1)
            sec, prog = run_epochs(tr, epochs, start=1)
            times[name] = min(times.get(name, math.inf), sec)
            hist[name] = prog.history
            steps = tr.steps_per_epoch * epochs
            del tr
    res.update(steps=steps, memory_steps_per_s=steps / times["memory"],
               store_steps_per_s=steps / times["store"],
               ratio=times["memory"] / times["store"], same_losses=hist["memory"] == hist["store"])
    return res


# ----------------------------------------------------------------------------- one N
def measure_n(path: Path, n: int, args: argparse.Namespace) -> list[Stage]:
    import torch

    from wsi_ssl.eval import linear_probe, similar
    from wsi_ssl.pretrain import load_cohort
    from wsi_ssl.store import TileStore

    maker = SlideMaker(args.tiles, args.dim, args.views, args.view_tiles, seed=n)
    rows: list[Stage] = []
    with Stage("write (build)", n) as s:
        s.extra["write_s"] = build_store(path, n, maker, args.dim)
    s.extra["files_per_slide"] = files_per_slide(path, n)
    rows.append(s)
    with Stage("open + list", n) as s:
        st = TileStore(path, mode="r")
        ids = st.slide_ids
    s.bytes_needed = 0
    rows.append(s)
    assert len(ids) == n
    with Stage("summary (info)", n) as s:
        summ = TileStore(path, mode="r").summary()
    s.bytes_needed = 0
    s.extra["store_bytes"] = summ.bytes
    rows.append(s)
    with Stage("verify", n) as s:
        rep = TileStore(path, mode="r").verify(threads=2, progress=False)
    s.bytes_needed = summ.bytes
    s.extra["ok"] = not (getattr(rep, "damaged", None) or getattr(rep, "problems", None))
    rows.append(s)
    with Stage("slide-SSL setup", n) as s:
        load_cohort(TileStore(path, mode="r"))
    s.bytes_needed = 0
    rows.append(s)
    torch.set_num_threads(max(1, args.threads))
    model = ssl_model(min(args.k, args.view_tiles), args.batch, args.readers)
    trainer = trainer_for(model, TileStore(path, mode="r"))
    with Stage("slide-SSL epoch", n) as s:
        _, prog = run_epochs(trainer, 1)
    rs = trainer.reader.stats
    s.bytes_needed = rs.versions_read * version_bytes(trainer.reader.store)
    s.extra.update(steps=trainer.steps_per_epoch, versions=rs.versions_read,
                   slide_reads=rs.view_reads, logical=rs.view_bytes + rs.coords_bytes)
    rows.append(s)
    model._set_fitted(trainer, prog, 0, trainer.reader.store)
    with Stage("transform", n) as s:
        emb = model.transform(TileStore(path, mode="r"), dtype="float32")
    s.bytes_needed = n * args.tiles * args.dim * 2
    rows.append(s)
    import pandas as pd

    labels = pd.DataFrame({"slide_id": list(emb.slide_ids),
                           "label": np.arange(len(emb)) % 2})
    with Stage("probe", n) as s:
        linear_probe(emb, labels, n_labeled=(), folds=5, groups=None, C=1.0, n_bootstrap=0,
                     repeats=1)
    rows.append(s)
    with Stage("similar (100 queries)", n) as s:
        similar(emb, list(emb.slide_ids[:100]), k=5, backend="sklearn")
    rows.append(s)
    for r in rows:
        r.extra.setdefault("files_per_slide", rows[0].extra["files_per_slide"])
    return rows


def measure_tcga(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """True TCGA shape: the driver's commit rate, setup bytes per slide, epoch bytes, transform
    bytes, and store-vs-memory steps/s."""
    import torch

    from wsi_ssl.pretrain import load_cohort
    from wsi_ssl.store import TileStore

    n = args.tcga_slides
    maker = SlideMaker(TCGA["tiles"], TCGA["dim"], TCGA["views"], TCGA["view_tiles"], pool=2,
                       seed=99)
    out: dict[str, Any] = {"slides": n}
    out["commit"] = driver_commits(path, n, maker, TCGA["dim"])
    del maker
    out["files_per_slide"] = files_per_slide(path, n)
    st = TileStore(path, mode="r")
    with Stage("setup", n) as s:
        load_cohort(TileStore(path, mode="r"))
    out["setup_bytes_per_slide"] = s.bytes_read / n
    torch.set_num_threads(max(1, args.threads))
    model = ssl_model(64, args.tcga_batch, args.readers, epochs=args.tcga_epochs,
                      embed_dim=512, proj_dims=(512, 128))
    tr = trainer_for(model, TileStore(path, mode="r"))
    with Stage("epoch", n) as s:
        _, prog = run_epochs(tr, args.tcga_epochs)
    need = tr.reader.stats.versions_read * version_bytes(st)
    out["epoch"] = {"epochs": args.tcga_epochs, "seconds": s.seconds, "bytes_read": s.bytes_read,
                    "bytes_needed": need, "ratio": s.bytes_read / max(1, need),
                    "s_per_slide": s.seconds / (n * args.tcga_epochs)}
    model._set_fitted(tr, prog, 0, st)
    with Stage("transform", n) as s:
        model.transform(TileStore(path, mode="r"), dtype="float32")
    feat = n * TCGA["tiles"] * TCGA["dim"] * 2
    out["transform"] = {"seconds": s.seconds, "bytes_read": s.bytes_read, "bytes_needed": feat,
                        "ratio": s.bytes_read / feat}
    out["steps"] = store_vs_memory(st, k=64, batch=args.tcga_batch, epochs=args.tcga_epochs,
                                   readers=args.readers)
    return out


# ----------------------------------------------------------------------------- report
def mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 1e6:.1f}"


def exponents(rows: list[Stage]) -> dict[tuple[str, int], float | None]:
    """Growth exponent of each stage's time from the previous N to this N."""
    by: dict[str, list[Stage]] = {}
    for r in rows:
        by.setdefault(r.name, []).append(r)
    out: dict[tuple[str, int], float | None] = {}
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r.n)
        for a, b in zip(rs, rs[1:], strict=False):
            out[(name, b.n)] = (None if min(a.seconds, b.seconds) < 0.1 else
                                math.log(b.seconds / a.seconds) / math.log(b.n / a.n))
    return out


def embed_rss(csv_path: str | None) -> tuple[str, bool | None]:
    """The embed-memory target from an RSS curve CSV (slide index, RSS), if one is given."""
    if not csv_path or not Path(csv_path).is_file():
        return ("not measured here, see benchmarks/bench_embed_memory.py (pass its CSV with "
                "--embed-rss-csv)", None)
    pts = []
    with open(csv_path) as fh:
        for row in csv.reader(fh):
            nums = []
            for v in row:
                try:
                    nums.append(float(v))
                except ValueError:
                    pass
            if len(nums) >= 2:
                pts.append((nums[0], nums[-1]))
    early = [r for s, r in pts if 3 <= s <= 5]
    late = [r for s, r in pts if 30 <= s <= 40]
    if not early or not late:
        return (f"{csv_path}: no points for slides 3-5 and 30-40", None)
    ratio = max(late) / max(early)
    return (f"peak RSS slides 30-40 / slides 3-5 = {ratio:.2f} ({csv_path})", ratio <= 1.2)


def report(rows: list[Stage], tcga: dict[str, Any] | None, args: argparse.Namespace
           ) -> tuple[str, list[tuple[str, bool | None, str]]]:
    ex = exponents(rows)
    lines = [f"bench_scale: N stores of {args.tiles} tiles x {args.dim} dims, bank "
             f"{args.views} x {args.view_tiles} (float16); epoch: abmil, k="
             f"{min(args.k, args.view_tiles)}, batch {args.batch}, {args.readers} readers, "
             f"{args.threads} torch threads; bytes read = rchar (/proc/self/io)",
             f"{'stage':24s} {'N':>6s} {'seconds':>9s} {'peak RSS MB':>11s} {'read MB':>9s} "
             f"{'needed MB':>9s} {'read/need':>9s} {'files/slide':>11s} {'exponent':>8s}"]
    for r in rows:
        e = ex.get((r.name, r.n))
        ratio = (f"{r.bytes_read / r.bytes_needed:.2f}" if r.bytes_needed else "-")
        lines.append(f"{r.name:24s} {r.n:6d} {r.seconds:9.3f} {r.peak_rss / 1e6:11.0f} "
                     f"{mb(r.bytes_read):>9s} {mb(r.bytes_needed):>9s} {ratio:>9s} "
                     f"{r.extra.get('files_per_slide', 0):11.2f} "
                     f"{'-' if e is None else f'{e:.2f}':>8s}")
    checks: list[tuple[str, bool | None, str]] = []
    big = max(r.n for r in rows)
    fps = max(r.extra.get("files_per_slide", 0) for r in rows if r.name == "write (build)")
    if tcga:
        fps = max(fps, tcga["files_per_slide"])
    checks.append(("files and folders per slide <= 12", fps <= 12, f"{fps:.2f}"))
    if tcga:
        e = tcga["epoch"]
        tb = tcga_epoch_bytes(rows, tcga)
        checks.append(("epoch bytes read <= 1.25 x version chunks needed (TCGA shape)",
                       e["ratio"] <= 1.25 and tb["ratio"] <= 1.25,
                       f"{e['ratio']:.3f} on the TCGA-shape slides; {tb['ratio']:.3f} "
                       f"extrapolated to {TCGA_SLIDES:,} slides with the per-slide overhead of "
                       f"N={tb['n']} ({tb['overhead'] / 1e3:.1f} KB per slide read)"))
        checks.append(("TCGA epoch reads <= 15 GB", tb["bytes"] <= 15e9,
                       f"{tb['bytes'] / 1e9:.1f} GB"))
    setup = [r for r in rows if r.name == "slide-SSL setup"]
    per = max(r.bytes_read / r.n for r in setup)
    if tcga:
        per = max(per, tcga["setup_bytes_per_slide"])
    checks.append(("slide-SSL setup reads <= 64 KB per slide", per <= 64_000,
                   f"worst {per / 1e3:.1f} KB/slide (TCGA-shape: "
                   f"{tcga['setup_bytes_per_slide'] / 1e3:.1f} KB at 1,024 dims)" if tcga
                   else f"worst {per / 1e3:.1f} KB/slide at {args.dim} dims"))
    lst = [r for r in rows if r.name == "open + list" and r.n == big]
    if lst and big >= 4000:
        checks.append((f"listing {big} slides <= 0.5 s", lst[0].seconds <= 0.5,
                       f"{lst[0].seconds:.3f} s"))
    elif lst:
        checks.append(("listing 4,000 slides <= 0.5 s", None, f"not run (largest N {big})"))
    top = sorted({r.n for r in rows})
    if len(top) >= 2:
        bad = [(name, e) for (name, n), e in ex.items() if n == top[-1] and e is not None
               and e > 1.1 and name != "write (build)"]
        checks.append((f"no stage grows faster than N^1.1 ({top[-2]} -> {top[-1]})", not bad,
                       ", ".join(f"{nm} {e:.2f}" for nm, e in bad) or "all <= 1.1"))
    if tcga:
        sv = tcga["steps"]
        checks.append(("store steps/s >= 0.9 x in-memory steps/s (CPU, TCGA shape)",
                       sv["ratio"] >= 0.9, f"{sv['store_steps_per_s']:.2f} vs "
                       f"{sv['memory_steps_per_s']:.2f} steps/s = {sv['ratio']:.2f}; same "
                       f"losses: {sv['same_losses']}"))
        c = tcga["commit"]
        checks.append(("driver commits >= 5 TCGA-shape slides/s", c["per_s"] >= 5,
                       f"{c['per_s']:.2f} slides/s ({c['bytes_per_slide'] / 1e6:.0f} MB each, "
                       f"writer thread busy {c['busy_s']:.1f} s of {c['wall_s']:.1f} s)"))
    text, ok = embed_rss(args.embed_rss_csv)
    checks.append(("embed RSS flat (slides 30-40 <= 1.2 x slides 3-5)", ok, text))
    if tcga:
        e, t = tcga["epoch"], tcga["transform"]
        lines += ["", f"TCGA shape ({tcga['slides']} slides of {TCGA['tiles']} x {TCGA['dim']}, "
                  f"bank {TCGA['views']} x {TCGA['view_tiles']}): "
                  f"{tcga['files_per_slide']:.2f} files/slide, "
                  f"{tcga['commit']['bytes_per_slide'] / 1e6:.0f} MB/slide; setup "
                  f"{tcga['setup_bytes_per_slide'] / 1e3:.1f} KB/slide; {e['epochs']} epochs "
                  f"{e['seconds']:.2f} s ({e['s_per_slide'] * 1e3:.0f} ms per slide-epoch), read "
                  f"{mb(e['bytes_read'])} MB for {mb(e['bytes_needed'])} MB needed "
                  f"({e['ratio']:.2f}x); transform read {mb(t['bytes_read'])} MB for "
                  f"{mb(t['bytes_needed'])} MB of features ({t['ratio']:.2f}x) in "
                  f"{t['seconds']:.2f} s"]
        lines += footer(rows, tcga, ex)
    lines.append("")
    for name, ok, detail in checks:
        tag = "PASS" if ok else ("FAIL" if ok is False else "n/a ")
        lines.append(f"{tag}  {name}: {detail}")
    return "\n".join(lines), checks


def tcga_epoch_bytes(rows: list[Stage], tcga: dict[str, Any]) -> dict[str, float]:
    """One TCGA epoch's bytes: the version chunks its views need at TCGA shape plus, per slide
    read, the fixed overhead (slide and array metadata, shard indexes) measured on the largest N
    store (where slides are not kept open between epochs, as at TCGA scale)."""
    big = max((r for r in rows if r.name == "slide-SSL epoch"), key=lambda r: r.n)
    reads = big.extra["slide_reads"]
    overhead = max(0.0, (big.bytes_read - big.bytes_needed) / max(1, reads))
    ver = TCGA["view_tiles"] * TCGA["dim"] * 2 + TCGA["view_tiles"] * 8
    need = TCGA_SLIDES * (2 - 1 / TCGA["views"]) * ver  # expected distinct versions of 2 views
    total = need * max(1.0, tcga["epoch"]["ratio"]) + TCGA_SLIDES * overhead
    return {"n": big.n, "overhead": overhead, "needed": need, "bytes": total,
            "ratio": total / need}


def footer(rows: list[Stage], tcga: dict[str, Any], ex: dict) -> list[str]:
    """Extrapolation to TCGA: 11,600 slides at true shape."""
    big = max(r.n for r in rows)
    scale = TCGA_SLIDES / big
    lst = next(r for r in rows if r.name == "open + list" and r.n == big)
    e_list = ex.get(("open + list", big)) or 1.0
    tb = tcga_epoch_bytes(rows, tcga)
    e, c = tcga["epoch"], tcga["commit"]
    return [
        "",
        f"TCGA extrapolation ({TCGA_SLIDES:,} slides, {TCGA['dim']} dims, bank "
        f"{TCGA['views']} x {TCGA['view_tiles']}):",
        f"  store on disk   {TCGA_SLIDES * c['bytes_per_slide'] / 1e9:,.0f} GB, "
        f"{TCGA_SLIDES * tcga['files_per_slide']:,.0f} files and folders "
        f"({tcga['files_per_slide']:.1f} per slide; format 1: ~270 per slide, 3.1 M)",
        f"  one epoch reads {tb['bytes'] / 1e9:.1f} GB ({tb['needed'] / 1e9:.1f} GB of version "
        f"chunks x {e['ratio']:.3f} measured at TCGA shape + {tb['overhead'] / 1e3:.1f} KB of "
        f"metadata per slide read, measured at N={tb['n']}; format 1: ~500 GB); "
        f"{TCGA_SLIDES * e['s_per_slide'] / 60:.1f} min on this CPU at "
        f"{e['s_per_slide'] * 1e3:.0f} ms per slide (abmil, k=64)",
        f"  setup reads     {TCGA_SLIDES * tcga['setup_bytes_per_slide'] / 1e6:.0f} MB "
        f"(statistics only; format 1: the whole store, ~77 min)",
        f"  listing         {lst.seconds * scale ** max(e_list, 0):.3f} s "
        f"(measured {lst.seconds:.3f} s at {big}, growth exponent {e_list:.2f})",
        f"  commits         {TCGA_SLIDES / c['per_s'] / 3600:.1f} h of writer time for the "
        f"cohort at {c['per_s']:.2f} slides/s",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_scale_out", help="work folder (stores, JSON)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000])
    ap.add_argument("--tiles", type=int, default=48, help="tiles per slide of the N stores")
    ap.add_argument("--dim", type=int, default=256, help="feature dims of the N stores")
    ap.add_argument("--views", type=int, default=50, help="bank versions (V)")
    ap.add_argument("--view-tiles", type=int, default=16, help="tiles per version (T)")
    ap.add_argument("--k", type=int, default=16, help="tiles per view of the epoch")
    ap.add_argument("--batch", type=int, default=32, help="slides per step of the epoch")
    ap.add_argument("--readers", type=int, default=2, help="SlideSSL readers")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--tcga-slides", type=int, default=4, help="TCGA-shape slides (0: skip)")
    ap.add_argument("--tcga-epochs", type=int, default=8,
                    help="epochs timed on the TCGA-shape slides")
    ap.add_argument("--tcga-batch", type=int, default=2,
                    help="slides per step on the TCGA-shape slides")
    ap.add_argument("--embed-rss-csv", default=None,
                    help="RSS curve of bench_embed_memory.py (slide, ..., rss) for item 9")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[Stage] = []
    try:
        for n in sorted(args.sizes):
            rows += measure_n(out / f"n{n}.zarr", n, args)
            if not args.keep:
                shutil.rmtree(out / f"n{n}.zarr", ignore_errors=True)
            print(f"[{time.perf_counter() - t0:.0f} s] N={n} done", flush=True)
        tcga = measure_tcga(out / "tcga.zarr", args) if args.tcga_slides else None
    finally:
        if not args.keep:
            shutil.rmtree(out / "tcga.zarr", ignore_errors=True)
    text, checks = report(rows, tcga, args)
    print(text)
    print(f"total {time.perf_counter() - t0:.0f} s")
    (out / "bench_scale.json").write_text(json.dumps({
        "args": vars(args), "rows": [{"stage": r.name, "n": r.n, "seconds": r.seconds,
                                      "bytes_read": r.bytes_read, "bytes_needed": r.bytes_needed,
                                      "peak_rss": r.peak_rss, **r.extra} for r in rows],
        "tcga": tcga, "checks": [{"target": c, "pass": ok, "detail": d} for c, ok, d in checks]},
        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

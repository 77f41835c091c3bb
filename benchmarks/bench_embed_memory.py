"""Embed memory over a cohort (issue 20, item 9): peak RSS of the in-process ``embed_slides``
(what ``wsi-ssl embed`` runs on one machine without a GPU cluster) per slide, which must stay
flat: peak RSS over slides 30-40 <= 1.2 x the peak over slides 3-5.

A synthetic cohort (``wsi_ssl.datasets.make_cohort``: pyramidal JPEG TIFFs with MPP metadata,
3136 x 3136 px at 0.5 µm/px by default) is embedded by a child process with ``resnet18``
(random weights: the one-time ``RandomWeightsWarning`` is expected) at 112 px / 1.0 µm/px and a
16 x 32 augmentation bank, through the Python API (``client="sync"``, the in-process path). This
process samples the RSS of the child and its children every ``--interval`` seconds (psutil, else
``/proc``) and maps each sample to the slide being embedded (1 + the slide groups already
committed to the store, counted in ``STORE/slides/``), then prints the curve (slide -> peak RSS
MB, an ASCII chart; a PNG with ``--plot``), writes it as CSV (``slide,...,peak_rss_mb``, read by
``bench_scale.py --embed-rss-csv``) and checks the target (PASS / FAIL, exit 1 on FAIL).

    python benchmarks/bench_embed_memory.py --plot rss.png         # 40 slides, ~17 min on 2 cores
    python benchmarks/bench_embed_memory.py --env WSI_SSL_MALLOC_TUNING=0 --slides 20  # before the fix
    python benchmarks/bench_embed_memory.py --no-bank --slides 8   # without a bank

``WSI_SSL_MALLOC_TUNING=0`` turns off what keeps the curve flat (a glibc ``malloc_trim`` after
each slide, ``wsi_ssl._utils.release_free_memory``), to see the growth it removes;
``--env MALLOC_MMAP_THRESHOLD_=8388608`` measures glibc's own fixed-threshold alternative.

With fewer than 40 slides the late window is the last quarter of the slides (at least slide 6).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EARLY = (3, 5)
LATE = (30, 40)
TARGET = 1.2


# ----------------------------------------------------------------------------- the child
def _child(spec: dict) -> None:
    """Embed the cohort in this process (the measured one); prints a JSON line at the end."""
    import logging

    import torch

    from wsi_ssl.tiling import embed_slides

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    rep = embed_slides(spec["slides"], spec["encoder"], spec["store"], mpp=spec["mpp"],
                       tile_size=spec["tile_size"], views=spec["views"],
                       view_tiles=spec["view_tiles"], batch_size=spec["batch_size"],
                       client="sync", device="cpu", random_weights=True)
    print("RESULT " + json.dumps({"done": len(rep.done), "failed": len(rep.failed),
                                  "tiles": rep.n_tiles, "view_tiles": rep.n_view_tiles,
                                  "seconds": time.perf_counter() - t0}), flush=True)


# ----------------------------------------------------------------------------- sampling
def _proc_rss(pid: int) -> int:
    """RSS bytes of ``pid`` from ``/proc`` (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _proc_children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return out


def tree_rss(pid: int) -> int:
    """RSS bytes of ``pid`` and all its descendants."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total
    todo, total = [pid], 0
    while todo:
        p = todo.pop()
        total += _proc_rss(p)
        todo += _proc_children(p)
    return total


def slides_done(store: Path) -> int:
    """Slide groups committed to the store so far (each appears by one atomic rename)."""
    try:
        return sum(1 for e in os.scandir(store / "slides") if e.is_dir())
    except OSError:
        return 0


def sample(proc: subprocess.Popen, store: Path, interval: float) -> list[tuple[float, int, int]]:
    """``(seconds, slides done, RSS bytes)`` every ``interval`` s until the child exits."""
    t0 = time.perf_counter()
    out = []
    while proc.poll() is None:
        out.append((time.perf_counter() - t0, slides_done(store), tree_rss(proc.pid)))
        time.sleep(interval)
    return out


# ----------------------------------------------------------------------------- the curve
def curve(samples: list[tuple[float, int, int]], n: int) -> list[dict]:
    """Per slide ``i`` (1-based): the peak RSS while it was embedded (``i - 1`` committed)."""
    rows = []
    for i in range(1, n + 1):
        pts = [(t, r) for t, d, r in samples if d == i - 1 and r > 0]
        if pts:
            rows.append({"slide": i, "samples": len(pts), "t_start": pts[0][0],
                         "peak_rss_mb": max(r for _, r in pts) / 1e6})
    return rows


def windows(n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The early and late slide windows of the target for a cohort of ``n`` slides."""
    if n >= LATE[1]:
        return EARLY, LATE
    return EARLY, (max(EARLY[1] + 1, math.ceil(0.75 * n)), n)


def check(rows: list[dict], n: int) -> tuple[float | None, str]:
    (e0, e1), (l0, l1) = windows(n)
    early = [r["peak_rss_mb"] for r in rows if e0 <= r["slide"] <= e1]
    late = [r["peak_rss_mb"] for r in rows if l0 <= r["slide"] <= l1]
    if not early or not late:
        return None, f"no samples for slides {e0}-{e1} or {l0}-{l1} (cohort of {n})"
    ratio = max(late) / max(early)
    return ratio, (f"peak RSS slides {l0}-{l1} = {max(late):.0f} MB, slides {e0}-{e1} = "
                   f"{max(early):.0f} MB: ratio {ratio:.2f} (target <= {TARGET})")


def ascii_chart(rows: list[dict], width: int = 50) -> str:
    top = max(r["peak_rss_mb"] for r in rows)
    lines = [f"{'slide':>5} {'t (s)':>7} {'peak RSS MB':>11}"]
    for r in rows:
        bar = "#" * max(1, round(width * r["peak_rss_mb"] / top))
        lines.append(f"{r['slide']:5d} {r['t_start']:7.1f} {r['peak_rss_mb']:11.0f} {bar}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["slide"] for r in rows], [r["peak_rss_mb"] for r in rows], marker="o", ms=3)
    ax.set_xlabel("slide being embedded")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_csv(rows: list[dict], path: Path) -> None:
    lines = ["slide,samples,t_start_s,peak_rss_mb"]
    lines += [f"{r['slide']},{r['samples']},{r['t_start']:.1f},{r['peak_rss_mb']:.1f}"
              for r in rows]
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- main
def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=40, help="slides in the cohort")
    ap.add_argument("--size", type=int, default=3136, help="slide edge, level-0 px")
    ap.add_argument("--slide-mpp", type=float, default=0.5, help="slides' level-0 µm/px")
    ap.add_argument("--mpp", type=float, default=1.0, help="tile µm/px")
    ap.add_argument("--tile-size", type=int, default=112)
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--view-tiles", type=int, default=32)
    ap.add_argument("--no-bank", action="store_true", help="baseline: views=0")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--interval", type=float, default=0.5, help="RSS sampling period, s")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of the child (e.g. MALLOC_ARENA_MAX=2; repeatable)")
    ap.add_argument("--out", default="bench_embed_memory_out",
                    help="work folder (cohort reused across runs, store, CSV)")
    ap.add_argument("--csv", default=None, help="curve CSV (default: OUT/rss_curve.csv)")
    ap.add_argument("--plot", default=None, metavar="PNG", help="also draw the curve")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.child:
        _child(json.loads(args.child))
        return 0
    from wsi_ssl.datasets import make_cohort

    out = Path(args.out)
    t0 = time.perf_counter()
    cohort = make_cohort(out / f"cohort-{args.slides}-{args.size}", n_slides=args.slides,
                         size=(args.size, args.size), mpp=args.slide_mpp,
                         n_workers=min(2, os.cpu_count() or 1))
    print(f"cohort: {args.slides} slides of {args.size} px at {args.slide_mpp} µm/px "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    store = out / "store.zarr"
    shutil.rmtree(store, ignore_errors=True)
    views = 0 if args.no_bank else args.views
    spec = {"slides": [str(p) for p in cohort.paths], "encoder": args.encoder,
            "store": str(store), "mpp": args.mpp, "tile_size": args.tile_size, "views": views,
            "view_tiles": args.view_tiles, "batch_size": args.batch_size,
            "threads": args.threads}
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in args.env)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child",
                             json.dumps(spec)], env=env, stdout=subprocess.PIPE, text=True)
    samples = sample(proc, store, args.interval)
    result = [ln for ln in proc.stdout.read().splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not result:
        print(f"FAIL: the embed child exited with {proc.returncode}")
        return 1
    res = json.loads(result[-1][len("RESULT "):])
    rows = curve(samples, args.slides)
    title = (f"{args.encoder} {args.tile_size} px @ {args.mpp} µm/px, bank {views} x "
             f"{args.view_tiles}, {args.slides} slides of {args.size} px"
             + (f", {' '.join(args.env)}" if args.env else ""))
    print(title)
    print(f"embedded {res['done']} slides ({res['failed']} failed), {res['tiles']} tiles + "
          f"{res['view_tiles']} view tiles in {res['seconds']:.0f} s; {len(samples)} RSS samples "
          f"every {args.interval} s")
    print(ascii_chart(rows))
    csv_path = Path(args.csv) if args.csv else out / "rss_curve.csv"
    write_csv(rows, csv_path)
    if args.plot:
        plot(rows, args.plot, title)
    ratio, text = check(rows, args.slides)
    ok = ratio is not None and ratio <= TARGET and res["failed"] == 0
    print(f"{'PASS' if ok else 'FAIL'}: {text}; curve {csv_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

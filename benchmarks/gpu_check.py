"""Every GPU figure of the project in one short run (< 6 min on one GPU + 16 cores), no network.

It generates its own 20x slides (``wsi_ssl.datasets``), then measures, with public APIs only:

1. encoder-alone tiles/s (``TileEncoder.embed`` on uint8 tiles: copy to the device, normalise,
   bf16 autocast, channels-last) for ResNet50 and a ViT-L/16 with UNI's architecture (random
   weights), at ``embed_slides``'s batch size;
2. end-to-end ``embed_slides`` tiles/s without and with a view bank, the ratio to (1), the
   fraction of the run spent inside ``TileEncoder.embed``, GPU utilisation (NVML when ``pynvml``
   imports), peak GPU memory (torch) and peak host RSS;
3. CPU float32 vs device features of the same real tiles: cosine similarity per tile;
4. ``SlideSSL`` a few epochs on the CPU and on the device from the same seed: both loss curves,
   their largest relative gap, views/s on each;
5. slide-SSL steps/s on the device reading the view bank from a tile store (the streaming data
   path: readers, pinned memory, non-blocking copies) vs the same steps on arrays in memory
   (``bench_scale.store_vs_memory``; issue 20 asks >= 0.9);

and writes ``gpu_check.json`` plus a table, ending with one line: the targets held and not held.
``--cpu-twin`` runs the same functions at toy sizes on the CPU (tiny encoders, bf16 autocast on
the CPU as the "device"), which CI does (tests/test_gpu_check.py) so that this script cannot rot.

    python benchmarks/gpu_check.py --out /tmp/gpu_check            # on the GPU machine
    python benchmarks/gpu_check.py --cpu-twin --out /tmp/twin      # anywhere, ~30 s
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script or imported by path from the tests
    sys.path.insert(0, str(HERE))

from bench_tiling import PeakRSS  # noqa: E402  (the benchmarks' RSS sampler)

#: Targets: (key in the flat results, threshold, "min" = must be >=, "max" = must be <=).
TARGETS = {
    "vit_l_uni.e2e_ratio": (0.85, "min"),
    "vit_l_uni.e2e_bank_ratio": (0.85, "min"),
    "resnet50.e2e_ratio": (0.6, "min"),
    "resnet50.e2e_bank_ratio": (0.6, "min"),
    "vit_l_uni.min_cosine": (0.999, "min"),
    "resnet50.min_cosine": (0.999, "min"),
    "slide_ssl.max_rel_loss_gap": (0.05, "max"),
    "slide_ssl.store_vs_memory": (0.9, "min"),
}


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """What one run measures (``GPU`` or the ``CPU_TWIN``).

    Attributes:
        encoders: ``(result key, create_encoder name)`` for the CNN and the ViT slot.
        n_slides, slide_px: generated 0.5 µm/px slides for the end-to-end runs (square, px;
            18432 px: ~5.4k tissue tiles each, written in parallel in ~1-2 min).
        views, view_tiles: the view bank of the second end-to-end run (V x T tiles per slide).
        alone_batches: batches timed for encoder-alone (after 3 warm-up batches).
        agree_tiles: real tiles compared between the CPU (float32) and the device.
        ssl_slides, ssl_px, ssl_views, ssl_view_tiles, ssl_epochs: the SlideSSL cohort and run.
        stream_*: the synthetic store (slides, tiles, dim, views x view_tiles) and the run
            (batch, timed epochs, readers) of the store-vs-memory steps/s.
        device: the device measured; dtype: its compute dtype (None = the encoder's default).
        data_jobs: processes writing slides (None = one per slide, up to the cores).
    """

    encoders: tuple[tuple[str, str], ...] = (("resnet50", "resnet50"), ("vit_l_uni", "uni"))
    n_slides: int = 4
    slide_px: int = 18432
    views: int = 16
    view_tiles: int = 256
    alone_batches: int = 30
    agree_tiles: int = 32
    ssl_slides: int = 16
    ssl_px: int = 2048
    ssl_views: int = 8
    ssl_view_tiles: int = 64
    ssl_epochs: int = 8
    stream_slides: int = 32
    stream_tiles: int = 2000
    stream_dim: int = 1024
    stream_views: int = 50
    stream_view_tiles: int = 256
    stream_batch: int = 32
    stream_epochs: int = 20
    stream_readers: int = 8
    device: str = "cuda"
    dtype: str | None = None
    data_jobs: int | None = None


GPU = Sizes()
CPU_TWIN = Sizes(encoders=(("resnet50", "tiny-cnn"), ("vit_l_uni", "tiny-vit")), n_slides=2,
                 slide_px=1536, views=2, view_tiles=16, alone_batches=3, agree_tiles=8,
                 ssl_slides=4, ssl_px=1024, ssl_views=4, ssl_view_tiles=16, ssl_epochs=3,
                 stream_slides=6, stream_tiles=64, stream_dim=32, stream_views=4,
                 stream_view_tiles=16, stream_batch=2, stream_epochs=2, stream_readers=1,
                 device="cpu", dtype="bfloat16", data_jobs=1)


# ----------------------------------------------------------------------------- measurements
def make_data(sizes: Sizes, workdir: Path) -> dict[str, Any]:
    """The generated cohorts (cached in ``workdir``): big slides and the small SlideSSL ones."""
    from wsi_ssl.datasets import make_cohort

    t = time.perf_counter()
    n = sizes.n_slides

    def jobs(k: int) -> int:
        return sizes.data_jobs or max(1, min(k, os.cpu_count() or 1))

    big = make_cohort(workdir / f"slides_{n}x{sizes.slide_px}", n_slides=n, seed=1,
                      size=(sizes.slide_px, sizes.slide_px), tissue_fraction=(0.65, 0.75),
                      n_workers=jobs(n))
    small = make_cohort(workdir / f"ssl_{sizes.ssl_slides}x{sizes.ssl_px}",
                        n_slides=sizes.ssl_slides, seed=2,
                        size=(sizes.ssl_px, sizes.ssl_px), n_workers=jobs(sizes.ssl_slides))
    return {"slides_dir": big.slides_dir, "ssl_dir": small.slides_dir,
            "slides": sorted(str(p) for p in Path(big.slides_dir).glob("*.tif*")),
            "seconds": time.perf_counter() - t}


def real_tiles(slide_path: str, n: int) -> np.ndarray:
    """``n`` tissue tiles (uint8 224 px at 0.5 µm/px) of a generated slide, via read_tiles."""
    from wsi_ssl.tiling import open_slide, read_tiles, tile_grid

    with open_slide(slide_path) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=224)
        idx = np.linspace(0, len(grid) - 1, min(n, len(grid))).astype(np.int64)
        out = np.concatenate([b.tiles[np.argsort(b.indices)]
                              for b in read_tiles(slide, grid, indices=idx, batch_size=len(idx))])
    return np.resize(out, (n, *out.shape[1:]))  # repeat when the slide has fewer


def build_encoder(name: str, device: str, dtype: str | None) -> Any:
    """Random weights: a preset (``"uni"``) with ``random_weights=True``; registered and timm
    names are randomly initialised anyway (never a download)."""
    from wsi_ssl.encoders import create_encoder
    from wsi_ssl.errors import ConfigError

    kw: dict[str, Any] = {"device": device}
    if dtype is not None:
        kw["dtype"] = dtype
    try:
        return create_encoder(name, random_weights=True, **kw)
    except (TypeError, ConfigError):  # not a preset (or no presets): the plain timm/registry name
        return create_encoder("vit_large_patch16_224" if name == "uni" else name, **kw)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def encoder_alone(enc: Any, tiles: np.ndarray, batches: int, device: str) -> float:
    """Tiles/s of ``enc.embed`` on one real uint8 batch, repeated (3 warm-up batches first)."""
    for _ in range(3):
        enc.embed(tiles)
    _sync(device)
    t = time.perf_counter()
    for _ in range(batches):
        enc.embed(tiles)
    _sync(device)
    return batches * len(tiles) / (time.perf_counter() - t)


class GpuSampler:
    """Mean GPU utilisation (NVML, 10 Hz) while active; ``mean`` is None without pynvml."""

    def __init__(self, device: str) -> None:
        self.mean: float | None = None
        self._handle = None
        if device.startswith("cuda"):
            try:
                import pynvml

                pynvml.nvmlInit()
                import torch

                idx = torch.device(device).index or 0
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
            except Exception as err:  # noqa: BLE001 - no NVML: utilisation is not measured
                logging.getLogger(__name__).info("NVML unavailable: %s", err)

    def __enter__(self) -> GpuSampler:
        self._vals: list[float] = []
        self._stop = threading.Event()
        if self._handle is not None:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._vals.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._handle is not None:
            self._t.join()
            self.mean = float(np.mean(self._vals)) if self._vals else None


class EmbedBusy:
    """Fraction of a run's wall time spent inside ``TileEncoder.embed`` (which returns features on
    the CPU, so it includes the device work): how busy the pipeline keeps the encoder. Works
    without NVML and on the CPU; wraps the class method for the duration of the block."""

    def __enter__(self) -> EmbedBusy:
        from wsi_ssl.encoders import TileEncoder

        self.inside = 0.0
        self._orig = TileEncoder.embed
        orig = self._orig

        def timed(enc: Any, tiles: Any) -> Any:
            t = time.perf_counter()
            try:
                return orig(enc, tiles)
            finally:
                self.inside += time.perf_counter() - t

        TileEncoder.embed = timed
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        from wsi_ssl.encoders import TileEncoder

        TileEncoder.embed = self._orig
        self.fraction = self.inside / max(time.perf_counter() - self._t0, 1e-9)


def end_to_end(enc: Any, slides: list[str], warm_slide: str, workdir: Path, *, batch_size: int,
               views: int, view_tiles: int, device: str) -> dict[str, Any]:
    """One ``embed_slides`` run in this process (``client="sync"``, what a single GPU gets),
    after a warm-up call on a small slide that builds the encoder (cached by the worker code)."""
    import torch

    from wsi_ssl.tiling import embed_slides

    kw = {"batch_size": batch_size, "device": device, "client": "sync", "overwrite": True}
    warm = embed_slides([warm_slide], enc, workdir / "warm.zarr", views=min(views, 1),
                        view_tiles=8, **kw)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss, GpuSampler(device) as util, EmbedBusy() as busy:
        rep = embed_slides(slides, enc, workdir / f"e2e_v{views}.zarr", views=views,
                           view_tiles=view_tiles, **kw)
    if rep.failed:
        raise RuntimeError(f"embed_slides failed on {rep.failed}")
    return {"tiles": rep.n_tiles, "view_tiles": rep.n_view_tiles, "seconds": rep.seconds,
            "tiles_per_s": rep.tiles_per_second, "warmup_s": warm.seconds,
            "encoder_busy": busy.fraction, "gpu_util_mean": util.mean,
            "gpu_util_source": "nvml" if util.mean is not None else None,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "peak_host_growth_mb": rss.growth_mb, "peak_host_mb": rss.peak / 2**20}


def agreement(name: str, tiles: np.ndarray, device: str, dtype: str | None) -> dict[str, Any]:
    """Cosine per tile between float32 CPU features and ``device`` features (same weights)."""
    import torch

    enc = build_encoder(name, "cpu", "float32")
    ref = enc.embed(tiles)
    enc.to_device(device, dtype=dtype or "auto")  # not the float32 it was built with
    got = enc.embed(tiles)
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=1).numpy()
    return {"agree_tiles": len(tiles), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "device_dtype": str(enc.dtype).replace("torch.", "")}


def slide_ssl(ssl_dir: Path, workdir: Path, sizes: Sizes) -> dict[str, Any]:
    """SlideSSL on the CPU and on the device from one seed, on a tiny-cnn store with a bank."""
    from wsi_ssl.pretrain import SlideSSL
    from wsi_ssl.store import TileStore
    from wsi_ssl.tiling import embed_slides

    path = workdir / "ssl.zarr"
    rep = embed_slides(ssl_dir, "tiny-cnn", path, views=sizes.ssl_views,
                       view_tiles=sizes.ssl_view_tiles, client="sync", device="cpu",
                       batch_size=64)
    if rep.failed:
        raise RuntimeError(f"embed_slides failed on {rep.failed}")
    store = TileStore(path, mode="r")
    out: dict[str, Any] = {"slides": sizes.ssl_slides, "epochs": sizes.ssl_epochs}
    for key, dev in (("cpu", "cpu"), ("device", sizes.device)):
        ssl = SlideSSL("abmil", tiles_per_view=16, batch_size=min(8, sizes.ssl_slides),
                       epochs=sizes.ssl_epochs, lr=1e-3, temperature=0.1, warmup_epochs=0,
                       device=dev, seed=0)
        ssl.fit(store)
        out[key] = {"loss": [float(v) for v in ssl.history_],
                    "views_per_s": float(ssl.train_views_per_s_)}
    a, b = np.asarray(out["cpu"]["loss"]), np.asarray(out["device"]["loss"])
    out["max_rel_loss_gap"] = float(np.max(np.abs(a - b)) / max(np.mean(np.abs(a)), 1e-12))
    return out


def slide_ssl_stream(workdir: Path, sizes: Sizes) -> dict[str, Any]:
    """Slide-SSL steps/s on the device reading from a synthetic tile store (written with
    ``TileStore.write_slide``) vs the same steps on the same arrays in memory."""
    from bench_scale import SlideMaker, build_store, store_vs_memory

    from wsi_ssl.store import TileStore

    path = workdir / "stream.zarr"
    maker = SlideMaker(sizes.stream_tiles, sizes.stream_dim, sizes.stream_views,
                       sizes.stream_view_tiles, pool=2)
    build_store(path, sizes.stream_slides, maker, sizes.stream_dim)
    del maker
    res = store_vs_memory(TileStore(path, mode="r"), k=min(64, sizes.stream_view_tiles),
                          batch=sizes.stream_batch, epochs=sizes.stream_epochs,
                          readers=sizes.stream_readers, device=sizes.device,
                          embed_dim=min(512, 4 * sizes.stream_dim))
    res["slides"] = sizes.stream_slides
    return res


# ----------------------------------------------------------------------------- the run
def run_check(sizes: Sizes, workdir: Path, *, batch_size: int | None = None,
              encoders: tuple[str, ...] | None = None) -> dict[str, Any]:
    """All measurements; returns the JSON-able result (also written by :func:`main`)."""
    import torch

    from wsi_ssl.tiling import EmbedConfig

    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    if batch_size is None:
        batch_size = EmbedConfig().batch_size  # the library's default, whatever it becomes
    cuda = sizes.device.startswith("cuda")
    res: dict[str, Any] = {
        "schema": 1, "mode": "gpu" if cuda else "cpu-twin", "device": sizes.device,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "cores": os.cpu_count(),
        "batch_size": batch_size, "sizes": asdict(sizes)}
    sec: dict[str, float] = {}
    res["section_s"] = sec
    t = time.perf_counter()
    data = make_data(sizes, workdir)
    sec["data"] = time.perf_counter() - t
    small = sorted(str(p) for p in Path(data["ssl_dir"]).glob("*.tif*"))
    res["data"] = {"slides": len(data["slides"]), "slide_px": sizes.slide_px,
                   "seconds": data["seconds"]}
    tiles = real_tiles(data["slides"][0], max(batch_size, sizes.agree_tiles))
    res["encoders"] = {}
    for key, name in sizes.encoders:
        if encoders is not None and key not in encoders:
            continue
        r: dict[str, Any] = {"model": name}
        t = time.perf_counter()
        r.update(agreement(name, tiles[:sizes.agree_tiles], sizes.device, sizes.dtype))
        sec[f"{key}.agreement"] = time.perf_counter() - t
        t = time.perf_counter()
        enc = build_encoder(name, sizes.device, sizes.dtype)
        r["dtype"] = str(enc.dtype).replace("torch.", "")
        r["alone_tiles_per_s"] = encoder_alone(enc, tiles[:batch_size], sizes.alone_batches,
                                               sizes.device)
        sec[f"{key}.alone"] = time.perf_counter() - t
        for tag, views in (("e2e", 0), ("e2e_bank", sizes.views)):
            t = time.perf_counter()
            e = end_to_end(enc, data["slides"], small[0], workdir / key, batch_size=batch_size,
                           views=views, view_tiles=sizes.view_tiles, device=sizes.device)
            e["ratio_to_alone"] = e["tiles_per_s"] / r["alone_tiles_per_s"]
            r[tag] = e
            sec[f"{key}.{tag}"] = time.perf_counter() - t
        res["encoders"][key] = r
        del enc
        if cuda:
            torch.cuda.empty_cache()
    t = time.perf_counter()
    res["slide_ssl"] = slide_ssl(Path(data["ssl_dir"]), workdir, sizes)
    sec["slide_ssl"] = time.perf_counter() - t
    t = time.perf_counter()
    res["slide_ssl_stream"] = slide_ssl_stream(workdir, sizes)
    sec["slide_ssl_stream"] = time.perf_counter() - t
    res["targets"] = judge(res)
    res["seconds"] = time.perf_counter() - t0
    return res


def judge(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it held."""
    flat = {"slide_ssl.max_rel_loss_gap": res["slide_ssl"]["max_rel_loss_gap"]}
    if "slide_ssl_stream" in res:
        flat["slide_ssl.store_vs_memory"] = res["slide_ssl_stream"]["ratio"]
    for key, r in res["encoders"].items():
        flat[f"{key}.e2e_ratio"] = r["e2e"]["ratio_to_alone"]
        flat[f"{key}.e2e_bank_ratio"] = r["e2e_bank"]["ratio_to_alone"]
        flat[f"{key}.min_cosine"] = r["min_cosine"]
    out = []
    for name, (thr, kind) in TARGETS.items():
        if name not in flat:
            continue
        v = flat[name]
        out.append({"name": name, "value": v, "threshold": thr, "kind": kind,
                    "held": bool(v >= thr if kind == "min" else v <= thr)})
    return out


def report(res: dict[str, Any]) -> str:
    """The printed table and the final targets line."""
    lines = [f"gpu_check ({res['mode']}) on {res['device_name']} [{res['device']}], torch "
             f"{res['torch']}, cuda {res['cuda']}, {res['cores']} cores, batch {res['batch_size']}, "
             f"{res['data']['slides']} slides of {res['data']['slide_px']} px",
             f"{'encoder':10s} {'model':9s} {'dtype':9s} {'alone/s':>9s} {'e2e/s':>8s} {'ratio':>6s} "
             f"{'bank e2e/s':>10s} {'ratio':>6s} {'busy':>5s} {'GPU util':>8s} {'GPU MB':>8s} {'host MB':>8s} "
             f"{'min cos':>8s}"]
    for key, r in res["encoders"].items():
        e, b = r["e2e"], r["e2e_bank"]
        util = "n/a" if e["gpu_util_mean"] is None else f"{e['gpu_util_mean']:.0f}%"
        gmb = "n/a" if e["peak_gpu_mb"] is None else f"{max(e['peak_gpu_mb'], b['peak_gpu_mb']):.0f}"
        lines.append(
            f"{key:10s} {r['model']:9s} {r['dtype']:9s} {r['alone_tiles_per_s']:9.0f} "
            f"{e['tiles_per_s']:8.0f} {e['ratio_to_alone']:6.2f} {b['tiles_per_s']:10.0f} "
            f"{b['ratio_to_alone']:6.2f} {e['encoder_busy']:5.2f} {util:>8s} {gmb:>8s} "
            f"{max(e['peak_host_mb'], b['peak_host_mb']):8.0f} {r['min_cosine']:8.5f}")
    s = res["slide_ssl"]
    lines.append(f"SlideSSL abmil, {s['slides']} slides, {s['epochs']} epochs: views/s CPU "
                 f"{s['cpu']['views_per_s']:.0f}, {res['device']} {s['device']['views_per_s']:.0f}; "
                 f"largest loss gap {s['max_rel_loss_gap']:.4f} of the mean loss")
    lines.append(f"  loss CPU    {' '.join(f'{v:.4f}' for v in s['cpu']['loss'])}")
    lines.append(f"  loss device {' '.join(f'{v:.4f}' for v in s['device']['loss'])}")
    if "slide_ssl_stream" in res:
        r = res["slide_ssl_stream"]
        lines.append(f"SlideSSL streaming ({r['slides']} slides, k={r['k']}, batch {r['batch']}, "
                     f"{r['readers']} readers, {r['steps']} steps): store "
                     f"{r['store_steps_per_s']:.1f} steps/s vs in memory "
                     f"{r['memory_steps_per_s']:.1f} = {r['ratio']:.2f}; same losses: "
                     f"{r['same_losses']}")
    held = [f"{t['name']}={t['value']:.3g}" for t in res["targets"] if t["held"]]
    miss = [f"{t['name']}={t['value']:.3g} ({'>=' if t['kind'] == 'min' else '<='} "
            f"{t['threshold']})" for t in res["targets"] if not t["held"]]
    lines.append(f"total {res['seconds']:.0f} s: " + ", ".join(
        f"{k} {v:.0f}" for k, v in res["section_s"].items()))
    lines.append(f"TARGETS held: {', '.join(held) or 'none'} | NOT held: {', '.join(miss) or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-twin", action="store_true",
                    help="toy sizes on the CPU (tiny encoders, bf16 autocast on the CPU)")
    ap.add_argument("--out", default="gpu_check_out", help="folder for data, stores and the JSON")
    ap.add_argument("--device", default=None, help="device to measure (default cuda / cpu twin)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="tiles per encoder call (default: embed_slides's default)")
    ap.add_argument("--encoders", nargs="*", default=None, choices=["resnet50", "vit_l_uni"])
    ap.add_argument("--slides", type=int, default=None, help="override the number of big slides")
    ap.add_argument("--slide-px", type=int, default=None, help="override their edge (px)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sizes = CPU_TWIN if args.cpu_twin else GPU
    if args.device:
        sizes = replace(sizes, device=args.device)
    if args.slides:
        sizes = replace(sizes, n_slides=args.slides)
    if args.slide_px:
        sizes = replace(sizes, slide_px=args.slide_px)
    if sizes.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here: run with --cpu-twin (or --device cpu)", file=sys.stderr)
            return 2
    out = Path(args.out)
    res = run_check(sizes, out, batch_size=args.batch_size,
                    encoders=tuple(args.encoders) if args.encoders else None)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
    print(report(res))
    print(f"wrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

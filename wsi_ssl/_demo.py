"""The whole pipeline on a generated cohort, on a laptop CPU, in minutes: ``wsi-ssl demo``.

Steps (each is skipped when its output already exists, so a rerun resumes)::

    1. make_cohort          generated pyramidal TIFF slides + labels.csv (label, survival)
    2. tile QC              tissue mask + tile grid picture of one slide
    3. embed                tile embeddings + the Giga-SSL augmentation bank -> zarr TileStore
    4. pretrain-slides      SlideSSL (Giga-SSL) on the store, no labels
    5. encode-slides        compact slide embeddings (.npz)
    6. probe + survival     few-shot linear probes (SSL vs mean pooling) and a Cox model
    7. report               report.md / report.html with the pictures

The same calls, with a GPU, real slides and bigger numbers, are what a TCGA run does.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run (defaults: ~3-5 minutes on 2 CPU cores)."""

    n_slides: int = 48
    seed: int = 0
    tile_size: int = 112
    mpp: float = 0.5
    encoder: str = "tiny-cnn"
    views: int = 8
    view_tiles: int = 32
    slide_head: str = "abmil"
    tiles_per_view: int = 32
    slide_epochs: int = 150
    n_labeled: tuple[int, ...] = (8, 16, 32)
    test_size: float = 1 / 3
    repeats: int = 10
    device: str = "auto"
    n_workers: int | None = None


@dataclass(frozen=True)
class DemoResult:
    out_dir: Path
    summary: dict[str, Any]
    report_md: Path
    report_html: Path
    seconds: dict[str, float] = field(default_factory=dict)


def _step(name: str, say: Callable[[str], None], timings: dict[str, float]):
    class _Timer:
        def __enter__(self):
            say(f"[{len(timings) + 1}] {name} ...")
            self.t = time.perf_counter()
            return self

        def __exit__(self, *exc):
            timings[name] = time.perf_counter() - self.t
            if exc[0] is None:
                say(f"    done in {timings[name]:.1f} s")
            return False

    return _Timer()


def mean_pooled(store: Any, slide_ids: list[str] | None = None):
    """The baseline slide embedding: the mean of each slide's clean tile features."""
    from wsi_ssl.store import SlideEmbeddings

    ids = list(slide_ids) if slide_ids is not None else list(store.slide_ids)
    mat = np.stack([np.asarray(store[s].features, np.float32).mean(0) for s in ids])
    return SlideEmbeddings(tuple(ids), mat, {"method": "mean-pooled tile features",
                                             "store": str(getattr(store, "path", ""))})


def run_demo(out_dir: str | os.PathLike = "wsi-ssl-demo", config: DemoConfig | None = None,
             *, say: Callable[[str], None] | None = None) -> DemoResult:
    """Run the whole pipeline into ``out_dir`` and return the summary (also in ``summary.json``).

    ``say`` receives one line per step (the CLI passes ``print``); the library itself only logs.
    Every step whose output exists is reused, so an interrupted demo resumes where it stopped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = config or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = say or logger.info
    timings: dict[str, float] = {}
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    # 1. cohort ---------------------------------------------------------------------------
    from wsi_ssl.datasets import make_cohort

    with _step(f"generate a cohort of {cfg.n_slides} slides", say, timings):
        cohort = make_cohort(out / "cohort", n_slides=cfg.n_slides, seed=cfg.seed,
                             mpp=cfg.mpp, n_jobs=cfg.n_workers or min(2, os.cpu_count() or 1))
        say(f"    {len(cohort)} pyramidal TIFFs in {cohort.slides_dir}, labels in "
            f"{cohort.labels_csv.name}")

    # 2. tiling QC --------------------------------------------------------------------------
    from wsi_ssl.tiling import detect_tissue, open_slide, plot_grid, tile_grid

    qc_png = figs / "tiling_qc.png"
    with _step("tissue detection and tile grid (QC picture)", say, timings):
        pos = cohort.labels.index[cohort.labels["label"] == 1]
        first = cohort.paths[int(pos[0]) if len(pos) else 0]
        with open_slide(first) as slide:
            tissue = detect_tissue(slide)
            grid = tile_grid(slide, mpp=cfg.mpp, tile_size=cfg.tile_size, tissue=tissue)
            if not qc_png.exists():
                fig = plot_grid(slide, grid, tissue)
                fig.savefig(qc_png, dpi=110, bbox_inches="tight")
                plt.close(fig)
        say(f"    {slide.slide_id}: {len(grid)} tiles of {cfg.tile_size} px at {cfg.mpp} µm/px "
            f"(level {grid.level}) -> {qc_png.relative_to(out)}")

    # 3. embed ------------------------------------------------------------------------------
    from wsi_ssl.encoders import create_encoder
    from wsi_ssl.store import TileStore
    from wsi_ssl.tiling import embed_slides

    store_path = out / "tiles.zarr"
    with _step(f"embed tiles ({cfg.encoder}) + {cfg.views} augmented versions per slide",
               say, timings):
        encoder = create_encoder(cfg.encoder, device=cfg.device)
        rep = embed_slides(list(cohort.paths), encoder, store_path, mpp=cfg.mpp,
                           tile_size=cfg.tile_size, views=cfg.views, view_tiles=cfg.view_tiles,
                           seed=cfg.seed, device=cfg.device, n_workers=cfg.n_workers)
        say(f"    {len(rep.done)} embedded, {len(rep.skipped)} reused, {len(rep.failed)} failed; "
            f"{rep.n_tiles + rep.n_view_tiles} tiles at {rep.tiles_per_second:.0f} tiles/s")
    store = TileStore(store_path, mode="r")

    # 4. slide SSL --------------------------------------------------------------------------
    from wsi_ssl.pretrain import SlideSSL

    model_dir = out / "slide_model"
    with _step(f"slide-level contrastive pretraining (Giga-SSL, {cfg.slide_epochs} epochs)",
               say, timings):
        if (model_dir / "config.json").exists():
            model = SlideSSL.load(model_dir)
            say("    reusing the trained model in slide_model/")
        else:
            model = SlideSSL(**_slide_ssl_kwargs(cfg), checkpoint_dir=out / "slide_ckpt")
            model.fit(store, resume=(out / "slide_ckpt" / "checkpoint.safetensors").exists())
            model.save(model_dir)
        loss_png = _find_loss_curve(out)

    # 5. encode -----------------------------------------------------------------------------
    from wsi_ssl.store import SlideEmbeddings

    emb_path = out / "slide_embeddings.npz"
    with _step("encode slides -> compact embeddings", say, timings):
        if emb_path.exists():
            ssl_emb = SlideEmbeddings.load(emb_path)
        else:
            ssl_emb = model.transform(store)
            ssl_emb.save(emb_path)
        mean_emb = mean_pooled(store, list(ssl_emb.slide_ids))
        say(f"    {len(ssl_emb)} slides x {ssl_emb.dim} floats, "
            f"{ssl_emb.nbytes_per_slide:.0f} bytes per slide ({emb_path.name})")

    # 6. probes + survival ------------------------------------------------------------------
    from wsi_ssl.eval import linear_probe, survival

    labels = cohort.labels
    with _step("few-shot linear probes (slide SSL vs mean pooling) and a Cox model", say,
               timings):
        probes = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name, emb in (("slide-ssl", ssl_emb), ("mean-pool", mean_emb)):
                probes[name] = linear_probe(emb, labels, n_labeled=(*cfg.n_labeled, None),
                                            repeats=cfg.repeats, test_size=cfg.test_size,
                                            seed=cfg.seed)
                probes[name].save(out / "probe" / name)
            surv = survival(ssl_emb, labels, seed=cfg.seed)
            surv.save(out / "survival")
        for msg in dict.fromkeys(str(w.message) for w in caught):
            say(f"    note: {msg}")

    # 7. report -----------------------------------------------------------------------------
    summary = _summarise(cfg, probes, surv, ssl_emb, rep, timings)
    _plot_learning_curves(summary, figs / "learning_curve.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    md, html = _write_report(out, cfg, summary, qc_png, loss_png)
    say(f"report: {md} and {html}")
    return DemoResult(out, summary, md, html, dict(timings))


def _slide_ssl_kwargs(cfg: DemoConfig) -> dict[str, Any]:
    """Small-cohort settings of the Giga-SSL recipe (paper defaults are documented on SlideSSL)."""
    return dict(head=cfg.slide_head, tiles_per_view=cfg.tiles_per_view,
                epochs=cfg.slide_epochs, batch_size=min(32, cfg.n_slides), lr=1e-3,
                temperature=0.1, warmup_epochs=min(10, cfg.slide_epochs // 10),
                device=cfg.device, seed=cfg.seed)


def _find_loss_curve(out: Path) -> Path | None:
    for cand in sorted(out.rglob("*loss*.png")):
        return cand
    return None


def _auc_rows(report: Any) -> dict[str, dict[str, float]]:
    df = report.to_frame()
    rows: dict[str, dict[str, float]] = {}
    for _, r in df.iterrows():
        rows[str(r["name"])] = {k: float(r[k]) for k in ("auc_mean", "auc_std", "auc_ci_low",
                                                         "auc_ci_high", "bacc_mean")}
    return rows


def _summarise(cfg, probes, surv, ssl_emb, rep, timings) -> dict[str, Any]:
    return {
        "n_slides": len(ssl_emb),
        "embedding_dim": ssl_emb.dim,
        "bytes_per_slide": ssl_emb.nbytes_per_slide,
        "tiles_per_second": rep.tiles_per_second,
        "probe": {name: _auc_rows(p) for name, p in probes.items()},
        "survival": json.loads(surv.to_json()),
        "seconds": timings,
    }


def summary_table(summary: dict[str, Any]) -> str:
    """The demo's one table: AUC per n labeled for slide SSL vs mean pooling, plus the C-index."""
    probe = summary["probe"]
    names = list(next(iter(probe.values())).keys())
    lines = ["| labeled slides | " + " | ".join(f"AUC {m}" for m in probe) + " |",
             "|---|" + "---|" * len(probe)]
    for n in names:
        cells = []
        for m in probe:
            r = probe[m].get(n)
            cells.append(f"{r['auc_mean']:.3f} +- {r['auc_std']:.3f}" if r else "-")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    s = summary["survival"]
    cidx = s.get("c_index_mean", s.get("cindex_mean"))
    cstd = s.get("c_index_std", s.get("cindex_std", float("nan")))
    if cidx is not None:
        lines.append("")
        lines.append(f"Survival (Cox on slide-SSL embeddings): out-of-fold C-index "
                     f"{cidx:.3f} +- {cstd:.3f}")
    lines.append(f"Slide embeddings: {summary['n_slides']} x {summary['embedding_dim']}, "
                 f"{summary['bytes_per_slide']:.0f} bytes per slide")
    return "\n".join(lines)


def _write_report(out: Path, cfg: DemoConfig, summary: dict[str, Any], qc_png: Path,
                  loss_png: Path | None) -> tuple[Path, Path]:
    import html as _html

    pictures = [("Few-shot AUC: slide SSL vs mean pooling", out / "figures" / "learning_curve.png"),
                ("Tiling QC: tissue mask and tile grid", qc_png)]
    if loss_png is not None:
        pictures.append(("Slide-level contrastive pretraining: loss", loss_png))
    for title, pattern in (("Few-shot learning curve, slide SSL", "probe/slide-ssl/*.png"),
                           ("Few-shot learning curve, mean pooling", "probe/mean-pool/*.png"),
                           ("Survival: Kaplan-Meier of out-of-fold risk groups", "survival/*.png")):
        for p in sorted(out.glob(pattern)):
            pictures.append((title, p))
    table = summary_table(summary)
    secs = ", ".join(f"{k}: {v:.0f} s" for k, v in summary["seconds"].items())
    md = [
        "# wsi-ssl demo report", "",
        f"{summary['n_slides']} generated slides, tiles of {cfg.tile_size} px at {cfg.mpp} µm/px, "
        f"encoder `{cfg.encoder}`, {cfg.views} augmented versions x {cfg.view_tiles} tiles per "
        f"slide, slide SSL for {cfg.slide_epochs} epochs.", "", table, "",
        f"Time per step: {secs}.", "",
    ]
    for title, p in pictures:
        md += [f"## {title}", "", f"![{title}]({p.relative_to(out).as_posix()})", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))
    body = [f"<h1>wsi-ssl demo report</h1><pre>{_html.escape(table)}</pre>",
            f"<p>{_html.escape(secs)}</p>"]
    for title, p in pictures:
        body.append(f"<h2>{_html.escape(title)}</h2><img src='{p.relative_to(out).as_posix()}' "
                    "style='max-width:900px'>")
    html_path = out / "report.html"
    html_path.write_text("<!doctype html><meta charset='utf-8'><title>wsi-ssl demo</title>"
                         "<body style='font-family:sans-serif'>" + "".join(body) + "</body>")
    return md_path, html_path


def _plot_learning_curves(summary: dict[str, Any], path: Path) -> None:
    """AUC against the number of labelled slides, one line per embedding, on one picture."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in summary["probe"].items():
        pts = sorted((int(k.split("(")[-1].rstrip(")")) if "all" in k else int(k[2:]), r)
                     for k, r in rows.items() if k.startswith("n="))
        if not pts:
            continue
        n = [p[0] for p in pts]
        auc = np.array([p[1]["auc_mean"] for p in pts])
        sd = np.array([p[1]["auc_std"] for p in pts])
        ax.errorbar(n, auc, yerr=sd, marker="o", capsize=3, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("labelled slides")
    ax.set_ylabel("held-out AUC (mean +- std over repeats)")
    ax.set_ylim(0.3, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

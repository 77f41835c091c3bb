"""The whole pipeline on a generated cohort, on a laptop CPU, in minutes: ``wsi-ssl demo``.

Steps (each is skipped when its output already exists, so a rerun resumes)::

    1. make_cohort          generated pyramidal TIFF slides + labels.csv (label, survival)
    2. tile QC              tissue mask + tile grid picture of one slide
    3. embed                tile embeddings + the Giga-SSL augmentation bank -> zarr TileStore
    4. pretrain-slides      SlideSSL (Giga-SSL) on the store, no labels
    5. encode-slides        compact slide embeddings (.npz)
    6. probe + survival     few-shot linear probes (SSL vs mean pooling) and a Cox model
    7. look inside          attention heatmaps (one positive, one negative slide), tile clusters,
                            slide retrieval (SSL vs mean pooling)
    8. report               report.html (tables, settings, pictures) and report.md

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

from wsi_ssl._validation import Interval, Pattern, validate_params
from wsi_ssl._version import __version__
from wsi_ssl.datasets import make_cohort
from wsi_ssl.encoders import create_encoder
from wsi_ssl.errors import ConfigError
from wsi_ssl.eval import (
    ReportSection,
    cluster_map,
    heatmap,
    linear_probe,
    plot_retrieval,
    retrieval_report,
    survival,
    tile_scores,
    write_html_report,
)
from wsi_ssl.pretrain import SlideSSL, mean_pool_embeddings
from wsi_ssl.store import SlideEmbeddings, TileStore
from wsi_ssl.tiling import detect_tissue, embed_slides, open_slide, plot_grid, tile_grid

__all__ = ["DemoConfig", "DemoResult", "run_demo", "QUICK", "summary_table"]

logger = logging.getLogger(__name__)



@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Sizes of the demo run (defaults: ~3-5 minutes on 2 CPU cores).

    Attributes:
        n_slides: generated slides (one patient each).
        seed: seeds the cohort, the embedding, the training and the probes.
        tile_size: tile side in pixels at ``mpp``.
        mpp: µm/px of the tiles (and of the generated slides' level 0).
        encoder: registered tile encoder (``list_encoders()``).
        views: augmented versions of each slide in the store's augmentation bank.
        view_tiles: tiles per augmented version.
        slide_head: MIL head of the slide encoder (``list_heads()``).
        tiles_per_view: tiles sampled per view in slide-level pretraining.
        slide_epochs: slide-level pretraining epochs.
        n_labeled: labelled-slide counts of the few-shot probes (each >= 2).
        test_size: held-out share of the patients, in (0, 1).
        repeats: few-shot subsets drawn per count.
        device: ``"auto"``, ``"cpu"``, ``"mps"``, ``"cuda"`` or ``"cuda:N"``.
        n_workers: worker processes for writing and embedding slides (``None``: automatic).
    """

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

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_labeled", tuple(self.n_labeled))
        if not self.n_labeled:
            raise ConfigError("DemoConfig(n_labeled=()) must be one or more counts >= 2.")
        validate_params("DemoConfig", asdict(self), _DEMO_CONSTRAINTS)
        for n in self.n_labeled:
            validate_params("DemoConfig", {"n_labeled": n}, {"n_labeled": [Interval(int, 2, None)]})


_DEMO_CONSTRAINTS: dict[str, list[Any]] = {
    "n_slides": [Interval(int, 4, None)],
    "seed": [Interval(int, 0, None)],
    "tile_size": [Interval(int, 16, None)],
    "views": [Interval(int, 1, None)],
    "view_tiles": [Interval(int, 1, None)],
    "tiles_per_view": [Interval(int, 1, None)],
    "slide_epochs": [Interval(int, 1, None)],
    "repeats": [Interval(int, 1, None)],
    "n_workers": [Interval(int, 1, None), None],
    "mpp": [Interval(float, 0, None, closed="neither")],
    "test_size": [Interval(float, 0, 1, closed="neither")],
    "encoder": [str],
    "slide_head": [str],
    "device": [Pattern(r"auto|cpu|mps|cuda(:\d+)?", "one of 'auto', 'cpu', 'mps', 'cuda', "
                       "'cuda:N' (--device)")],
}


#: a smoke run of every step in about a minute (``wsi-ssl demo --quick``; the demo test)
QUICK = DemoConfig(n_slides=10, slide_epochs=3, views=4, view_tiles=16, tiles_per_view=16,
                   repeats=2, test_size=0.3, n_labeled=(4,), n_workers=1, device="cpu")


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


def run_demo(out_dir: str | os.PathLike = "wsi-ssl-demo", config: DemoConfig | None = None,
             *, say: Callable[[str], None] | None = None) -> DemoResult:
    """Run the whole pipeline into ``out_dir`` and return the summary (also in ``summary.json``).

    ``say`` receives one line per step (the CLI passes ``print``); the library itself only logs.
    Every step whose output exists is reused, so an interrupted demo resumes where it stopped.
    """
    import matplotlib  # plotting backend chosen before pyplot is first imported  # lazy: matplotlib only when a figure is drawn

    matplotlib.use("Agg")
    cfg = config or DemoConfig()
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    say = say or logger.info
    timings: dict[str, float] = {}

    with _step(f"generate a cohort of {cfg.n_slides} slides", say, timings):
        cohort = _make_cohort(out, cfg, say)
    with _step("tissue detection and tile grid (QC picture)", say, timings):
        qc_png = _tiling_qc(out, cfg, cohort, say)
    with _step(f"embed tiles ({cfg.encoder}) + {cfg.views} augmented versions per slide",
               say, timings):
        rep = _embed(out, cfg, cohort, say)
    store = TileStore(out / "tiles.zarr", mode="r")
    with _step(f"slide-level contrastive pretraining (Giga-SSL, {cfg.slide_epochs} epochs)",
               say, timings):
        model = _pretrain_slides(out, cfg, store, say)
        loss_png = _find_loss_curve(out)
    with _step("encode slides -> compact embeddings", say, timings):
        ssl_emb, mean_emb = _encode(out, store, model, say)
    with _step("few-shot linear probes (slide SSL vs mean pooling) and a Cox model", say,
               timings):
        probes, surv = _probes(out, cfg, cohort.labels, ssl_emb, mean_emb, say)
    with _step("look inside: attention heatmaps, tile clusters, slide retrieval", say, timings):
        inspect = _look_inside(out, cohort, store, model, {"slide-ssl": ssl_emb,
                                                           "mean-pool": mean_emb}, cfg, say)
    with _step("report", say, timings):
        summary = _summarise(cfg, probes, surv, ssl_emb, rep, timings)
        summary.update(retrieval=inspect["retrieval"], localisation=inspect["localisation"])
        _plot_learning_curves(summary, out / "figures" / "learning_curve.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        md, html = _write_report(out, cfg, summary, qc_png, loss_png, inspect)
        say(f"    {html.relative_to(out)} (and {md.name})")
    return DemoResult(out, summary, md, html, dict(timings))


def _make_cohort(out: Path, cfg: DemoConfig, say: Callable[[str], None]) -> Any:
    """Step 1: the generated slides and their labels (reused when present)."""
    cohort = make_cohort(out / "cohort", n_slides=cfg.n_slides, seed=cfg.seed, mpp=cfg.mpp,
                         n_workers=cfg.n_workers or min(2, os.cpu_count() or 1))
    say(f"    {len(cohort)} pyramidal TIFFs in {cohort.slides_dir}, labels in "
        f"{cohort.labels_csv.name}")
    return cohort


def _tiling_qc(out: Path, cfg: DemoConfig, cohort: Any, say: Callable[[str], None]) -> Path:
    """Step 2: tissue mask and tile grid of one positive slide, as a picture."""
    import matplotlib.pyplot as plt  # heavy; only the plotting steps need it  # lazy: matplotlib only when a figure is drawn

    qc_png = out / "figures" / "tiling_qc.png"
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
    return qc_png


def _embed(out: Path, cfg: DemoConfig, cohort: Any, say: Callable[[str], None]) -> Any:
    """Step 3: tile embeddings and the augmentation bank in ``tiles.zarr`` (resumable)."""
    encoder = create_encoder(cfg.encoder, device=cfg.device)
    rep = embed_slides(list(cohort.paths), encoder, out / "tiles.zarr", mpp=cfg.mpp,
                       tile_size=cfg.tile_size, views=cfg.views, view_tiles=cfg.view_tiles,
                       seed=cfg.seed, device=cfg.device, n_workers=cfg.n_workers)
    say(f"    {len(rep.done)} embedded, {len(rep.skipped)} reused, {len(rep.failed)} failed; "
        f"{rep.n_tiles + rep.n_view_tiles} tiles at {rep.tiles_per_second:.0f} tiles/s")
    return rep


def _pretrain_slides(out: Path, cfg: DemoConfig, store: Any, say: Callable[[str], None]) -> Any:
    """Step 4: the slide encoder (Giga-SSL), reused from ``slide_model/`` or resumed."""
    model_dir = out / "slide_model"
    if (model_dir / "config.json").exists():
        say("    reusing the trained model in slide_model/")
        return SlideSSL.load(model_dir)
    model = SlideSSL(**_slide_ssl_kwargs(cfg), checkpoint_dir=out / "slide_ckpt")
    model.fit(store, resume=(out / "slide_ckpt" / "checkpoint.safetensors").exists())
    model.save(model_dir)
    return model


def _encode(out: Path, store: Any, model: Any, say: Callable[[str], None]) -> tuple[Any, Any]:
    """Step 5: slide embeddings of the trained encoder, and the mean-pool baseline."""
    emb_path = out / "slide_embeddings.npz"
    if emb_path.exists():
        ssl_emb = SlideEmbeddings.load(emb_path)
    else:
        ssl_emb = model.transform(store)
        ssl_emb.save(emb_path)
    mean_emb = mean_pool_embeddings(store, list(ssl_emb.slide_ids))
    say(f"    {len(ssl_emb)} slides x {ssl_emb.dim} floats, "
        f"{ssl_emb.nbytes_per_slide:.0f} bytes per slide ({emb_path.name})")
    return ssl_emb, mean_emb


def _probes(out: Path, cfg: DemoConfig, labels: Any, ssl_emb: Any, mean_emb: Any,
            say: Callable[[str], None]) -> tuple[dict[str, Any], Any]:
    """Step 6: few-shot linear probes of both embeddings and a Cox model of slide SSL."""
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
    return probes, surv


def _look_inside(out: Path, cohort: Any, store: Any, model: Any, embeddings: dict[str, Any],
                 cfg: DemoConfig, say: Callable[[str], None]) -> dict[str, Any]:
    """Heatmaps of one positive and one negative slide, a cluster map, the localisation of the
    tumour by the attention over every positive slide, and slide retrieval for each embedding."""

    labels = cohort.labels
    reports = {}
    for name, emb in embeddings.items():
        reports[name] = retrieval_report(emb, labels, n_bootstrap=500, seed=cfg.seed)
        reports[name].save(out / "retrieval" / name)
    fig = plot_retrieval(reports)
    retrieval_png = out / "figures" / "retrieval.png"
    fig.savefig(retrieval_png, dpi=100, bbox_inches="tight")
    retrieval = {n: {m: v["value"] for m, v in r.metrics.items()} for n, r in reports.items()}
    ci = {n: {m: [v["ci_low"], v["ci_high"]] for m, v in r.metrics.items()}
          for n, r in reports.items()}
    say("    retrieval mAP@5: " + ", ".join(f"{n} {v['mAP@5']:.3f}" for n, v in
                                           retrieval.items()))
    res: dict[str, Any] = {"retrieval": {"value": retrieval, "ci": ci,
                                         "chance": next(iter(reports.values())).chance},
                           "retrieval_png": retrieval_png, "reports": reports,
                           "heatmaps": [], "localisation": {}}
    pos = labels[labels["label"] == 1].sort_values("tumor_fraction")
    neg = labels[labels["label"] == 0]
    ids = set(store.slide_ids)
    pos, neg = pos[pos["slide_id"].isin(ids)], neg[neg["slide_id"].isin(ids)]
    if not len(pos) or not len(neg):
        return res
    try:
        hits, chance = [], []
        for sid in pos["slide_id"]:
            sc = tile_scores(store, sid, model)
            truth = cohort.tile_fractions(sid, sc.coords, int(round(sc.tile_size_level0)))
            tumour = truth[:, 2] > 0.5
            if tumour.any():
                k = max(5, int(tumour.sum()))
                hits.append(float(tumour[sc.top_tiles(k)].mean()))
                chance.append(float(tumour.mean()))
        res["localisation"] = {"slides": len(hits), "precision_at_k": float(np.mean(hits)),
                               "chance": float(np.mean(chance))}
        say(f"    attention: {np.mean(hits):.2f} of the top-k tiles lie in the tumour "
            f"(chance {np.mean(chance):.2f}, {len(hits)} positive slides)")
        pos_id = str(pos["slide_id"].iloc[len(pos) // 2])  # the median tumour extent
        neg_id = str(neg["slide_id"].iloc[0])
        both = np.concatenate([tile_scores(store, s, model).scores for s in (pos_id, neg_id)])
        scale = (0.0, float(np.percentile(both, 99)))  # one colour scale for the two slides
        for sid, what in ((pos_id, "positive"), (neg_id, "negative")):
            path = cohort.paths[cohort.slide_ids.index(sid)]
            hm = heatmap(path, store, model, out_dir=out / "heatmaps", color_range=scale)
            res["heatmaps"].append((f"Attention of the slide encoder, {what} slide {sid}",
                                    hm.figure))
        cm = cluster_map(cohort.paths[cohort.slide_ids.index(pos_id)], store, n_clusters=6,
                         seed=cfg.seed, out_dir=out / "heatmaps")
        res["heatmaps"].append((f"k-means clusters of the tile features, slide {pos_id}",
                                cm.figure))
    except ConfigError as err:  # a slide head without attention: no heatmaps, say why
        say(f"    note: no heatmaps: {err}")
    return res


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
    ret = summary.get("retrieval", {}).get("value")
    if ret:
        lines.append("Slide retrieval (other patients only), mAP@5: " + ", ".join(
            f"{m} {v['mAP@5']:.3f}" for m, v in ret.items()) + "; top-1 majority vote: "
            + ", ".join(f"{m} {v['acc@1']:.3f}" for m, v in ret.items()))
    loc = summary.get("localisation")
    if loc:
        lines.append(f"Attention heatmaps: {loc['precision_at_k']:.2f} of the top-k tiles lie in "
                     f"the tumour (chance {loc['chance']:.2f}, {loc['slides']} positive slides)")
    lines.append(f"Slide embeddings: {summary['n_slides']} x {summary['embedding_dim']}, "
                 f"{summary['bytes_per_slide']:.0f} bytes per slide")
    return "\n".join(lines)


def _auc_frame(summary: dict[str, Any]):
    """Rows = labelled-slide settings, columns = embeddings: "mean ± std [95 % CI]"."""
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    probe = summary["probe"]
    rows = []
    for n in next(iter(probe.values())):
        row = {"labelled slides": n}
        for m, res in probe.items():
            r = res.get(n)
            row[f"AUC {m}"] = (f"{r['auc_mean']:.3f} ± {r['auc_std']:.3f} "
                               f"[{r['auc_ci_low']:.2f}, {r['auc_ci_high']:.2f}]") if r else "-"
        rows.append(row)
    return pd.DataFrame(rows)


def _retrieval_frame(retrieval: dict[str, Any]):
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    vals, ci = retrieval["value"], retrieval["ci"]
    metrics = list(next(iter(vals.values())))
    return pd.DataFrame([{"metric": m, **{name: f"{vals[name][m]:.3f} [{ci[name][m][0]:.2f}, "
                                                f"{ci[name][m][1]:.2f}]" for name in vals}}
                         for m in metrics])


def _write_report(out: Path, cfg: DemoConfig, summary: dict[str, Any], qc_png: Path,
                  loss_png: Path | None, inspect: dict[str, Any]) -> tuple[Path, Path]:
    """``report.html`` and ``report.md``: the settings, the tables and the pictures."""
    settings = _report_settings(cfg, summary)
    sections = _report_sections(out, summary, qc_png, loss_png, inspect)
    html_path = write_html_report(
        out / "report.html", title="wsi-ssl demo report", settings=settings, sections=sections,
        intro="The whole pipeline on a generated cohort: tiles, tile embeddings, slide-level "
              "self-supervised pretraining, then what a few labels buy.")
    md = ["# wsi-ssl demo report", ""]
    md += [f"- {k}: {v}" for k, v in settings.items()] + ["", summary_table(summary), ""]
    for sec in sections:
        md += [f"## {sec.title}", "", sec.text, ""]
        md += [f"![{c}]({p.relative_to(out).as_posix()})" for c, p in sec.figures] + [""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))
    return md_path, html_path


def _report_settings(cfg: DemoConfig, summary: dict[str, Any]) -> dict[str, str]:
    secs = ", ".join(f"{k}: {v:.0f} s" for k, v in summary["seconds"].items())
    return {
        "slides": f"{summary['n_slides']} generated (label in 3-15 % of the tissue, decoys in "
                  "both classes)",
        "tiles": f"{cfg.tile_size} px at {cfg.mpp} µm/px, encoder {cfg.encoder}",
        "augmentation bank": f"{cfg.views} versions x {cfg.view_tiles} tiles per slide",
        "slide SSL": f"{cfg.slide_head} head, {cfg.tiles_per_view} tiles per view, "
                     f"{cfg.slide_epochs} epochs",
        "slide embedding": f"{summary['embedding_dim']} floats, "
                           f"{summary['bytes_per_slide']:.0f} bytes per slide",
        "probes": f"held-out {cfg.test_size:.2f} of the patients, {cfg.repeats} repeats",
        "seed / device": f"{cfg.seed} / {cfg.device}",
        "time per step": secs,
        "wsi-ssl": __version__,
    }


def _report_sections(out: Path, summary: dict[str, Any], qc_png: Path, loss_png: Path | None,
                     inspect: dict[str, Any]) -> list[Any]:
    def found(pattern: str) -> tuple[Path, ...]:
        return tuple(sorted(out.glob(pattern)))

    s = summary["survival"]
    cidx = s.get("c_index_mean", float("nan"))
    cstd = s.get("c_index_std", float("nan"))
    loc = summary.get("localisation") or {}
    sections = [
        ReportSection(
            title="Few-shot classification: slide SSL vs mean pooling",
            text="Balanced logistic regression on the slide embeddings, trained on n labelled "
                 "slides and scored on the held-out patients (mean ± std over repeats; 95 % CI: "
                 "patient bootstrap with refitting, see docs/eval.md); the last row is 5-fold "
                 "cross-validation.",
            tables=(("Held-out AUC", _auc_frame(summary)),),
            figures=(("Few-shot AUC against the number of labelled slides",
                      out / "figures" / "learning_curve.png"),)),
        ReportSection(
            title="Survival",
            text=f"Cox model on the slide-SSL embeddings: out-of-fold C-index {cidx:.3f} ± "
                 f"{cstd:.3f}.",
            figures=tuple(("Kaplan-Meier curves of out-of-fold risk groups", p)
                          for p in found("survival/*.png"))),
    ]
    if inspect.get("heatmaps"):
        text = "Attention of the slide encoder's MIL head over every tile (trained without labels)."
        if loc:
            text += (f" Over the {loc['slides']} positive slides, {loc['precision_at_k']:.2f} of "
                     f"the k highest-attention tiles (k = the number of tumour tiles) lie in the "
                     f"tumour, against {loc['chance']:.2f} by chance.")
        sections.append(ReportSection(title="Where the slide encoder looks", text=text,
                                      figures=tuple(inspect["heatmaps"])))
    if inspect.get("retrieval"):
        sections.append(ReportSection(
            title="Slide retrieval",
            text="Every slide queries all the others by cosine similarity (its own patient's "
                 "slides left out): majority-vote accuracy of the top-k labels and mAP@5, with "
                 f"patient-bootstrap 95 % intervals; always answering the majority class scores "
                 f"{inspect['retrieval']['chance']:.2f}.",
            tables=(("Retrieval figures", _retrieval_frame(inspect["retrieval"])),),
            figures=(("Retrieval: slide SSL vs mean pooling", inspect["retrieval_png"]),)))
    qc = [("Tissue mask (green) and tile grid (blue) of one slide", qc_png)]
    if loss_png is not None:
        qc.append(("Slide-level contrastive pretraining: NT-Xent loss per epoch", loss_png))
    qc += [(f"Few-shot details, {m}", p) for m in ("slide-ssl", "mean-pool")
           for p in found(f"probe/{m}/*.png")]
    sections.append(ReportSection(title="Quality control and details", figures=tuple(qc)))
    return sections


def _plot_learning_curves(summary: dict[str, Any], path: Path) -> None:
    """AUC against the number of labelled slides, one line per embedding, on one picture."""
    import matplotlib.pyplot as plt  # lazy: matplotlib only when a figure is drawn

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

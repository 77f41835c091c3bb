"""Benchmark: Giga-SSL slide embeddings vs mean pooling vs supervised ABMIL, few labels.

Pipeline (each step reuses its output in OUT when present)::

    make_cohort (label in a minority of the tissue)
      -> embed_slides(tiny-cnn, views=V)            zarr TileStore with the view bank
      -> SlideSSL(...).fit(store)                   no labels
      -> few-shot AUC on one fixed held-out split, identical labelled subsets for:
         (a) linear probe on SlideSSL embeddings
         (b) linear probe on mean-pooled tile features
         (c) supervised ABMIL (wsi_ssl.mil.MILClassifier) on the same labelled slides

Prints a table (AUC mean +- std over repeats), the training views/s and the bytes per slide of
the float16 embeddings. Default: ~a few minutes on 2 CPU cores once the cohort is embedded (the
embedding of 64 slides with views is the slow first step; it is cached in OUT).

    python benchmarks/bench_slide_ssl.py --out /tmp/bench-slide-ssl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def build(out: Path, n_slides: int, seed: int, views: int, view_tiles: int, tile_size: int):
    from wsi_ssl.datasets import make_cohort
    from wsi_ssl.store import TileStore
    from wsi_ssl.tiling import embed_slides

    cohort = make_cohort(out / "cohort", n_slides=n_slides, seed=seed, n_jobs=2)
    t = time.perf_counter()
    embed_slides(cohort.slides_dir, "tiny-cnn", out / "store.zarr", tile_size=tile_size,
                 views=views, view_tiles=view_tiles, device="cpu", n_workers=2, seed=seed)
    return cohort, TileStore(out / "store.zarr", mode="r"), time.perf_counter() - t


def probe_auc(xtr, ytr, xte, yte) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from wsi_ssl.eval._probe import DEFAULT_C

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=DEFAULT_C, max_iter=2000))
    clf.fit(xtr, ytr)
    return float(roc_auc_score(yte, clf.predict_proba(xte)[:, 1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bench-slide-ssl", type=Path)
    ap.add_argument("--n-slides", type=int, default=64)
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--view-tiles", type=int, default=64)
    ap.add_argument("--tile-size", type=int, default=112)
    ap.add_argument("--head", default="abmil")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--tiles-per-view", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--labels", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-abmil", action="store_true")
    args = ap.parse_args(argv)

    from wsi_ssl.mil import MILClassifier
    from wsi_ssl.pretrain import SlideSSL

    args.out.mkdir(parents=True, exist_ok=True)
    cohort, store, embed_s = build(args.out, args.n_slides, args.seed, args.views,
                                   args.view_tiles, args.tile_size)
    labels = cohort.labels.set_index("slide_id")
    ids = [s for s in store.slide_ids if s in labels.index]
    y = labels.loc[ids, "label"].to_numpy().astype(int)

    t = time.perf_counter()
    model = SlideSSL(args.head, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                     temperature=args.temperature, tiles_per_view=args.tiles_per_view,
                     warmup_epochs=max(1, args.epochs // 20), checkpoint_every=args.epochs,
                     checkpoint_dir=args.out / "slide_model", device="cpu", seed=args.seed)
    model.fit(store, slide_ids=ids)
    fit_s = time.perf_counter() - t
    emb = model.transform(store, ids, dtype="float16")
    x_ssl = emb.embeddings.astype(np.float32)
    x_mean = np.stack([store[s].features.astype(np.float32).mean(0) for s in ids])

    # one fixed stratified held-out half; labelled subsets drawn from the other half
    rng = np.random.default_rng(args.seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: (y == c).sum() // 2]
                           for c in (0, 1)])
    train = np.setdiff1d(np.arange(len(ids)), test)
    rows = []
    for n_lab in args.labels:
        res = {"ssl": [], "mean": [], "abmil": []}
        for r in range(args.repeats):
            sub = np.concatenate([
                np.random.default_rng([args.seed, n_lab, r]).permutation(
                    train[y[train] == c])[: n_lab // 2] for c in (0, 1)])
            res["ssl"].append(probe_auc(x_ssl[sub], y[sub], x_ssl[test], y[test]))
            res["mean"].append(probe_auc(x_mean[sub], y[sub], x_mean[test], y[test]))
            if not args.skip_abmil:
                from sklearn.metrics import roc_auc_score

                clf = MILClassifier("abmil", epochs=40, device="cpu", seed=r)
                clf.fit(store, y[sub], slide_ids=[ids[i] for i in sub])
                p = clf.predict_proba(store, slide_ids=[ids[i] for i in test])[:, 1]
                res["abmil"].append(float(roc_auc_score(y[test], p)))
        rows.append((n_lab, {k: (np.mean(v), np.std(v)) for k, v in res.items() if v}))

    print(f"\ncohort: {len(ids)} slides ({int(y.sum())} positive), {len(test)} held out; "
          f"tile store embedded in {embed_s:.0f} s (cached after the first run)")
    print(f"SlideSSL({args.head!r}, epochs={args.epochs}, batch={args.batch_size}, lr={args.lr}, "
          f"T={args.temperature}, k={args.tiles_per_view}): {fit_s:.0f} s, "
          f"{model.train_views_per_s_:.0f} training views/s, loss {model.history_[0]:.3f} -> "
          f"{model.history_[-1]:.3f}")
    print(f"embeddings: {emb.dim}-d {emb.embeddings.dtype}, {emb.nbytes_per_slide:.0f} bytes "
          "per slide\n")
    print("| labelled slides | (a) SlideSSL + linear | (b) mean pool + linear | "
          "(c) supervised ABMIL |")
    print("|---|---|---|---|")
    for n_lab, r in rows:
        cell = {k: f"{m:.3f} ± {s:.3f}" for k, (m, s) in r.items()}
        print(f"| {n_lab} | {cell['ssl']} | {cell['mean']} | {cell.get('abmil', 'n/a')} |")
    (args.out / "bench_slide_ssl.json").write_text(json.dumps({
        "n_slides": len(ids), "views_per_s": model.train_views_per_s_,
        "bytes_per_slide": emb.nbytes_per_slide, "fit_s": fit_s,
        "auc": {str(n): {k: list(v) for k, v in r.items()} for n, r in rows}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: Giga-SSL slide embeddings vs mean pooling vs supervised ABMIL, few labels.

Pipeline (each step reuses its output in OUT when present)::

    make_cohort (label in a minority of the tissue: tumour over 3-15 % of it, decoys in both classes)
      -> embed_slides(tiny-cnn, views=V)            zarr TileStore with the view bank
      -> SlideSSL(head).fit(store)                  no labels; one model per --heads entry
      -> few-shot AUC on several stratified held-out halves (--splits), and on each the same
         balanced labelled subsets (--repeats) drawn from the other half for:
         (a) linear probe on SlideSSL embeddings
         (b) linear probe on mean-pooled tile features
         (c) supervised ABMIL (wsi_ssl.mil.MILClassifier) trained on the same labelled slides

Prints one table (AUC mean +- std over splits x subsets), the paired difference of each SlideSSL
head against (b) and (c) on identical subsets (mean, 95 % interval of the mean over subsets, and
the share of subsets it wins), the training views/s and the bytes per slide of the float16
embeddings. Default (128 slides, 2 heads, 4 splits x 8 subsets): ~4 min to generate and embed the
cohort the first time (cached in OUT), then ~8 min on 2 CPU cores (ABMIL results are cached too).

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

    cohort = make_cohort(out / "cohort", n_slides=n_slides, seed=seed, n_workers=2)
    t = time.perf_counter()
    embed_slides(cohort.slides_dir, "tiny-cnn", out / "store.zarr", tile_size=tile_size,
                 views=views, view_tiles=view_tiles, device="cpu", n_workers=2, seed=seed)
    return cohort, TileStore(out / "store.zarr", mode="r"), time.perf_counter() - t


def probe_auc(xtr, ytr, xte, yte) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from wsi_ssl.eval import DEFAULT_C

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=DEFAULT_C, max_iter=2000))
    clf.fit(xtr, ytr)
    return float(roc_auc_score(yte, clf.predict_proba(xte)[:, 1]))


def subsets(y: np.ndarray, n_splits: int, labels: list[int], repeats: int, seed: int):
    """``(split, n_labelled, repeat, labelled idx, test idx)``: stratified held-out halves, and
    balanced labelled subsets of the other half (the same for every method)."""
    for split in range(n_splits):
        rng = np.random.default_rng([seed, 99, split])
        test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: (y == c).sum() // 2]
                               for c in (0, 1)])
        train = np.setdiff1d(np.arange(len(y)), test)
        for n_lab in labels:
            for r in range(repeats):
                sub = np.concatenate([
                    np.random.default_rng([seed, split, n_lab, r]).permutation(
                        train[y[train] == c])[: n_lab // 2] for c in (0, 1)])
                yield split, n_lab, r, sub, test


def hand_set(args) -> dict:
    """The hand-set SlideSSL settings of the command line."""
    return dict(batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                temperature=args.temperature, tiles_per_view=args.tiles_per_view)


def fit_slide_ssl(store, ids, head: str, args, out: Path, settings: dict | None = None,
                  tag: str = ""):
    """Train (or reload, when OUT holds a model with the same settings trained on the same
    store and slides) one SlideSSL model; ``settings`` default to the hand-set ones."""
    from wsi_ssl.pretrain import SlideSSL

    settings = settings or hand_set(args)
    params = dict(head=head, **settings, warmup_epochs=max(1, settings["epochs"] // 20),
                  seed=args.seed,
                  head_kwargs=json.loads(args.head_kwargs) if args.head_kwargs else {})
    model_dir = out / f"slide_model_{head}{tag}"
    if (model_dir / "config.json").is_file():
        model = SlideSSL.load(model_dir)
        saved = {**model.get_params(), "head_kwargs": model.head_kwargs or {}}
        if (all(saved[k] == v for k, v in params.items())
                and model.store_fingerprint_ == store.fingerprint
                and list(model.slide_ids_) == list(ids)):
            return model, float("nan")
    t = time.perf_counter()
    model = SlideSSL(**params, device="cpu", checkpoint_every=settings["epochs"],
                     checkpoint_dir=model_dir)
    model.fit(store, slide_ids=ids)
    fit_s = time.perf_counter() - t
    model.save(model_dir)
    return model, fit_s


def abmil_aucs(store, ids, y, args, out: Path) -> dict[str, float]:
    """Supervised ABMIL AUC for every subset, cached in OUT (keyed by split/n/repeat)."""
    from sklearn.metrics import roc_auc_score

    from wsi_ssl.mil import MILClassifier

    cache_path = out / "abmil_aucs.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    for split, n_lab, r, sub, test in subsets(y, args.splits, args.labels, args.repeats,
                                              args.seed):
        key = f"{args.seed}/{split}/{n_lab}/{r}"
        if key in cache:
            continue
        clf = MILClassifier("abmil", epochs=40, device="cpu", seed=r)
        clf.fit(store, y[sub], slide_ids=[ids[i] for i in sub])
        p = clf.predict_proba(store, slide_ids=[ids[i] for i in test])[:, 1]
        cache[key] = float(roc_auc_score(y[test], p))
        cache_path.write_text(json.dumps(cache, indent=1))
    return cache


def paired(a: list[float], b: list[float]) -> str:
    d = np.asarray(a) - np.asarray(b)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}], wins {np.mean(d > 0):.0%}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bench-slide-ssl", type=Path)
    ap.add_argument("--n-slides", type=int, default=128)
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--view-tiles", type=int, default=64)
    ap.add_argument("--tile-size", type=int, default=112)
    ap.add_argument("--heads", nargs="+", default=["sparseconv", "abmil"])
    ap.add_argument("--head-kwargs", default="",
                    help='JSON options of every head, e.g. \'{"pooling": "mean"}\'')
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--tiles-per-view", type=int, default=64)
    ap.add_argument("--splits", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--labels", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-abmil", action="store_true")
    ap.add_argument("--no-auto", action="store_true",
                    help="skip the `--preset auto` row (trained with the first --heads entry)")
    args = ap.parse_args(argv)
    from wsi_ssl.pretrain import mean_pool_embeddings

    args.out.mkdir(parents=True, exist_ok=True)
    cohort, store, embed_s = build(args.out, args.n_slides, args.seed, args.views,
                                   args.view_tiles, args.tile_size)
    labels = cohort.labels.set_index("slide_id")
    ids = [s for s in store.slide_ids if s in labels.index]
    y = labels.loc[ids, "label"].to_numpy().astype(int)

    feats = {"mean pool": mean_pool_embeddings(store, ids).embeddings}
    runs = {}
    for head in args.heads:
        model, fit_s = fit_slide_ssl(store, ids, head, args, args.out)
        emb = model.transform(store, ids, dtype="float16")
        feats[f"SlideSSL {head}"] = emb.embeddings.astype(np.float32)
        runs[head] = (model, fit_s, emb)
    if not args.no_auto:  # what `wsi-ssl pretrain-slides --preset auto` would train
        from wsi_ssl.pretrain import slide_ssl_preset

        preset = slide_ssl_preset("auto", n_slides=len(ids), bank_tiles=args.view_tiles,
                                  device="cpu")
        print(preset.describe())
        head = args.heads[0]
        if preset.settings() == hand_set(args) and head in runs:
            print(f"auto = the hand-set settings: the auto row is the {head!r} model")
            feats[f"auto ({head})"] = feats[f"SlideSSL {head}"]
        else:
            model, _ = fit_slide_ssl(store, ids, head, args, args.out, preset.settings(),
                                     tag="_auto")
            feats[f"auto ({head})"] = model.transform(store, ids, dtype="float16") \
                .embeddings.astype(np.float32)
    supervised = {} if args.skip_abmil else abmil_aucs(store, ids, y, args, args.out)

    auc: dict[str, dict[int, list[float]]] = {}
    for split, n_lab, r, sub, test in subsets(y, args.splits, args.labels, args.repeats,
                                              args.seed):
        for name, x in feats.items():
            auc.setdefault(name, {}).setdefault(n_lab, []).append(
                probe_auc(x[sub], y[sub], x[test], y[test]))
        if supervised:
            auc.setdefault("supervised ABMIL", {}).setdefault(n_lab, []).append(
                supervised[f"{args.seed}/{split}/{n_lab}/{r}"])

    n_test = len(next(subsets(y, 1, args.labels[:1], 1, args.seed))[4])
    print(f"\ncohort: {len(ids)} slides ({int(y.sum())} positive); {args.splits} held-out halves "
          f"of {n_test} slides x {args.repeats} labelled subsets; tile store embedded in "
          f"{embed_s:.0f} s (cached after the first run)")
    for head, (model, fit_s, emb) in runs.items():
        took = f"{fit_s:.0f} s" if fit_s == fit_s else "reloaded"
        hk = f", head_kwargs={args.head_kwargs}" if args.head_kwargs else ""
        print(f"SlideSSL({head!r}{hk}, epochs={args.epochs}, batch={args.batch_size}, lr={args.lr}, "
              f"T={args.temperature}, k={args.tiles_per_view}): {took}, "
              f"{model.train_views_per_s_:.0f} training views/s, loss {model.history_[0]:.3f} -> "
              f"{model.history_[-1]:.3f}; {emb.dim}-d {emb.embeddings.dtype} = "
              f"{emb.nbytes_per_slide:.0f} bytes per slide")
    names = list(auc)
    print("\nAUC on held-out slides (mean ± std over splits x subsets)\n")
    print("| labelled slides | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for n_lab in args.labels:
        cells = [f"{np.mean(auc[k][n_lab]):.3f} ± {np.std(auc[k][n_lab]):.3f}" for k in names]
        print(f"| {n_lab} | " + " | ".join(cells) + " |")
    print("\nPaired differences on identical subsets: mean [95 % interval], share of subsets won\n")
    for head in runs:
        a = auc[f"SlideSSL {head}"]
        for n_lab in args.labels:
            line = f"SlideSSL {head}, {n_lab} labels: vs mean pool {paired(a[n_lab], auc['mean pool'][n_lab])}"
            if supervised:
                line += f"; vs supervised ABMIL {paired(a[n_lab], auc['supervised ABMIL'][n_lab])}"
            print(line)
    (args.out / "bench_slide_ssl.json").write_text(json.dumps({
        "n_slides": len(ids), "args": {k: str(v) for k, v in vars(args).items()},
        "views_per_s": {h: r[0].train_views_per_s_ for h, r in runs.items()},
        "bytes_per_slide": {h: r[2].nbytes_per_slide for h, r in runs.items()},
        "auc": {k: {str(n): v for n, v in d.items()} for k, d in auc.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

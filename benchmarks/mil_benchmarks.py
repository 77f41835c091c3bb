"""The classic MIL benchmarks (Musk1, Musk2, Elephant) with wsi_ssl's MIL heads.

Reads a CSV without header (column 0 = instance label, column 1 = bag id, then the instance
features; the bag label is the max of its instance labels), runs 10-fold cross-validation repeated
``--repeats`` times (or the folds of ``--folds FOLDS.npy``: bool ``[repeats, folds, n_bags]``, True
= training bag, bags in ascending id order) and prints one line ``accuracy MEAN +- STD`` per head
(mean and std over all test folds). Hyper-parameters are fixed once for every data set (the
defaults below), never tuned on test folds; features are standardised with training-fold
statistics inside :class:`~wsi_ssl.mil.MILClassifier`.

    python benchmarks/mil_benchmarks.py --csv ../shared/data/mil/musk1.csv \\
        --folds ../shared/data/mil/musk1_folds_5x10.npy --head abmil gated_abmil mean

Reference (Ilse et al. 2018, Table 1, attention / gated attention MIL): Musk1 0.892 / 0.900,
Musk2 0.858 / 0.863, Elephant 0.868 / 0.857.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

#: fixed hyper-parameters, the same for every data set and head
DEFAULTS = dict(embed_dim=128, dropout=0.0, lr=5e-4, epochs=40, weight_decay=1e-4, batch_size=8,
                class_weight="balanced")


def load_mil_csv(path: str | Path) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Bags (ascending bag id), bag labels (max of instance labels) and bag ids of a MIL CSV."""
    data = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    if data.shape[1] < 3:
        raise SystemExit(f"{path}: expected label, bag id and features per row; got "
                         f"{data.shape[1]} columns.")
    labels, ids, feats = data[:, 0], data[:, 1], data[:, 2:].astype(np.float32)
    bag_ids = np.unique(ids)
    bags = [feats[ids == b] for b in bag_ids]
    y = np.array([int(labels[ids == b].max() > 0) for b in bag_ids])
    return bags, y, bag_ids


def make_folds(y: np.ndarray, repeats: int, n_folds: int = 10, seed: int = 0) -> np.ndarray:
    """Stratified ``[repeats, n_folds, n_bags]`` bool training masks."""
    from sklearn.model_selection import StratifiedKFold

    out = np.zeros((repeats, n_folds, len(y)), bool)
    for r in range(repeats):
        skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed + r)
        for f, (tr, _) in enumerate(skf.split(np.zeros(len(y)), y)):
            out[r, f, tr] = True
    return out


def run_benchmark(csv: str | Path, heads: list[str], *, folds: str | Path | np.ndarray | None = None,
                  repeats: int = 5, n_folds: int = 10, max_folds: int | None = None,
                  seed: int = 0, verbose: bool = False, **clf_kwargs) -> dict[str, np.ndarray]:
    """Per-head test-fold accuracies ``{head: (n_evaluated_folds,)}``.

    ``max_folds`` stops each repeat after that many folds (for quick checks); ``clf_kwargs``
    override :data:`DEFAULTS`.
    """
    from wsi_ssl.mil import MILClassifier

    bags, y, _ = load_mil_csv(csv)
    if folds is None:
        train_masks = make_folds(y, repeats, n_folds, seed)
    else:
        train_masks = np.load(folds) if not isinstance(folds, np.ndarray) else folds
        if train_masks.ndim != 3 or train_masks.shape[2] != len(bags):
            raise SystemExit(f"folds must be bool [repeats, folds, {len(bags)}]; got "
                             f"{train_masks.shape}.")
        train_masks = train_masks[:repeats]
    params = {**DEFAULTS, **clf_kwargs}
    acc: dict[str, list[float]] = {h: [] for h in heads}
    for r, rep in enumerate(train_masks):
        for f, tr in enumerate(rep[:max_folds]):
            tr_idx, te_idx = np.flatnonzero(tr), np.flatnonzero(~tr)
            for h in heads:
                clf = MILClassifier(head=h, seed=seed + 100 * r + f, **params)
                clf.fit([bags[i] for i in tr_idx], y[tr_idx])
                pred = clf.predict([bags[i] for i in te_idx])
                acc[h].append(float((pred == y[te_idx]).mean()))
                if verbose:
                    print(f"  repeat {r} fold {f} {h:12s} accuracy {acc[h][-1]:.3f}", flush=True)
    return {h: np.array(v) for h, v in acc.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--csv", required=True, help="MIL CSV: label, bag id, features (no header)")
    p.add_argument("--folds", default=None, help="bool [repeats, folds, n_bags] .npy, True=train")
    p.add_argument("--head", nargs="+", default=["abmil", "gated_abmil", "mean"],
                   help="one or more heads from wsi_ssl.mil.list_heads()")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--folds-per-repeat", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print every fold")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = run_benchmark(args.csv, args.head, folds=args.folds, repeats=args.repeats,
                        n_folds=args.folds_per_repeat, seed=args.seed,
                        verbose=args.verbose)
    name = Path(args.csv).stem
    print(f"# {name}: {len(next(iter(res.values())))} test folds, params {DEFAULTS}, "
          f"{time.perf_counter() - t0:.0f} s")
    for h, a in res.items():
        print(f"{name:10s} {h:12s} accuracy {a.mean():.3f} +- {a.std():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

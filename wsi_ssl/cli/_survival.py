"""``wsi-ssl survival``: cross-validated Cox models of survival on slide embeddings."""

from __future__ import annotations

import argparse

HELP = "cross-validated Cox survival on slide embeddings (C-index, KM, log-rank) -> JSON + PNG"
DESCRIPTION = (
    "Standardise + PCA (fit per fold) + lifelines CoxPHFitter (L2) on slide embeddings (.npz, or "
    "any CSV/parquet table of ids + numbers), folds grouped by patient. Writes survival.json, "
    "survival.png (Kaplan-Meier of out-of-fold risk groups), survival.csv and survival_risk.csv."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("embeddings", help="slide embeddings: .npz (ours), .csv, .tsv or .parquet")
    p.add_argument("clinical", help="clinical table (.csv/.tsv/.parquet): id, time, event")
    p.add_argument("--id-col", default="slide_id", help="column of the clinical table with ids")
    p.add_argument("--time-col", default="time", help="follow-up time column (>= 0)")
    p.add_argument("--event-col", default="event", help="event column (1 = event, 0 = censored)")
    p.add_argument("--patient-col", default="patient_id",
                   help="column with patient ids, if present (else TCGA barcode prefix)")
    p.add_argument("--embedding-id-col", default=None,
                   help="id column of a CSV/parquet embedding table (default: the first column)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--penalizer", default="cv", help="'cv' (inner CV) or an L2 penalty")
    p.add_argument("--n-components", default="auto", help="PCA components or 'auto'")
    p.add_argument("--no-groups", action="store_true",
                   help="treat slides as independent (no patient grouping)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CI")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="report folder (created)")


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.errors import ConfigError
    from wsi_ssl.eval import survival

    try:
        pen: str | float = "cv" if args.penalizer == "cv" else float(args.penalizer)
        k: str | int = "auto" if args.n_components == "auto" else int(args.n_components)
    except ValueError as err:
        raise ConfigError(
            f"--penalizer {args.penalizer!r} / --n-components {args.n_components!r}: use 'cv' or "
            "a number / 'auto' or an integer."
        ) from err
    report = survival(
        args.embeddings, args.clinical, time=args.time_col, event=args.event_col,
        id_col=args.id_col, patient_col=args.patient_col, folds=args.folds, penalizer=pen,
        n_components=k, groups=None if args.no_groups else "patient",
        n_bootstrap=args.bootstrap, seed=args.seed, embedding_id_col=args.embedding_id_col,
    )
    paths = report.save(args.out)
    print(report.to_frame().to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(report.summary)
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0

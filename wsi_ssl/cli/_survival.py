"""``wsi-ssl survival``: cross-validated penalised Cox models of survival on slide embeddings."""

from __future__ import annotations

import argparse

from wsi_ssl.errors import ConfigError

HELP = "cross-validated Cox survival on slide embeddings (C-index, KM, log-rank) -> JSON + PNG"
DESCRIPTION = (
    "Standardise + elastic-net Cox (scikit-survival coxnet; penalty and l1_ratio chosen by inner "
    "patient-grouped CV) on slide embeddings (.npz, or any CSV/parquet table of ids + numbers), "
    "outer folds grouped by patient. Writes survival.json, survival.png (Kaplan-Meier of "
    "out-of-fold risk groups), survival.csv and survival_risk.csv. SurvPath/CLAM tables: "
    "--id-col slide_id --patient-col case_id --time-col survival_months --censor-col censorship."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("embeddings", help="slide embeddings: .npz (ours), .csv, .tsv or .parquet")
    p.add_argument("clinical", help="clinical table (.csv/.tsv/.parquet): id, time, event")
    p.add_argument("--id-col", default="slide_id",
                   help="column of the clinical table with slide ids (a slide file extension "
                        "such as .svs is matched to the embeddings' stems)")
    p.add_argument("--time-col", default="time", help="follow-up time column (>= 0)")
    flag = p.add_mutually_exclusive_group()
    flag.add_argument("--event-col", default=None,
                      help="event column, 1 = event, 0 = censored (default: 'event')")
    flag.add_argument("--censor-col", default=None,
                      help="censoring column instead, 1 = censored (e.g. 'censorship')")
    p.add_argument("--patient-col", default="patient_id",
                   help="column with patient ids, if present (else TCGA barcode prefix)")
    p.add_argument("--level", choices=("slide", "patient"), default="slide",
                   help="one row per slide, or per patient (mean of its slide embeddings)")
    p.add_argument("--embedding-id-col", default=None,
                   help="id column of a CSV/parquet embedding table (default: the first column)")
    p.add_argument("--feature-cols", nargs="+", default=None, metavar="COL",
                   help="feature columns of a CSV/parquet embedding table (default: every "
                        "numeric column but the id)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--alpha", default="cv", help="'cv' (inner CV) or a fixed coxnet penalty")
    p.add_argument("--l1-ratio", type=float, nargs="+", default=None,
                   help="elastic-net mixing value(s) searched (default 0.1 0.5 0.9; 1 = lasso)")
    p.add_argument("--n-components", type=int, default=None,
                   help="PCA components fitted per fold before the Cox model (default: none)")
    p.add_argument("--no-groups", action="store_true",
                   help="treat slides as independent (no patient grouping)")
    p.add_argument("--repeats", type=int, default=1,
                   help="repeats of the outer k-fold CV with different shuffles")
    p.add_argument("--bootstrap", type=int, default=50,
                   help="patient resamples, each refitted, for the 95%% CI (0 = no CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="report folder (created)")


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.eval import survival  # lazy: keeps wsi-ssl --help light

    try:
        alpha: str | float = "cv" if args.alpha == "cv" else float(args.alpha)
    except ValueError as err:
        raise ConfigError(f"--alpha {args.alpha!r}: use 'cv' or a number > 0.") from err
    report = survival(
        args.embeddings, args.clinical, time=args.time_col, event=args.event_col,
        censor_col=args.censor_col, id_col=args.id_col, patient_col=args.patient_col,
        level=args.level, folds=args.folds, alpha=alpha,
        n_components=args.n_components, groups=None if args.no_groups else "patient",
        n_bootstrap=args.bootstrap, seed=args.seed, embedding_id_col=args.embedding_id_col,
        feature_cols=args.feature_cols, repeats=args.repeats,
        **({"l1_ratio": tuple(args.l1_ratio)} if args.l1_ratio else {}),
    )
    paths = report.save(args.out)
    print(report.to_frame().to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(report.summary)
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0

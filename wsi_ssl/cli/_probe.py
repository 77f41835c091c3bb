"""``wsi-ssl probe``: few-shot and k-fold linear probes of slide embeddings against labels."""

from __future__ import annotations

import argparse

from wsi_ssl.errors import ConfigError

HELP = "few-shot + k-fold linear probes of slide embeddings (AUC, 95% CI) -> JSON + PNG"
DESCRIPTION = (
    "Standardise + balanced logistic regression on slide embeddings (.npz, or any CSV/parquet "
    "table of ids + numbers), few-shot subsets scored on random held-out sides and k-fold CV, "
    "splits grouped by patient, 95 % intervals from a patient bootstrap that refits. Writes "
    "probe.json, probe.png, probe.csv and probe_predictions.csv into --out. The Giga-SSL protocol is --C 10 --no-groups --n-labeled."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("embeddings", help="slide embeddings: .npz (ours), .csv, .tsv or .parquet")
    p.add_argument("labels", help="label table (.csv/.tsv/.parquet) with an id and a label column")
    p.add_argument("--label-col", default="label", help="column of the labels table with classes")
    p.add_argument("--id-col", default="slide_id", help="column of the labels table with slide ids")
    p.add_argument("--patient-col", default="patient_id",
                   help="column with patient ids, if present (else TCGA barcode prefix)")
    p.add_argument("--embedding-id-col", default=None,
                   help="id column of a CSV/parquet embedding table (default: the first column)")
    p.add_argument("--feature-cols", nargs="+", default=None, metavar="COL",
                   help="feature columns of a CSV/parquet embedding table (default: every "
                        "numeric column but the id)")
    p.add_argument("--level", choices=("slide", "patient"), default="slide",
                   help="one row per slide, or per patient (mean of its slide embeddings)")
    p.add_argument("--n-labeled", nargs="*", default=["25", "50", "100", "all"],
                   help="few-shot sizes; 'all' = the whole training side; none = CV only")
    p.add_argument("--repeats", type=int, default=10,
                   help="random held-out splits (each with its own labelled subset) per size")
    p.add_argument("--test-size", type=float, default=0.25, help="held-out fraction of patients")
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold CV (0 = no CV)")
    p.add_argument("--cv-repeats", type=int, default=1,
                   help="repeats of the k-fold CV with different shuffles")
    p.add_argument("--C", default="cv", help="'cv' (inner CV) or a number, e.g. 10")
    p.add_argument("--no-groups", action="store_true",
                   help="treat slides as independent (no patient grouping)")
    p.add_argument("--bootstrap", type=int, default=50,
                   help="patient resamples, each refitted, for the 95%% CIs (0 = no CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="report folder (created)")


def _sizes(values: list[str]) -> tuple[int | None, ...]:
    out: list[int | None] = []
    for v in values:
        if v.lower() in ("all", "none"):
            out.append(None)
            continue
        try:
            out.append(int(v))
        except ValueError as err:
            raise ConfigError(f"--n-labeled {v!r} is not an integer or 'all'.") from err
    return tuple(out)


def c_value(text: str) -> str | float:
    """``--C``: ``"cv"`` (inner cross-validated search) or a positive number."""
    if text == "cv":
        return "cv"
    try:
        return float(text)
    except ValueError as err:
        raise ConfigError(f"--C {text!r} must be 'cv' or a positive number.") from err


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.eval import linear_probe  # lazy: keeps wsi-ssl --help light

    report = linear_probe(
        args.embeddings, args.labels, label_col=args.label_col, id_col=args.id_col,
        patient_col=args.patient_col, embedding_id_col=args.embedding_id_col,
        n_labeled=_sizes(args.n_labeled), repeats=args.repeats, test_size=args.test_size,
        folds=args.folds or None, C=c_value(args.C), groups=None if args.no_groups else "patient",
        n_bootstrap=args.bootstrap, seed=args.seed, level=args.level,
        feature_cols=args.feature_cols, cv_repeats=args.cv_repeats,
    )
    paths = report.save(args.out)
    cols = ["name", "runs", "auc_mean", "auc_std", "auc_ci_low", "auc_ci_high", "bacc_mean", "C"]
    print(f"{report.n_slides} slides, {report.n_patients} patients, level {report.level} "
          f"({report.n_rows} rows), classes {list(report.classes)}")
    print(report.to_frame()[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"95% CI: {report.interval_method}")
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0

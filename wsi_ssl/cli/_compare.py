"""``wsi-ssl compare``: several slide-embedding files of the same slides side by side, with
paired differences on the same splits."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_ssl.cli._probe import _sizes, c_value
from wsi_ssl.errors import ConfigError

HELP = "compare slide-embedding files on one table (probe AUC, C-index, paired 95% CI) -> CSV/MD/PNG"
DESCRIPTION = (
    "Runs the same few-shot and k-fold linear probes (and, with --time-col, the same penalised "
    "Cox model) on every embedding file, on the same patient-grouped splits and bootstrap "
    "resamples, and reports each file's AUC / C-index and each pair's difference with a 95 % "
    "interval from a patient bootstrap that refits. Slides missing from some files are left "
    "out (warned, counted). Name a file with name=path (default: the file stem). Writes "
    "compare.csv, compare.md, compare.png, compare.json and compare.html into --out."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("embeddings", nargs="+", metavar="[NAME=]FILE",
                   help="two or more slide-embedding files (.npz, .csv, .tsv, .parquet), "
                        "optionally named NAME=FILE")
    p.add_argument("--labels", required=True,
                   help="label / clinical table (.csv/.tsv/.parquet) with the slide ids")
    p.add_argument("--label-col", default="label",
                   help="class column of the probe ('none': survival only)")
    p.add_argument("--id-col", default="slide_id", help="column with slide ids")
    p.add_argument("--patient-col", default="patient_id",
                   help="column with patient ids, if present (else TCGA barcode prefix)")
    p.add_argument("--time-col", default=None, help="follow-up time column: adds survival")
    flag = p.add_mutually_exclusive_group()
    flag.add_argument("--event-col", default=None,
                      help="event column, 1 = event (default: 'event')")
    flag.add_argument("--censor-col", default=None,
                      help="censoring column instead, 1 = censored (e.g. 'censorship')")
    p.add_argument("--level", choices=("slide", "patient"), default="slide",
                   help="one row per slide, or per patient (mean of its slide embeddings)")
    p.add_argument("--n-labeled", nargs="*", default=["25", "50", "100", "all"],
                   help="few-shot sizes; 'all' = the whole training side; none = CV only")
    p.add_argument("--repeats", type=int, default=10, help="few-shot splits per size")
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold CV")
    p.add_argument("--cv-repeats", type=int, default=1, help="repeats of the k-fold CV")
    p.add_argument("--C", default="cv", help="'cv' (inner CV) or a number, e.g. 10")
    p.add_argument("--no-groups", action="store_true",
                   help="treat slides as independent (no patient grouping)")
    p.add_argument("--bootstrap", type=int, default=50,
                   help="patient resamples (each refitted) for the 95%% intervals; 0 = none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="report folder (created)")


def _files(values: list[str]) -> dict[str, str]:

    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or Path(v).exists():
            name, path = Path(v).stem, v
        if name in out:
            raise ConfigError(f"two embedding files are named {name!r}; name them: "
                              f"a={out[name]} b={path}.")
        out[name] = path
    return out


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.eval import compare_embeddings  # lazy: keeps wsi-ssl --help light

    report = compare_embeddings(
        _files(args.embeddings), args.labels,
        label_col=None if args.label_col.lower() == "none" else args.label_col,
        time=args.time_col, event=args.event_col, censor_col=args.censor_col,
        id_col=args.id_col, patient_col=args.patient_col, level=args.level,
        n_labeled=_sizes(args.n_labeled), repeats=args.repeats, folds=args.folds or None,
        cv_repeats=args.cv_repeats, C=c_value(args.C), groups=None if args.no_groups else "patient",
        n_bootstrap=args.bootstrap, seed=args.seed,
    )
    paths = report.save(args.out)
    print(report.to_markdown())
    print(f"wrote {paths['csv']}, {paths['md']}, {paths['png']} and {paths['html']}")
    return 0

"""``wsi-ssl similar``: the slides most like a query slide (cosine over slide embeddings)."""

from __future__ import annotations

import argparse

HELP = "nearest slides of query slides by cosine similarity of slide embeddings"
DESCRIPTION = (
    "Cosine nearest neighbours over slide embeddings (.npz, or a CSV/parquet table of ids + "
    "numbers). Slides of the query's patient are left out (TCGA barcode, or --patients TABLE "
    "with slide_id and patient_id columns) unless --include-same-patient."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("embeddings", metavar="EMB", help="slide embeddings (.npz, .csv, .parquet)")
    p.add_argument("--query", nargs="+", required=True, metavar="ID", help="query slide id(s)")
    p.add_argument("--k", type=int, default=5, help="neighbours per query")
    p.add_argument("--patients", default=None, metavar="TABLE",
                   help="table with slide ids and patient ids (e.g. labels.csv)")
    p.add_argument("--id-col", default="slide_id", help="slide id column of --patients")
    p.add_argument("--patient-col", default="patient_id", help="patient column of --patients")
    p.add_argument("--include-same-patient", action="store_true",
                   help="also return slides of the query's patient")
    p.add_argument("--out", default=None, metavar="FILE.csv", help="also write the table here")


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.eval import similar  # lazy: keeps wsi-ssl --help light

    res = similar(args.embeddings, args.query, args.k, patients=args.patients,
                  id_col=args.id_col, patient_col=args.patient_col,
                  exclude_same_patient=not args.include_same_patient)
    df = res.to_frame()
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        df.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    return 0

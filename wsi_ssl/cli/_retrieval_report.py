"""``wsi-ssl retrieval-report``: how well slide embeddings retrieve slides of the same label."""

from __future__ import annotations

import argparse

HELP = "majority-vote accuracy @1/3/5 and mAP@5 of slide retrieval (patient-excluded, 95% CI)"
DESCRIPTION = (
    "Every labelled slide queries all the others by cosine similarity, its own patient's slides "
    "left out; reports majority-vote accuracy at top-k and mAP@5 with patient-bootstrap 95% "
    "intervals. Writes retrieval.json, retrieval.png, retrieval.csv and "
    "retrieval_queries.csv into --out."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("embeddings", metavar="EMB", help="slide embeddings (.npz, .csv, .parquet)")
    p.add_argument("labels", metavar="LABELS", help="label table (.csv/.tsv/.parquet)")
    p.add_argument("--label-col", default="label", help="column of the labels table with classes")
    p.add_argument("--id-col", default="slide_id", help="column of the labels table with slide ids")
    p.add_argument("--patient-col", default="patient_id",
                   help="column with patient ids, if present (else TCGA barcode prefix)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 5],
                   help="k of the majority-vote accuracies")
    p.add_argument("--map-k", type=int, default=5, help="cut-off of the mean average precision")
    p.add_argument("--include-same-patient", action="store_true",
                   help="let a query retrieve slides of its own patient")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (created)")


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.eval import retrieval_report  # lazy: keeps wsi-ssl --help light

    rep = retrieval_report(args.embeddings, args.labels, label_col=args.label_col,
                           id_col=args.id_col, patient_col=args.patient_col, ks=args.k,
                           map_k=args.map_k, exclude_same_patient=not args.include_same_patient,
                           n_bootstrap=args.bootstrap, seed=args.seed)
    print(f"{rep.n_slides} query slides, {rep.n_patients} patients, classes {list(rep.classes)}; "
          f"majority-class accuracy {rep.chance:.3f}")
    print(rep.to_frame().to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        paths = rep.save(args.out)
        print(f"wrote {paths['json']} and {paths['png']}")
    return 0

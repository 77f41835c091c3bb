"""``wsi-ssl demo``: the whole pipeline on a generated cohort."""

from __future__ import annotations

import argparse
from dataclasses import replace

HELP = "run the whole pipeline on a generated cohort (CPU, minutes, no network)"
DESCRIPTION = (
    "Generate a cohort of pyramidal TIFF slides, tile and embed them into a zarr store with an "
    "augmentation bank, pretrain a slide encoder (Giga-SSL), encode the slides, and evaluate "
    "few-shot linear probes and a survival model. Writes DIR/report.html. A rerun reuses "
    "finished steps."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="wsi-ssl-demo", help="output folder")
    p.add_argument("--slides", type=int, default=48, help="number of generated slides")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--slide-epochs", type=int, default=None,
                   help="slide-SSL epochs (default: the demo's setting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a one-minute smoke run of every step (10 slides, 3 epochs, CPU): "
                        "checks the install, not the method")


def run(args: argparse.Namespace) -> int:

    from wsi_ssl.demo import QUICK, DemoConfig, run_demo, summary_table  # lazy: torch

    if args.quick:
        cfg = replace(QUICK, seed=args.seed)
    else:
        cfg = DemoConfig(n_slides=args.slides, device=args.device, seed=args.seed)
    if args.slide_epochs is not None:
        cfg = replace(cfg, slide_epochs=args.slide_epochs)
    result = run_demo(args.out, cfg, say=print)
    print()
    print(summary_table(result.summary))
    print(f"\nTotal {sum(result.seconds.values()):.0f} s. Open {result.report_html} to see the pictures.")
    return 0

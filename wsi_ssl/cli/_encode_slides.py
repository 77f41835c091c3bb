"""``wsi-ssl encode-slides``: compact slide embeddings from a trained SlideSSL model."""

from __future__ import annotations

import argparse

HELP = "embed every slide of a tile store with a trained slide encoder into SLIDES.npz"
DESCRIPTION = (
    "Slide embeddings (mean over k-tile chunks of the clean tile features, L2-normalised) from a "
    "model trained by `wsi-ssl pretrain-slides`, written as .npz (ids, embeddings, provenance)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE", help="tile store (zarr) from the training encoder")
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="trained model directory")
    p.add_argument("--out", required=True, metavar="SLIDES.npz", help="output embeddings file")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--device", default=None, help="override the model's device (auto, cpu, cuda)")


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.pretrain import encode_slides

    res = encode_slides(args.store, args.model, args.out, dtype=args.dtype, device=args.device)
    emb, path = res.embeddings, res.path
    skipped = emb.provenance.get("skipped", [])
    print(f"{'slides':>8} {'dim':>5} {'dtype':>8} {'bytes/slide':>12} {'skipped':>8}")
    print(f"{len(emb):>8} {emb.dim:>5} {str(emb.embeddings.dtype):>8} "
          f"{emb.nbytes_per_slide:>12.0f} {len(skipped):>8}")
    if skipped:
        print("skipped (no tiles): " + ", ".join(skipped[:20]))
    print(f"embeddings written to {path}")
    return 0

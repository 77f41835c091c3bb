"""``wsi-ssl encode-slides``: slide embeddings from a trained SlideSSL model (``--model``) or a
published slide foundation model (``--slide-encoder titan|gigapath-slide|prism|feather|...``)."""

from __future__ import annotations

import argparse

from wsi_ssl.errors import ConfigError

HELP = "embed every slide of a tile store with a slide encoder into SLIDES.npz"
DESCRIPTION = (
    "Slide embeddings written as .npz (ids, embeddings, provenance). With --model: a SlideSSL "
    "model trained by `wsi-ssl pretrain-slides` (mean over k-tile chunks of the clean tile "
    "features, L2-normalised). With --slide-encoder: a published slide foundation model "
    "(`wsi-ssl encoders --slide` lists them) with local weights (--weights FILE or the folder of "
    "`huggingface-cli download REPO --local-dir DIR`; default: the local Hugging Face cache); the "
    "store's tiles must be the ones the model needs (tile encoder, µm/px, tile size), else the "
    "command says how to make them (--force encodes anyway, recorded in the output)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE", help="tile store (zarr)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="MODEL_DIR", help="trained SlideSSL model directory")
    which.add_argument("--slide-encoder", metavar="NAME",
                       help="slide foundation model preset (wsi-ssl encoders --slide)")
    p.add_argument("--out", required=True, metavar="SLIDES.npz", help="output embeddings file")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="--slide-encoder: weights file or --local-dir folder; when omitted, the "
                   "local Hugging Face cache")
    p.add_argument("--random-weights", action="store_true",
                   help="--slide-encoder: random weights (an architecture baseline, no "
                   "pretraining; recorded as such)")
    p.add_argument("--force", action="store_true",
                   help="--slide-encoder: encode even if the store's tiles are not the ones the "
                   "model needs (warning recorded in the output)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="--slide-encoder: slides per forward pass where padding is exact")
    p.add_argument("--dtype", choices=("float16", "float32"), default=None,
                   help="storage dtype; float16 for --model and float32 for --slide-encoder "
                   "when omitted")
    p.add_argument("--device", default=None, help="device (auto, cpu, cuda)")


def _summary(emb, path) -> None:
    skipped = emb.provenance.get("skipped", [])
    print(f"{'slides':>8} {'dim':>5} {'dtype':>8} {'bytes/slide':>12} {'skipped':>8}")
    print(f"{len(emb):>8} {emb.dim:>5} {str(emb.embeddings.dtype):>8} "
          f"{emb.nbytes_per_slide:>12.0f} {len(skipped):>8}")
    if skipped:
        print("skipped (no tiles): " + ", ".join(skipped[:20]))
    print(f"embeddings written to {path}")


def run(args: argparse.Namespace) -> int:
    if args.model is not None:
        if args.weights or args.random_weights or args.force:
            raise ConfigError("--weights, --random-weights and --force go with --slide-encoder, "
                              "not --model.")
        from wsi_ssl.pretrain import encode_slides  # lazy: torch; keeps wsi-ssl --help light

        res = encode_slides(args.store, args.model, args.out, dtype=args.dtype or "float16",
                            device=args.device)
        _summary(res.embeddings, res.path)
        return 0
    from wsi_ssl.encoders.slide import encode_store  # lazy: torch; keeps wsi-ssl --help light

    res = encode_store(args.store, args.slide_encoder, weights=args.weights, out=args.out,
                       force=args.force, batch_size=args.batch_size,
                       dtype=args.dtype or "float32", device=args.device or "auto",
                       random_weights=args.random_weights)
    for w in res.warnings:
        print(f"WARNING {w}")
    if res.embeddings.provenance["slide_encoder"]["random_weights"]:
        print(f"NOTE {args.slide_encoder} with RANDOM weights: an architecture baseline, not the "
              "pretrained model")
    _summary(res.embeddings, res.path)
    return 0

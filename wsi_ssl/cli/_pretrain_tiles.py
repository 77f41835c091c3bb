"""``wsi-ssl pretrain-tiles``: self-supervised pretraining of a tile encoder on your slides."""

from __future__ import annotations

import argparse

HELP = "pretrain a tile encoder (SimCLR/BYOL) on tiles streamed from unlabeled slides"
DESCRIPTION = (
    "Pretrain a timm backbone with SimCLR or BYOL on random tissue tiles streamed from SLIDES "
    "(no tile extraction to disk). Checkpoints every epoch next to --out; rerunning the same "
    "command resumes. The output loads with create_encoder(ARCH, weights=OUT) / wsi-ssl embed."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", nargs="+", help="slide files, folders or glob patterns")
    p.add_argument("--out", required=True, help="output weights file (.safetensors)")
    p.add_argument("--arch", default="resnet18", help="timm architecture or registered encoder")
    p.add_argument("--method", default="simclr", choices=["simclr", "byol"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--tiles-per-epoch", type=int, default=10_000)
    p.add_argument("--tile-size", type=int, default=224, help="tile edge (px) at --mpp")
    p.add_argument("--mpp", type=float, default=0.5, help="resolution in µm/px")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--augment", default="histo", help="augmentation preset (histo, none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers (default: cores - 1, at most 8)")
    p.add_argument("--assume-mpp", type=float, default=None,
                   help="µm/px for slides without it in their metadata")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue from the last checkpoint when there is one (default)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="discard existing checkpoints and start over")


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.pretrain import TileSSLConfig, pretrain_tile_encoder  # lazy: torch, timm

    cfg = TileSSLConfig(
        arch=args.arch, method=args.method, tile_size=args.tile_size, mpp=args.mpp,
        epochs=args.epochs, tiles_per_epoch=args.tiles_per_epoch, batch_size=args.batch_size,
        lr=args.lr, device=args.device, num_workers=args.num_workers, augment=args.augment,
        seed=args.seed, assume_mpp=args.assume_mpp,
    )
    res = pretrain_tile_encoder(args.slides, cfg, out=args.out, resume=args.resume)
    print(f"{'epoch':>5}  {'loss':>8}")
    for i, loss in enumerate(res.losses, 1):
        mark = "  (resumed)" if i == res.resumed_from and res.resumed_from else ""
        print(f"{i:>5}  {loss:>8.4f}{mark}")
    print(f"arch {res.config.arch}, method {res.config.method}, {res.n_slides} slides, "
          f"device {res.device}, {res.tiles_per_s:.1f} tiles/s")
    print(f"weights: {res.weights}")
    print(f"checkpoints: {res.checkpoint_dir}")
    return 0

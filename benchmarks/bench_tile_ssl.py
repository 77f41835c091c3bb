"""Tile-level SSL: does pretraining on your own slides help, and does the data pipeline keep up?

Pretrains ``--arch`` with ``--method`` on tiles streamed from the real H&E slides in
``../shared/data/slides`` (CMU-1-Small-Region and the TCGA frozen section, the latter at an
assumed 0.5 µm/px), then compares the pretrained encoder with the **same architecture at random
init** on two labelled tasks built from real data:

* ``nct-crc``: the 9 tissue classes of NCT-CRC-HE-100K (one real 224 px tile per class, Kather
  et al. 2018, CC-BY-4.0). Crops from the left half of each tile (augmented: flips, rotations,
  stain and colour jitter) are the training set, crops from the right half the test set, so no
  test pixel is seen in training; the CRC-VAL-HE-7K NORM tile is added to the test set.
* ``tissue-vs-bg``: tissue (>= 80 % tissue) vs background (<= 5 %) tiles of the tile grids,
  trained on one slide and tested on the other (cross-slide).

Both are scored by k-NN (k=5, cosine) and a logistic-regression linear probe on frozen features.
Then training throughput: tiles/s of the full loop (slide reads, augmentation, model) against the
model alone on a pre-made batch (same step: forward, backward, optimiser).

Run: ``python benchmarks/bench_tile_ssl.py`` (a few minutes on 2 CPU cores);
``--arch resnet50 --tile-size 224 --epochs 20 --tiles-per-epoch 20000`` on a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    env = os.environ.get("WSI_SSL_TEST_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def nct_crc_sets(size: int, crops_per_tile: int, seed: int):
    """(x_train, y_train, x_test, y_test, class names): uint8 (N, 3, size, size) crops."""
    import torch
    from PIL import Image

    from wsi_ssl.augment import AugmentConfig, random_augment

    folder = data_dir() / "tiles" / "nct_crc_he_100k"
    files = sorted(folder.glob("*.tif"))
    cfg = AugmentConfig(crop_scale=(0.6, 1.0), blur_prob=0.0, grayscale=0.0)
    rng = np.random.default_rng(seed)
    classes = sorted({f.name.split("-")[0] for f in files if not f.name.startswith("CRC-VAL")})
    xs = {"train": [], "test": []}
    ys = {"train": [], "test": []}
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB").resize((224, 224)))
        t = torch.from_numpy(img.copy()).permute(2, 0, 1)[None]
        if f.name.startswith("CRC-VAL"):
            label, halves = classes.index(f.name.split("-")[4]), {"test": t[..., :, :]}
        else:
            label = classes.index(f.name.split("-")[0])
            halves = {"train": t[..., :, :112], "test": t[..., :, 112:]}
        for split, half in halves.items():
            # crop a square of ~100 px inside the half, then augment
            out = []
            for _ in range(crops_per_tile):
                h, w = half.shape[-2:]
                c = min(h, w, 100)
                y0, x0 = rng.integers(0, h - c + 1), rng.integers(0, w - c + 1)
                out.append(half[..., y0:y0 + c, x0:x0 + c])
            base = torch.cat(out)
            aug = random_augment(base, rng, cfg, out_size=size)
            xs[split].append((aug * 255).round().to(torch.uint8))
            ys[split] += [label] * crops_per_tile
    return (torch.cat(xs["train"]), np.array(ys["train"]), torch.cat(xs["test"]),
            np.array(ys["test"]), classes)


def tissue_bg_sets(slides: list[Path], size: int, mpp: float, n_per_class: int, seed: int):
    """Tissue vs background tiles: train on slides[0], test on slides[1]."""
    import torch

    from wsi_ssl.tiling import detect_tissue, open_slide, read_tiles, tile_grid

    rng = np.random.default_rng(seed)
    sets = []
    for path in slides[:2]:
        with open_slide(path, slide_mpp=None if "cmu" in path.name else 0.5) as s:
            grid = tile_grid(s, mpp=mpp, tile_size=size, min_tissue=0.0,
                             tissue=detect_tissue(s))
            frac = grid.tissue_fraction
            tis, bg = np.nonzero(frac >= 0.8)[0], np.nonzero(frac <= 0.05)[0]
            k = min(n_per_class, len(tis), len(bg))
            idx = np.concatenate([rng.choice(tis, k, replace=False),
                                  rng.choice(bg, k, replace=False)])
            tiles, got = [], []
            for b in read_tiles(s, grid, indices=idx, read_threads=1):
                tiles.append(b.tiles)
                got.append(b.indices)
            tiles, got = np.concatenate(tiles), np.concatenate(got)
            y = (frac[got] >= 0.8).astype(int)
            sets.append((torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous(), y))
    return sets[0][0], sets[0][1], sets[1][0], sets[1][1]


def scores(enc, x_tr, y_tr, x_te, y_te) -> tuple[float, float]:
    """(k-NN accuracy, linear-probe accuracy) of frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def feats(x):
        return np.concatenate([enc.embed(x[i:i + 64].float() / 255).numpy()
                               for i in range(0, len(x), 64)])

    f_tr, f_te = feats(x_tr), feats(x_te)
    knn = KNeighborsClassifier(n_neighbors=5, metric="cosine").fit(f_tr, y_tr)
    lin = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    lin.fit(f_tr, y_tr)
    return float(knn.score(f_te, y_te)), float(lin.score(f_te, y_te))


def model_alone_throughput(args, n_steps: int) -> float:
    """Tiles/s of forward + backward + AdamW step on one pre-made pair of views."""
    import torch

    from wsi_ssl.encoders import resolve_device
    from wsi_ssl.pretrain import TileSSLConfig, build_tile_ssl_method

    dev = resolve_device(args.device)
    cfg = TileSSLConfig(arch=args.arch, method=args.method, tile_size=args.tile_size,
                        hidden_dim=args.hidden_dim, batch_size=args.batch_size)
    method, _, _ = build_tile_ssl_method(cfg)
    method.to(dev).train()
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(args.batch_size, 3, args.tile_size, args.tile_size, device=dev)
    use_amp = dev.type == "cuda"
    amp = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16

    def step(i):
        with torch.autocast(dev.type, dtype=amp, enabled=use_amp):
            loss = method(x, x.flip(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(i, n_steps)

    for i in range(2):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n_steps):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return n_steps * args.batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--method", default="simclr", choices=["simclr", "byol"])
    p.add_argument("--tile-size", type=int, default=64)
    p.add_argument("--mpp", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--tiles-per-epoch", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--crops-per-tile", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="keep the weights here (default: temp dir)")
    args = p.parse_args(argv)

    from wsi_ssl.encoders import create_encoder
    from wsi_ssl.pretrain import TileSSLConfig, pretrain_tile_encoder

    slides = [data_dir() / "slides" / "cmu-1-small-region.svs",
              data_dir() / "slides" / "tcga-cr-7395-01a-01-ts1.svs"]
    tmp = Path(args.out_dir or tempfile.mkdtemp(prefix="bench-tile-ssl-"))
    out = tmp / f"{args.arch}-{args.method}.safetensors"
    print(f"# tile SSL benchmark: {args.arch} {args.method}, {args.tile_size} px at {args.mpp} "
          f"µm/px, {args.epochs} x {args.tiles_per_epoch} tiles, batch {args.batch_size}")
    t0 = time.perf_counter()
    cfg = TileSSLConfig(
        arch=args.arch, method=args.method, tile_size=args.tile_size, mpp=args.mpp,
        epochs=args.epochs, tiles_per_epoch=args.tiles_per_epoch, batch_size=args.batch_size,
        lr=args.lr, device=args.device, num_workers=args.num_workers, seed=args.seed,
        hidden_dim=args.hidden_dim, assume_mpp=0.5,
    )
    res = pretrain_tile_encoder(slides, cfg, out=out, resume=False)
    print(f"pretraining: {time.perf_counter() - t0:.0f} s on {res.device}, loss per epoch "
          + " ".join(f"{v:.3f}" for v in res.losses))

    kw = dict(device=args.device, input_size=args.tile_size)
    encoders = {"random init": create_encoder(args.arch, **kw),
                "tile-SSL": create_encoder(args.arch, weights=out, **kw)}
    tasks = {
        "nct-crc (9 classes)": nct_crc_sets(args.tile_size, args.crops_per_tile, args.seed),
        "tissue-vs-bg (cross-slide)": tissue_bg_sets(slides, args.tile_size, args.mpp, 120,
                                                     args.seed),
    }
    print("\n| task | n train / test | encoder | k-NN acc | linear acc |")
    print("|---|---|---|---|---|")
    for task, data in tasks.items():
        x_tr, y_tr, x_te, y_te = data[:4]
        for name, enc in encoders.items():
            knn, lin = scores(enc, x_tr, y_tr, x_te, y_te)
            print(f"| {task} | {len(y_tr)} / {len(y_te)} | {args.arch} {name} | {knn:.3f} | "
                  f"{lin:.3f} |")

    alone = model_alone_throughput(args, n_steps=max(5, 320 // args.batch_size))
    print("\n| training throughput | tiles/s (2 views each) |")
    print("|---|---|")
    print(f"| full loop (slide reads + augment + model) | {res.tiles_per_s:.1f} |")
    print(f"| model alone (pre-made batch) | {alone:.1f} |")
    print(f"| ratio full / model alone | {res.tiles_per_s / alone:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

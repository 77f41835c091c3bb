"""``wsi-ssl info``: what a tile store holds (or which encoders are registered)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wsi_ssl.cli._repair import repair_command
from wsi_ssl.errors import ConfigError
from wsi_ssl.store import TileStore

HELP = "print what a tile store holds: encoder, slides, tiles, views, sizes, failures"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", nargs="?", default=None, help="a tile store (.zarr folder)")
    p.add_argument("--slides", nargs="*", default=None, metavar="ID_OR_FILE",
                   help="one line per slide; with ids (or files of ids, one per line) only those; "
                   "with --verify: verify only those")
    p.add_argument("--encoders", action="store_true", help="list the registered encoders")
    p.add_argument("--verify", action="store_true",
                   help="re-read every slide (or --slides) and compare it with the checksums "
                   "recorded when it was written, in parallel threads; exits 1 and prints the "
                   "repair command if any slide is damaged")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for --verify (default: up to 4)")
    p.add_argument("--rescan", action="store_true",
                   help="rebuild the slide index from a scan of every slide folder (also lists "
                   "the slides whose metadata cannot be read)")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _slide_list(items: list[str]) -> list[str]:
    """Ids given on the command line; an item naming an existing file is read as ids (one per
    line, '#' comments and blank lines skipped)."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_file():
            for line in p.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    out.append(line)
        else:
            out.append(item)
    return list(dict.fromkeys(out))


_WEIGHTS = {"random": "random initialisation (--random-weights: the features carry no "
                     "pretrained meaning)",
            "file": "from a weights file", "builtin": "built-in (a registered encoder)",
            "module": "a wrapped nn.Module"}


def _print_encoders() -> None:
    from wsi_ssl.encoders import describe_encoder, list_encoders  # lazy: imports torch

    for name in list_encoders():
        print(f"{name:<16} {describe_encoder(name)}")
    print("... and any timm architecture name (local --weights only; no downloads)")


def _weights_line(store: TileStore) -> str | None:
    """Where the store's encoder got its weights (``encoder.weights`` of the store attrs, else
    ``encoder_weights`` of a slide's attrs); None for stores made before it was recorded."""
    kind = (store.encoder or {}).get("weights")
    for sid in store.slide_ids[:1] if kind is None else ():
        kind = (store.slide_attrs(sid) or {}).get("encoder_weights")
    return None if kind is None else _WEIGHTS.get(kind, str(kind))


def _print_summary(store: TileStore) -> None:
    s = store.summary()
    print(f"store          {s.path} (format v{s.format_version})")
    print(f"encoder        {s.encoder} (fingerprint {s.encoder_fingerprint}, dim {s.embed_dim})")
    weights = _weights_line(store)
    if weights is not None:
        print(f"weights        {weights}")
    print(f"slides         {s.slides}  tiles {s.tiles}  views {s.views}")
    print(f"size           {_size(s.bytes)}  ({_size(s.bytes_per_slide)}/slide, "
          f"{s.bytes_per_tile:.0f} B/tile)")
    print(f"store id       {store.fingerprint}")
    writer = store.writer
    if writer is not None:
        print(f"writer         {writer.describe()}")


def _print_slides(store: TileStore, subset: list[str] | None, unreadable: dict[str, str]
                  ) -> None:
    """One line per slide (``mpp``: the target resolution of its tiles); slides whose
    metadata cannot be read go to ``unreadable``."""
    print(f"{'slide_id':<32} {'tiles':>7} {'views':>9} {'mpp':>6} {'tile':>5}  source")
    for sid in subset if subset is not None else store.slide_ids:
        a = store.slide_attrs(sid)
        if a is None or a.get("complete") is not True:
            if (store.path / "slides" / sid).is_dir():
                unreadable.setdefault(sid, store._probe(sid)[1] or "not complete")
            else:
                print(f"{sid:<32} (not in the store)")
            continue
        vt = f"{a.get('n_views', 0)}x{a.get('view_tiles', 0)}"
        mpp = a.get("mpp")
        print(f"{sid:<32} {a.get('n_tiles', 0):>7} {vt:>9} "
              f"{mpp if mpp is not None else '-':>6} {a.get('tile_size', '-'):>5}  "
              f"{a.get('source', '')}")


def _print_problems(store: TileStore, unreadable: dict[str, str]) -> None:
    fails = store.failures
    if fails:
        print(f"failures       {len(fails)} (rerun `wsi-ssl embed` to retry):")
        for sid, f in sorted(fails.items()):
            print(f"  {sid:<30} {f.get('path')}: {f.get('error')}")
    if unreadable:
        print(f"unreadable     {len(unreadable)} slides (kept, left out of training):")
        for sid, why in sorted(unreadable.items()):
            print(f"  {sid:<30} unreadable: {why}")


def _print_verify(rep: Any) -> int:
    print(f"verify         {len(rep.checked)} slides checked, {len(rep.damaged)} damaged"
          + (f", {len(rep.unchecked)} without checksums" if rep.unchecked else ""))
    for sid, why in rep.damaged.items():
        print(f"  damaged: {sid:<30} {why}")
    if rep.damaged:
        print(f"re-embed exactly these with:\n  {repair_command(rep.repair)}")
    return 0 if rep.ok else 1


def run(args: argparse.Namespace) -> int:
    if args.encoders:
        _print_encoders()
        if args.store is None:
            return 0
    if args.store is None:
        raise ConfigError("give a STORE path (or --encoders).")
    store = TileStore(args.store, mode="a" if args.rescan else "r")
    if args.rescan:
        ids = store.rescan()
        print(f"rescan         slide index rebuilt: {len(ids)} complete slides")
    _print_summary(store)
    subset = _slide_list(args.slides) if args.slides else None
    unreadable = dict(store._listing()[1])
    if args.slides is not None and not args.verify:
        _print_slides(store, subset, unreadable)
    if args.rescan:
        unreadable.update(store.unreadable)
    rep = None
    if args.verify:
        rep = store.verify(subset, threads=args.threads)
        unreadable.update(rep.unreadable)
    _print_problems(store, unreadable)
    return _print_verify(rep) if rep is not None else 0

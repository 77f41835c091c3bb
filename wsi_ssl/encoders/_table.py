"""The encoder table of ``wsi-ssl encoders`` / ``list_encoders(verbose=True)``."""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass
from pathlib import Path

from wsi_ssl.encoders._hub import locate_weights
from wsi_ssl.encoders._loading import expected_shapes
from wsi_ssl.encoders._presets import _PRESETS, list_presets
from wsi_ssl.encoders._registry import _REGISTRY

__all__ = ["EncoderInfo", "encoder_infos", "encoder_table", "list_encoders"]


@dataclass(frozen=True, kw_only=True)
class EncoderInfo:
    """One row of the encoder table.

    Attributes:
        name: ``create_encoder`` name.
        embed_dim: feature length (``None`` for registered encoders: known once built).
        mpp: µm/px the model was trained at (``None``: not a preset).
        tile_size: tile edge (px) at ``mpp``.
        input_size: edge (px) the model sees.
        params: parameter count (``None`` where not computed).
        license: licence of the weights.
        weights: where this machine has the weights (``None``: not found).
        hub_repo: Hugging Face repo id of the weights ('' for non-presets).
        note: extra needed or the registered description.
    """

    name: str
    embed_dim: int | None
    mpp: float | None
    tile_size: int | None
    input_size: int | None
    params: int | None
    license: str
    weights: str | None
    hub_repo: str
    note: str = ""


def encoder_infos(pattern: str | None = None, *, search: tuple[str | os.PathLike, ...] = ()
                  ) -> list[EncoderInfo]:
    """A row per preset and registered encoder (``pattern``: glob on the name). Weights are
    looked for in the local Hugging Face cache and in ``search`` folders (``search/UNI/...``).
    Parameter counts come from meta-device builds (no memory, no weights)."""
    rows = []
    for p in _PRESETS:
        if pattern and not fnmatch.fnmatch(p.name, pattern):
            continue
        try:
            params: int | None = sum(math.prod(s) for s in expected_shapes(p).values())
            note = ""
        except ImportError:
            params, note = None, f"pip install \"wsi-ssl[{p.extra}]\""
        found = locate_weights(p, search)
        rows.append(EncoderInfo(name=p.name, embed_dim=p.embed_dim, mpp=p.mpp,
                                tile_size=p.tile_size, input_size=p.input_size, params=params,
                                license=p.license, weights=str(found) if found else None,
                                hub_repo=p.hub_repo, note=note))
    for name, entry in sorted(_REGISTRY.items()):
        if pattern and not fnmatch.fnmatch(name, pattern):
            continue
        rows.append(EncoderInfo(name=name, embed_dim=None, mpp=None, tile_size=None,
                                input_size=entry.input_size, params=None, license="-",
                                weights="built in", hub_repo="", note=entry.description))
    return rows


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def encoder_table(pattern: str | None = None, *, search: tuple[str | os.PathLike, ...] = ()
                  ) -> str:
    """The encoder table as text: a header, a rule, one line per encoder."""
    head = ("name", "dim", "µm/px", "tile", "input", "params", "licence", "weights (this machine)")
    lines = []
    for r in encoder_infos(pattern, search=search):
        where = r.weights or (f"not found: huggingface-cli download {r.hub_repo}"
                              if r.hub_repo else "-")
        if r.weights and r.weights != "built in":
            where = str(Path(r.weights).parent)
        if r.note and r.hub_repo:
            where += f" ({r.note})"
        lines.append((r.name, str(r.embed_dim or "-"), f"{r.mpp:g}" if r.mpp else "-",
                      str(r.tile_size or "-"), str(r.input_size or "-"), _params(r.params),
                      r.license, where))
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths[:-1]), "-" * len(head[-1]))]
    out += [fmt.format(*x) for x in lines]
    return "\n".join(out)


def list_encoders(pattern: str | None = None, *, include_timm: bool = False,
                  verbose: bool = False) -> list[str]:
    """Encoder names: the foundation-model presets (table order), then the registered encoders
    (sorted), optionally filtered by a glob ``pattern``; with ``include_timm=True`` also every
    timm architecture (all usable with local weights).

    With ``verbose=True`` each entry is instead one row of the table printed by
    ``wsi-ssl encoders`` (name, dim, µm/px, tile size, input size, parameters, licence, where
    the weights are on this machine): ``print("\n".join(list_encoders(verbose=True)))``.
    """
    if verbose:
        return encoder_table(pattern).splitlines()[2:]
    names = list_presets() + sorted(_REGISTRY)
    if include_timm:
        import timm  # lazy: timm only when an encoder is built

        names += [n for n in timm.list_models() if n not in _REGISTRY]
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names

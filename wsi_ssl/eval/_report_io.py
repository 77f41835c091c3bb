"""Writing evaluation reports: strict JSON (NaN -> null) and PNG/CSV next to it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl._utils import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["json_clean", "dumps", "write_report"]


def json_clean(obj: Any) -> Any:
    """Make ``obj`` strict-JSON serialisable: numpy scalars/arrays to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, np.generic):
        return json_clean(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return str(obj)
    return str(obj)


def dumps(obj: Any) -> str:
    """Strict JSON text (``allow_nan=False``) of :func:`json_clean` ``(obj)``."""
    return json.dumps(json_clean(obj), indent=2, allow_nan=False)


def write_report(out_dir: str | os.PathLike, prefix: str, *, json_text: str, fig: Figure,
                 frame: pd.DataFrame, extra: dict[str, pd.DataFrame] | None = None
                 ) -> dict[str, Path]:
    """Write ``{prefix}.json``, ``{prefix}.png``, ``{prefix}.csv`` (and ``extra`` CSVs) into
    ``out_dir`` (created); return the paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{prefix}.json", "png": out / f"{prefix}.png",
             "csv": out / f"{prefix}.csv"}
    atomic_write_bytes(paths["json"], json_text.encode("utf-8"))
    fig.savefig(paths["png"], dpi=120, bbox_inches="tight")
    atomic_write_bytes(paths["csv"], frame.to_csv(index=False).encode("utf-8"))
    for name, df in (extra or {}).items():
        paths[name] = out / f"{prefix}_{name}.csv"
        atomic_write_bytes(paths[name], df.to_csv(index=False).encode("utf-8"))
    return paths

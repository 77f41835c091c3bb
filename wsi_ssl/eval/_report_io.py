"""Writing evaluation reports: strict JSON (NaN -> null), PNG/CSV next to it, and HTML pages
(real tables, a settings header, figures sized for a screen)."""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl._utils import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["RowCounts", "json_clean", "dumps", "write_report", "ReportSection", "html_table",
           "write_html_report"]


class RowCounts:
    """``n_rows`` / ``n_slides`` / ``n_patients`` of a report with ``slide_ids``, ``patients`` and
    ``n_input_slides`` fields (the probe and survival reports)."""

    slide_ids: tuple[str, ...]
    patients: tuple[str, ...]
    n_input_slides: int

    @property
    def n_rows(self) -> int:
        """Rows the model saw: slides, or patients at ``level="patient"``."""
        return len(self.slide_ids)

    @property
    def n_slides(self) -> int:
        """Slides given (before patient-level aggregation)."""
        return self.n_input_slides if self.n_input_slides >= 0 else len(self.slide_ids)

    @property
    def n_patients(self) -> int:
        return len(set(self.patients))


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


# -- the HTML report --------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:980px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;
border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
table.settings td,table.settings th{text-align:left}
figure{margin:.8em 0 1.4em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.88em;color:#555}.note{color:#555;font-size:.92em}
"""


@dataclass(frozen=True, kw_only=True)
class ReportSection:
    """One section of an HTML report.

    Attributes:
        title: the section heading.
        text: a paragraph of plain text (escaped), may be empty.
        tables: ``(caption, DataFrame)`` pairs rendered as HTML tables (index not shown).
        figures: ``(caption, PNG path)`` pairs; paths are written relative to the page.
    """

    title: str
    text: str = ""
    tables: tuple[tuple[str, Any], ...] = ()
    figures: tuple[tuple[str, Path], ...] = ()


def html_table(frame: pd.DataFrame, *, caption: str = "", css_class: str = "") -> str:
    """A DataFrame as an escaped HTML ``<table>`` (floats with 3 decimals, no index)."""

    cls = f" class='{css_class}'" if css_class else ""
    out = [f"<table{cls}>"]
    if caption:
        out.append(f"<caption>{html.escape(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
               + "</tr></thead><tbody>")
    for row in frame.itertuples(index=False):
        cells = [f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v) for v in row]
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def write_html_report(path: str | os.PathLike, *, title: str, intro: str = "",
                      settings: Mapping[str, Any] | None = None,
                      sections: Sequence[ReportSection] = ()) -> Path:
    """A self-contained HTML page: a header with the settings, then the sections.

    Args:
        path: the ``.html`` file to write (images are linked relative to its folder).
        title: page title and heading.
        intro: one paragraph under the heading.
        settings: name -> value pairs shown as a two-column table in the header.
        sections: the body.

    Returns:
        The path written.
    """

    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    path = Path(path)
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    if settings:
        frame = pd.DataFrame({"setting": list(settings), "value": [str(v) for v in
                                                                   settings.values()]})
        parts.append(html_table(frame, css_class="settings"))
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        if sec.text:
            parts.append(f"<p>{html.escape(sec.text)}</p>")
        for caption, frame in sec.tables:
            parts.append(html_table(frame, caption=caption))
        for caption, png in sec.figures:
            rel = os.path.relpath(Path(png), path.parent).replace(os.sep, "/")
            parts.append(f"<figure><img src='{html.escape(rel)}' alt='{html.escape(caption)}' "
                         f"width='760'><figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))
    return path

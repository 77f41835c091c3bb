"""Evaluation of slide embeddings: few-shot linear probes, survival models and the comparison of
several embedding files (see ``docs/eval.md``).

Both take slide embeddings (:class:`~wsi_ssl.store.SlideEmbeddings`, a DataFrame indexed by slide
id, or a ``.npz`` / ``.csv`` / ``.parquet`` path) and a label or clinical table, split by patient,
and return a frozen report with ``to_frame()``, ``to_json()``, ``plot()`` and ``save(out_dir)``.
"""

from wsi_ssl.eval._clusters import ClusterMapResult, cluster_map, tile_clusters
from wsi_ssl.eval._compare import (
    CompareReport,
    CompareScore,
    PairedDifference,
    compare_embeddings,
)
from wsi_ssl.eval._export import GeoJSONExport, export_geojson
from wsi_ssl.eval._heatmap import HeatmapResult, heatmap, tile_scores
from wsi_ssl.eval._probe import C_GRID, DEFAULT_C, linear_probe
from wsi_ssl.eval._probe_report import ProbeReport, ProbeResult, RocCurve
from wsi_ssl.eval._report_io import ReportSection, write_html_report
from wsi_ssl.eval._retrieval import (
    RetrievalReport,
    SimilarResult,
    plot_retrieval,
    retrieval_report,
    similar,
)
from wsi_ssl.eval._survival import SurvivalFold, SurvivalReport, survival

__all__ = [
    "linear_probe",
    "DEFAULT_C",
    "C_GRID",
    "ProbeReport",
    "ProbeResult",
    "RocCurve",
    "survival",
    "SurvivalReport",
    "SurvivalFold",
    "compare_embeddings",
    "CompareReport",
    "CompareScore",
    "PairedDifference",
    "heatmap",
    "tile_scores",
    "HeatmapResult",
    "cluster_map",
    "tile_clusters",
    "ClusterMapResult",
    "similar",
    "SimilarResult",
    "retrieval_report",
    "RetrievalReport",
    "plot_retrieval",
    "export_geojson",
    "GeoJSONExport",
    "ReportSection",
    "write_html_report",
]

"""Generated slides and cohorts for demos, tests and benchmarks."""

from wsi_ssl.datasets._cohort import (
    MASK_DOWNSAMPLE,
    REGION_CODES,
    CohortInfo,
    SlideInfo,
    make_cohort,
    make_slide,
    region_fractions,
)
from wsi_ssl.datasets._tiff import Renderer, write_pyramidal_tiff

__all__ = [
    "write_pyramidal_tiff",
    "Renderer",
    "make_cohort",
    "make_slide",
    "CohortInfo",
    "SlideInfo",
    "region_fractions",
    "REGION_CODES",
    "MASK_DOWNSAMPLE",
]

"""Generated slides and cohorts for demos, tests and benchmarks."""

from wsi_ssl.datasets._tiff import Renderer, write_pyramidal_tiff

__all__ = ["write_pyramidal_tiff", "Renderer"]

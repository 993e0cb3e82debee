"""chunkem: chunked cryo-EM map and tomogram processing on Dask.

Public API: file I/O (:func:`open_map`, :func:`save`, :func:`open_model`),
Volume helpers (:func:`make_volume`) and the operations.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import config  # noqa: F401  (registers the chunkem dask.config defaults)
from .errors import ChunkemError
from .volume import make_volume, validate_volume
from .io.maps import open_map, save
from .io.model import Model, open_model, save_model
from .ops.fsc import FSCResult, fsc
from .ops.postprocess import PostprocessResult, postprocess
from .ops.sharpen import AutoSharpenResult, auto_sharpen, sharpen
from .ops.locres import LocalResolutionResult, local_filter, local_resolution
from .ops.modelmap import model_map
from .ops.refine import RefineResult, refine_adp
from .ops.metrics import MapModelMetrics, map_model_metrics
from .ops.scene import Particles, read_particles, render_scene
from .ops.locscale import locscale
from .ops.fdr import FDRResult, fdr_confidence
from .ops.spiral import (LocBFactorResult, OccupancyResult, SpiralResult, auto_mask, locbfactor,
                          locbsharpen, lococcupancy, locspiral, maturity_index)

__all__ = [
    "__version__",
    "ChunkemError",
    "make_volume",
    "validate_volume",
    "open_map",
    "save",
    "Model",
    "open_model",
    "save_model",
    "fsc",
    "FSCResult",
    "postprocess",
    "PostprocessResult",
    "sharpen",
    "auto_sharpen",
    "AutoSharpenResult",
    "local_resolution",
    "local_filter",
    "LocalResolutionResult",
    "model_map",
    "refine_adp",
    "RefineResult",
    "map_model_metrics",
    "MapModelMetrics",
    "render_scene",
    "read_particles",
    "Particles",
    "locspiral",
    "locbsharpen",
    "SpiralResult",
    "locbfactor",
    "LocBFactorResult",
    "lococcupancy",
    "OccupancyResult",
    "maturity_index",
    "auto_mask",
    "locscale",
    "fdr_confidence",
    "FDRResult",
]

"""chunkem: chunked cryo-EM map and tomogram processing on Dask.

Public API: file I/O (:func:`open_map`, :func:`save`, :func:`open_model`),
Volume helpers (:func:`make_volume`) and the operations.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import config  # noqa: F401  (registers the chunkem dask.config defaults)
from .errors import ChunkemError

# Public names are imported on first use (module ``__getattr__`` below), so that
# ``import chunkem`` and the CLI do not pay for dask.array/xarray/scipy.stats...
# of every op up front. ``from chunkem import fsc`` works as before.
_LAZY = {
    "make_volume": ".volume", "validate_volume": ".volume",
    "open_map": ".io.maps", "save": ".io.maps",
    "Model": ".io.model", "open_model": ".io.model", "save_model": ".io.model",
    "lowpass": ".ops.filter", "highpass": ".ops.filter", "bandpass": ".ops.filter",
    "apply_bfactor": ".ops.filter", "gaussian_smooth": ".ops.filter", "filter_volume": ".ops.filter",
    "bin_volume": ".ops.bin", "pyramid": ".ops.bin",
    "FSCResult": ".ops.fsc", "fsc": ".ops.fsc",
    "PostprocessResult": ".ops.postprocess", "postprocess": ".ops.postprocess",
    "AutoSharpenResult": ".ops.sharpen", "auto_sharpen": ".ops.sharpen", "sharpen": ".ops.sharpen",
    "LocalResolutionResult": ".ops.locres", "local_filter": ".ops.locres", "local_resolution": ".ops.locres",
    "model_map": ".ops.modelmap",
    "RefineResult": ".ops.refine", "refine_adp": ".ops.refine",
    "MapModelMetrics": ".ops.metrics", "map_model_metrics": ".ops.metrics",
    "Particles": ".ops.scene", "read_particles": ".ops.scene", "render_scene": ".ops.scene",
    "locscale": ".ops.locscale",
    "FDRResult": ".ops.fdr", "fdr_confidence": ".ops.fdr",
    "LocBFactorResult": ".ops.spiral", "OccupancyResult": ".ops.spiral", "SpiralResult": ".ops.spiral",
    "auto_mask": ".ops.spiral", "locbfactor": ".ops.spiral", "locbsharpen": ".ops.spiral",
    "lococcupancy": ".ops.spiral", "locspiral": ".ops.spiral", "maturity_index": ".ops.spiral",
}


def __getattr__(name: str):
    """Import a public name (or a subpackage such as ``chunkem.io``) on first use."""
    from ._lazy import lazy_attribute

    return lazy_attribute(globals(), __name__, _LAZY, name, submodules=True)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
    "lowpass",
    "highpass",
    "bandpass",
    "apply_bfactor",
    "gaussian_smooth",
    "filter_volume",
    "bin_volume",
    "pyramid",
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

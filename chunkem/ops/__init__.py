"""User-level operations: each composes kernels (:mod:`chunkem.kernels`) with the
engine (:mod:`chunkem.engine`). Volumes in, Volumes (or small result
dataclasses) out; lazy for dask input.
"""

from __future__ import annotations

from .bin import bin_volume, pyramid
from .filter import apply_bfactor, bandpass, filter_volume, gaussian_smooth, highpass, lowpass

__all__ = [
    "apply_bfactor",
    "bandpass",
    "bin_volume",
    "filter_volume",
    "gaussian_smooth",
    "highpass",
    "lowpass",
    "pyramid",
]

"""User-level operations: each composes kernels (:mod:`chunkem.kernels`) with the
engine (:mod:`chunkem.engine`). Volumes in, Volumes (or small result
dataclasses) out; lazy for dask input.
"""

from __future__ import annotations

_LAZY = {
    "bin_volume": ".bin", "pyramid": ".bin",
    "apply_bfactor": ".filter", "bandpass": ".filter", "filter_volume": ".filter",
    "gaussian_smooth": ".filter", "highpass": ".filter", "lowpass": ".filter",
}


def __getattr__(name: str):
    """Import a public name on first use (``import chunkem.ops.fsc`` stays light)."""
    from .._lazy import lazy_attribute

    return lazy_attribute(globals(), __name__, _LAZY, name)

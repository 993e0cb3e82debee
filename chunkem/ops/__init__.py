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
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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

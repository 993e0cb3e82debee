"""Map file input/output: MRC / CCP4 (lazy, memory-mapped) and OME-Zarr (zarr v3).

Use :func:`open_map` and :func:`save`; the format follows the file name (see
:mod:`chunkem.io.maps`). :func:`read_mrc_header` reads an MRC header alone.
"""

from __future__ import annotations

from .maps import MapStats, map_facts, map_stats, open_map, save
from .model import Model, open_model, save_model
from .mrc import MrcHeader, read_mrc_header

__all__ = [
    "open_map",
    "save",
    "open_model",
    "save_model",
    "Model",
    "read_mrc_header", "MrcHeader", "map_stats", "MapStats", "map_facts"]

"""Open and save maps whatever their format; chunk-wise map statistics.

:func:`open_map` and :func:`save` pick the format from the file name:

========================================  =========  ==========
name                                      read       write
========================================  =========  ==========
``.mrc``, ``.map``, ``.ccp4``, ``.mrcs``, yes, lazy  yes, streamed
``.rec``, ``.st``
the same + ``.gz`` / ``.bz2``             yes [1]_   no
``.zarr`` (OME-Zarr NGFF 0.5, zarr v3)    yes, lazy  yes, streamed
========================================  =========  ==========

.. [1] compressed MRC files cannot be memory-mapped: they are decompressed
   into memory when opened (they are small in practice). Compression is
   recognised from the first bytes, whatever the extension says.

NaN / Inf policy
----------------
Opening stays lazy, so by default (``nan_policy="defer"``) nothing is
checked on open: non-finite voxels are reported by ``chunkem info`` (NaN and
Inf counts), refused by :func:`chunkem.volume.validate_volume` with
``finite=True`` and by the operations that need finite data.
``nan_policy="raise"`` or ``"warn"`` checks at open time, chunk-wise (this
computes, reading the whole map once). Statistics (:func:`map_stats`, the
MRC header ``dmin/dmax/dmean/rms``) are taken over the finite voxels.

This module is the base of :mod:`chunkem.io`: it has no import of the
format modules at load time.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from ..errors import DataValueError, InputFileError, OutputError, ParameterError

__all__ = [
    "open_map",
    "save",
    "map_format",
    "MapStats",
    "map_stats",
    "map_facts",
    "MRC_SUFFIXES",
    "ZARR_SUFFIXES",
]

MRC_SUFFIXES = (".mrc", ".map", ".ccp4", ".mrcs", ".rec", ".st")
COMPRESSED_SUFFIXES = (".gz", ".bz2")
ZARR_SUFFIXES = (".zarr",)
NAN_POLICIES = ("defer", "raise", "warn")

#: number of numbers :func:`block_stats` returns per block
N_STATS = 7


# --------------------------------------------------------------------------- formats


def map_format(path: str | os.PathLike, *, for_writing: bool = False) -> str:
    """Return ``"mrc"`` or ``"zarr"`` for ``path`` (by extension, then by content).

    Raises
    ------
    InputFileError
        Unknown kind of file (reading).
    ParameterError
        Unknown or unsupported output extension (writing).
    """
    p = Path(path)
    name = p.name.lower()
    if for_writing:
        if name.endswith(ZARR_SUFFIXES):
            return "zarr"
        if name.endswith(MRC_SUFFIXES):
            return "mrc"
        if name.endswith(COMPRESSED_SUFFIXES):
            raise ParameterError(
                f"{path}: writing compressed MRC files is not supported; write .mrc and compress it afterwards"
            )
        raise ParameterError(f"{path}: unknown output format; use a .mrc, .map or .zarr name")
    stripped = name
    for c in COMPRESSED_SUFFIXES:
        if stripped.endswith(c):
            stripped = stripped[: -len(c)]
    if name.endswith(ZARR_SUFFIXES) or (p.is_dir() and _looks_like_zarr(p)):
        return "zarr"
    if stripped.endswith(MRC_SUFFIXES):
        return "mrc"
    if not p.exists():
        raise InputFileError(f"{path}: no such file")
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(1024)
        if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[208:212] == b"MAP ":
            return "mrc"
    raise InputFileError(f"{path}: unknown map format (expected .mrc, .map, .ccp4, .mrc.gz, .map.bz2 or .zarr)")


def _looks_like_zarr(p: Path) -> bool:
    return any((p / n).exists() for n in ("zarr.json", ".zgroup", ".zarray"))


# --------------------------------------------------------------------------- open / save


def open_map(
    path: str | os.PathLike,
    *,
    chunks: int | Sequence[int] | None = None,
    voxel_size: float | Sequence[float] | None = None,
    nan_policy: str = "defer",
    level: int = 0,
) -> xr.DataArray:
    """Open a map lazily as a Volume.

    Parameters
    ----------
    path
        MRC/CCP4 file (``.mrc``, ``.map``, ``.ccp4``, optionally ``.gz`` or
        ``.bz2``) or OME-Zarr store (``.zarr``).
    chunks
        Chunk edge in voxels (one number) or chunk shape (z, y, x); default
        :func:`chunkem.engine.chunks.auto_chunks` (the ``chunkem.chunks``
        setting, 128) for MRC, the stored chunks for zarr.
    voxel_size
        Override the voxel size in Å (one number or (vz, vy, vx)): for files
        whose header has a zero or wrong cell. An MRC origin given by NSTART
        is then ``nstart * voxel_size``.
    nan_policy
        ``"defer"`` (default: nothing is checked, nothing computes),
        ``"raise"`` (count non-finite voxels now and raise
        :class:`~chunkem.errors.DataValueError`) or ``"warn"``.
    level
        Pyramid level of a zarr store (0 = full resolution).

    Returns
    -------
    xarray.DataArray
        float32 Volume backed by dask, dims ``("z", "y", "x")``, with
        ``attrs["header"]`` holding the file's header facts (see
        :mod:`chunkem.io.mrc`) for a lossless :func:`save`.

    Raises
    ------
    InputFileError, MapFormatError, DataValueError, ParameterError

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from chunkem import make_volume
    >>> d = tempfile.mkdtemp()
    >>> _ = save(make_volume(np.ones((4, 5, 6)), voxel_size=1.5), os.path.join(d, "a.mrc"))
    >>> v = open_map(os.path.join(d, "a.mrc"))
    >>> v.shape, v.attrs["voxel_size"], type(v.data).__name__
    ((4, 5, 6), (1.5, 1.5, 1.5), 'Array')
    """
    if nan_policy not in NAN_POLICIES:
        raise ParameterError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    kind = map_format(path)
    if kind == "zarr":
        from .zarr import read_zarr

        vol = read_zarr(path, level=level, chunks=chunks, voxel_size=voxel_size)
    else:
        if level != 0:
            raise ParameterError(f"{path}: an MRC file has no pyramid levels (level={level})")
        from .mrc import read_mrc

        vol = read_mrc(path, chunks=chunks, voxel_size=voxel_size)
    if nan_policy != "defer":
        st = map_stats(vol, progress=False)
        bad = st.nan_count + st.inf_count
        if bad:
            msg = f"{path}: {st.nan_count} voxels are NaN and {st.inf_count} are Inf"
            if nan_policy == "raise":
                raise DataValueError(msg)
            warnings.warn(msg, stacklevel=2)
    return vol


def save(
    vol: xr.DataArray,
    path: str | os.PathLike,
    *,
    chunks: int | Sequence[int] | None = None,
    levels: Sequence[xr.DataArray] | None = None,
    overwrite: bool = True,
    mode: int | None = None,
    axis_order: str = "keep",
    label: str | None = None,
    progress: bool | None = None,
    compression: str | None = None,
) -> Path:
    """Write a Volume to an MRC file or an OME-Zarr store, atomically.

    Parameters
    ----------
    vol
        The Volume. A dask-backed Volume is streamed chunk by chunk (never
        held whole in memory).
    path
        ``.mrc`` / ``.map`` / ``.ccp4`` (MRC 2014) or ``.zarr`` (OME-Zarr 0.5).
    chunks
        zarr only: chunk edge or shape (z, y, x); default the
        ``chunkem.chunks`` setting (128).
    levels
        zarr only: extra, already downsampled Volumes stored as pyramid
        levels 1, 2, ... each with its own voxel size and origin.
    overwrite
        Replace an existing output (default True); else raise
        :class:`~chunkem.errors.OutputError`.
    mode
        MRC only: data mode to write (0, 1, 2, 6, 12). Default: the mode of
        the file the Volume came from when every value is exactly
        representable in it, else 2 (float32). See :mod:`chunkem.io.mrc`.
    axis_order
        MRC only: ``"keep"`` (default) writes the MAPC/MAPR/MAPS order of
        the file the Volume came from; ``"zyx"`` writes the standard 1, 2, 3.
    label
        MRC only: a text label (≤ 80 characters) appended to the header labels.
    progress
        Show a progress bar (default: the ``chunkem.progress`` setting).
    compression
        zarr only: chunk codec (see :func:`chunkem.io.zarr.write_zarr`;
        default the ``chunkem.zarr-compression`` setting, ``"blosc-lz4"``).

    Returns
    -------
    pathlib.Path
        The written path. Nothing is left at ``path`` (or beside it) when
        writing fails.

    Raises
    ------
    OutputError
        Folder not writable, output exists with ``overwrite=False``, or the
        output is the file a lazily read Volume still reads from (its
        ``attrs["header"]["source"]``).
    ParameterError, GeometryError, DataValueError
        Bad options, a malformed Volume, or a forced ``mode`` the values do
        not fit.
    """
    kind = map_format(path, for_writing=True)
    _refuse_own_source(vol, path)
    if kind == "zarr":
        from .zarr import write_zarr

        if mode is not None or label is not None or axis_order != "keep":
            raise ParameterError(f"{path}: mode=, label= and axis_order= apply to MRC output only")
        return write_zarr(vol, path, chunks=chunks, levels=levels, overwrite=overwrite, progress=progress,
                          compression=compression)
    from .mrc import write_mrc

    if levels:
        raise ParameterError(f"{path}: an MRC file holds one level; write pyramid levels to a .zarr store")
    if chunks is not None or compression is not None:
        raise ParameterError(f"{path}: chunks= and compression= apply to zarr output only")
    return write_mrc(
        vol, path, mode=mode, axis_order=axis_order, label=label, overwrite=overwrite, progress=progress
    )


def _refuse_own_source(vol: xr.DataArray, path: str | os.PathLike) -> None:
    """A lazy Volume still reads from its source file: writing over it is refused."""
    src = (vol.attrs.get("header") or {}).get("source") if isinstance(vol, xr.DataArray) else None
    if src and isinstance(vol.data, da.Array):
        try:
            same = Path(src).resolve() == Path(path).resolve()
        except OSError:  # pragma: no cover
            same = False
        if same:
            raise OutputError(
                f"{path}: output would overwrite an input file (the Volume is read lazily from it); "
                "write to another name"
            )


# --------------------------------------------------------------------------- compute shim


def compute(*collections: Any, progress: bool | None = None, label: str = "") -> tuple:
    """Compute dask collections through :func:`chunkem.engine.cluster.compute`."""
    try:
        from ..engine.cluster import compute as _compute
    except ImportError:  # engine not installed (bare io use)
        import dask

        return dask.compute(*collections)
    return _compute(*collections, progress=progress, label=label)


# --------------------------------------------------------------------------- statistics


@dataclass
class MapStats:
    """Statistics over the finite voxels of a map, plus non-finite counts.

    ``std`` is the population standard deviation (the MRC header's RMS
    deviation from the mean); ``count`` the number of finite voxels.
    """

    min: float
    max: float
    mean: float
    std: float
    count: int
    nan_count: int
    inf_count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def block_stats(block: np.ndarray) -> np.ndarray:
    """Partial statistics of one block: ``[n, mean, M2, min, max, n_nan, n_inf]``.

    ``M2`` is the sum of squared deviations from the block mean (float64);
    partials are merged exactly with :func:`merge_stats` (Chan et al.).
    """
    block = np.asarray(block)
    out = np.empty(N_STATS, dtype=np.float64)
    total = float(np.sum(block, dtype=np.float64))
    if math.isfinite(total):  # fast path: every voxel finite (float32 sums cannot overflow float64)
        vals = block
        n = block.size
        n_nan = 0
    else:
        finite = np.isfinite(block)
        n = int(np.count_nonzero(finite))
        n_nan = int(np.count_nonzero(np.isnan(block)))
        vals = block[finite]
        total = float(np.sum(vals, dtype=np.float64))
    out[0] = n
    out[5] = n_nan
    out[6] = block.size - n - n_nan
    if n == 0:
        out[1:5] = (0.0, 0.0, np.inf, -np.inf)
        return out
    mean = total / n
    m2 = 0.0
    flat = vals.reshape(-1)
    step = 1 << 20  # bound the float64 temporary (8 MiB)
    for i in range(0, flat.size, step):
        d = flat[i : i + step].astype(np.float64)
        d -= mean
        m2 += float(np.dot(d, d))
    out[1] = mean
    out[2] = m2
    out[3] = float(np.min(vals))
    out[4] = float(np.max(vals))
    return out


def merge_stats(partials: np.ndarray) -> MapStats:
    """Merge rows of :func:`block_stats` partials into a :class:`MapStats`."""
    parts = np.asarray(partials, dtype=np.float64).reshape(-1, N_STATS)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for nb, mb, m2b, *_ in parts:
        if nb == 0:
            continue
        tot = n + nb
        delta = mb - mean
        mean += delta * nb / tot
        m2 += m2b + delta * delta * n * nb / tot
        n = tot
    if n:
        vmin = float(np.min(parts[:, 3]))
        vmax = float(np.max(parts[:, 4]))
        std = math.sqrt(max(m2 / n, 0.0))
    else:
        vmin = vmax = mean = std = float("nan")
    return MapStats(
        min=vmin,
        max=vmax,
        mean=float(mean),
        std=float(std),
        count=int(n),
        nan_count=int(parts[:, 5].sum()),
        inf_count=int(parts[:, 6].sum()),
    )


def _stats_block(block: np.ndarray) -> np.ndarray:
    return block_stats(block).reshape(1, 1, N_STATS)


def stats_graph(arr: da.Array) -> da.Array:
    """Lazy per-block partial statistics of a 3-D dask array, shape (nbz, nby, nbx * 7)."""
    out_chunks = (
        (1,) * len(arr.chunks[0]),
        (1,) * len(arr.chunks[1]),
        (N_STATS,) * len(arr.chunks[2]),
    )
    return arr.map_blocks(_stats_block, chunks=out_chunks, dtype=np.float64, meta=np.empty((0, 0, 0), np.float64))


def map_stats(vol: xr.DataArray | np.ndarray | da.Array, *, progress: bool | None = None) -> MapStats:
    """Min, max, mean, std of the finite voxels and NaN / Inf counts, chunk-wise.

    A dask-backed Volume is reduced block by block through
    :func:`chunkem.engine.cluster.compute` (memory bounded by the chunk size).

    Examples
    --------
    >>> import numpy as np
    >>> s = map_stats(np.array([[[1.0, 2.0, np.nan, 3.0]]], dtype=np.float32))
    >>> s.min, s.max, s.mean, s.nan_count
    (1.0, 3.0, 2.0, 1)
    """
    data = vol.data if isinstance(vol, xr.DataArray) else vol
    if isinstance(data, da.Array):
        if data.ndim != 3:
            data = data.reshape((1, 1, -1)) if data.ndim < 3 else data
        (parts,) = compute(stats_graph(data), progress=progress, label="statistics")
    else:
        parts = block_stats(np.asarray(data))
    return merge_stats(parts)


# --------------------------------------------------------------------------- facts


def map_facts(vol: xr.DataArray) -> dict[str, Any]:
    """Header facts of a Volume (nothing computes): shape, voxel size, origin and file header.

    Returns a JSON-ready dict: ``shape`` (z, y, x), ``voxel_size`` (z, y, x)
    Å, ``origin`` (z, y, x) Å, ``chunks`` (z, y, x) of the first block, and
    for MRC sources ``mode``, ``dtype``, ``nstart`` (NX/NY/NZSTART as in the
    header), ``axis_order`` (MAPC, MAPR, MAPS), ``sampling`` (MX, MY, MZ),
    ``cell`` (a, b, c Å), ``cell_angles`` (°), ``space_group``, ``labels``,
    ``origin_from`` ("origin", "nstart" or "zero"),
    ``extended_header_bytes``, ``header_stats``.
    """
    from ..volume import origin as _origin
    from ..volume import voxel_size as _voxel_size

    h = dict(vol.attrs.get("header") or {})
    facts: dict[str, Any] = {
        "source": h.get("source"),
        "format": h.get("format"),
        "shape": [int(n) for n in vol.shape],
        "voxel_size": list(_voxel_size(vol)),
        "origin": list(_origin(vol)),
    }
    if isinstance(vol.data, da.Array):
        facts["chunks"] = [int(c[0]) for c in vol.data.chunks]
    if h.get("format") == "mrc" or "mode" in h:
        facts.update(
            {
                "mode": h.get("mode"),
                "dtype": h.get("dtype"),
                "compression": h.get("compression"),
                "nstart": h.get("nstart"),
                "axis_order": h.get("mapcrs"),
                "sampling": h.get("sampling"),
                "cell": h.get("cell"),
                "cell_angles": h.get("cell_angles"),
                "space_group": h.get("ispg"),
                "origin_from": h.get("origin_from"),
                "origin_xyz_field": h.get("origin_xyz"),
                "labels": h.get("labels"),
                "exttyp": h.get("exttyp"),
                "extended_header_bytes": h.get("nsymbt"),
                "header_stats": h.get("header_stats"),
            }
        )
    if "zarr" in h:
        facts["zarr"] = h["zarr"]
    return facts


# --------------------------------------------------------------------------- atomic output


def prepare_output(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Check that ``path`` may be written: folder exists and is writable, overwrite allowed."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputError(f"{path}: exists (pass overwrite=True to replace it)")
    parent = p.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create folder {parent} ({exc.strerror})") from None
    if not parent.is_dir():
        raise OutputError(f"{path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: folder {parent} is not writable")
    if p.is_dir() and not p.name.lower().endswith(ZARR_SUFFIXES):
        raise OutputError(f"{path}: is a folder")
    return p
